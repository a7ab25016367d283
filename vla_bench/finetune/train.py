"""The fine-tuning loop: an OpenVLA snapshot + training examples -> a LoRA adapter (or a full fine-tune), with the
published recipe's defaults (OPENVLA.md §5): LoRA r=32, alpha=min(r, 16), dropout 0, gaussian init, on every linear
layer (the module set the published run wrapped), AdamW lr 5e-4 constant, micro-batch 16, loss on the action tokens
(+ EOS), random-crop + colour-jitter augmentation.

`train(config, train_set, val_set, norm_stats)` reads top to bottom: distributed setup, model, data order,
optimizer, resume, the loop (accumulate, step, log, evaluate, checkpoint), outputs. The same code runs in one process
or under `torchrun` / `accelerate launch` (the env vars they set are all it looks at): DDP for LoRA, FSDP (FSDP2,
sharded per transformer block) for a full fine-tune.

Speed options on one GPU, all off by default: `compile` (compile_blocks), `fp8_base` (fp8.py: the frozen base's
GEMMs in FP8) and `cuda_graph` (cuda_graph.py: the whole step captured once and replayed).

Determinism: the example order is a seeded permutation per epoch over an endless stream of positions, and each
example's augmentation is drawn from a generator seeded by (seed, stream position); the global RNG (LoRA dropout)
is saved in every checkpoint. A run resumed after a kill therefore sees the same batches with the same augmentations
and continues the same loss curve (bit-identical on CPU; on GPU up to kernel non-determinism).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlaBenchError
from ..openvla.action_tokenizer import BIN_CENTERS
from .collate import IGNORE_INDEX, ActionBatch, Collator


@dataclasses.dataclass
class TrainConfig:
    base: str  # snapshot dir in the published layout
    out: str  # run folder
    unnorm_key: str
    # LoRA or full fine-tune
    lora: bool = True
    lora_rank: int = 32
    lora_alpha: float | None = None  # None: min(rank, 16), the published rule
    lora_dropout: float = 0.0
    lora_target: str = "published"  # published | all-linear | llm | comma-separated module names
    lora_init: str = "gaussian"
    # optimisation
    max_steps: int = 1000
    batch_size: int = 16  # per process (micro-batch); global = batch_size * world * grad_accum
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01  # torch's AdamW default, which the reference keeps
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    max_grad_norm: float | None = None  # the reference does not clip
    # precision and memory
    device: str = "auto"
    bf16: bool | None = None  # None: bf16 autocast (and bf16 frozen base weights for LoRA) on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (compile_blocks)
    fp8_base: bool = False  # frozen base linears of the LoRA layers in FP8 (fp8.py; LoRA on an FP8 GPU or the CPU)
    cuda_graph: bool = False  # capture the whole training step as one CUDA graph (cuda_graph.py)
    # data
    image_aug: bool = True
    eos_loss: bool = True
    prompt: str = "openvla"
    # loop
    seed: int = 7
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 1
    progress: bool = True
    merge: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Examples:
    """Training examples held as arrays: frames at the model's size after the training-side image chain, the
    instruction of each example (an index into `instructions`) and its raw action (training convention)."""
    frames: np.ndarray  # (N, S, S, 3) uint8, may be a np.memmap
    instruction_index: np.ndarray  # (N,) int
    instructions: list[str]
    actions: np.ndarray  # (N, 7) float32

    def __len__(self) -> int:
        return len(self.actions)

    def batch(self, indices) -> tuple[np.ndarray, list[str], np.ndarray]:
        idx = np.asarray(indices)
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to a memmap; results go back in order
        frames = np.empty((len(idx),) + self.frames.shape[1:], np.uint8)
        frames[order] = self.frames[idx[order]]
        return frames, [self.instructions[i] for i in self.instruction_index[idx]], self.actions[idx]


def _prepare_range(data, start: int, stop: int, path: str, shape: tuple, size: int) -> None:
    """Worker: frames [start, stop) of `data` through the training-side image chain into the memmap at `path`."""
    from ..openvla.image import reference_chain

    # one thread per worker: the resize is a torch einsum, and torch's default of one thread per core in each of
    # N workers oversubscribes the CPU N-fold (measured on a 16-core GPU host: 40 frames/s in all, ~5 ms per frame
    # per worker alone)
    torch.set_num_threads(1)
    frames = np.lib.format.open_memmap(path, mode="r+")
    for i in range(start, stop):
        # upright frames (data.py rotates LIBERO's renders); JPEG + lanczos as the RLDS frames were made; no crop:
        # the random crop is the augmentation's, and evaluation center-crops
        frames[i] = reference_chain(data[i]["image"], flip=False, crop=False, size=size)
    frames.flush()


def prepare_examples(data, size: int, cache: str | os.PathLike, workers: int = 0) -> Examples:
    """A finetune.data.TrainingData -> Examples, its frames prepared once into a .npy memmap at `cache` (reused
    when complete: a resumed run does not redo it). `workers` > 0 spreads the JPEG + resize work over spawned
    processes (spawn, not fork: the parent has torch's thread pools running)."""
    cache = Path(cache)
    n = len(data)
    shape = (n, size, size, 3)
    done = cache.with_suffix(".done")
    if not (done.is_file() and done.read_text().strip() == str(n)):
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(cache, mode="w+", dtype=np.uint8, shape=shape).flush()
        if workers > 0 and n > 64:
            import multiprocessing as mp

            bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
            with mp.get_context("spawn").Pool(workers) as pool:
                pool.starmap(_prepare_range, [(data, int(a), int(b), str(cache), shape, size)
                                              for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
        else:
            _prepare_range(data, 0, n, str(cache), shape, size)
        done.write_text(f"{n}\n")
    instructions = sorted({t.instruction for t in data.trajectories})
    lookup = {t: i for i, t in enumerate(instructions)}
    index = np.concatenate([np.full(len(t), lookup[t.instruction], np.int64) for t in data.trajectories])
    return Examples(np.load(cache, mmap_mode="r"), index, instructions, data.actions().astype(np.float32))


# ---- the model with a training forward ----------------------------------------------------------------------------
class ActionModel(nn.Module):
    """OpenVLA (model.OpenVLA, possibly with LoRA layers inside) with the training forward: patches spliced after
    BOS as in the reference, causal attention over right-padded rows, and the LM head run only at the positions
    that predict a label, so the (B, L, 32064) logits of every prompt position are never materialized."""

    def __init__(self, vla):
        super().__init__()
        self.vla = vla
        self.register_buffer("bin_centers", torch.tensor(BIN_CENTERS, dtype=torch.float32), persistent=False)

    def forward(self, pixel_values, input_ids, labels, n_action: int, n_target: int | None = None):
        """(loss, metrics). `n_target`: labelled positions per row (the collator's ActionBatch.n_target); without it
        they are counted on the host (a synchronization; a captured CUDA-graph step passes it)."""
        vla = self.vla
        patches = vla.projector(vla.vision_backbone(pixel_values.to(vla.dtype)))
        text = vla.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
        hidden = vla.language_model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        b = input_ids.shape[0]
        if n_target is None:
            n_target = count_targets(labels)
        # text token j >= 1 sits at column j + P - 1 + 1; the column before it predicts it
        cols = target_columns(labels, n_target)  # (B, n_target)
        at = (cols + patches.shape[1]).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = vla.language_model.lm_head(hidden.gather(1, at).flatten(0, 1)).float()
        targets = labels[:, 1:].gather(1, cols).flatten()
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():  # the reference's metrics, on the action tokens only (EOS excluded)
            pred = logits.argmax(-1).view(b, -1)[:, :n_action]
            gt = targets.view(b, -1)[:, :n_action]
            vocab = vla.arch.action_vocab_size
            decode = lambda ids: self.bin_centers[(vocab - ids - 1).clamp(0, len(self.bin_centers) - 1)]
            # counts filled on the device (torch.tensor(...) would be a host-to-device copy, illegal in a capture)
            metrics = torch.stack([loss.detach() * b, (pred == gt).sum().float(),
                                   (decode(pred) - decode(gt)).abs().sum(), loss.new_full((), float(b)),
                                   loss.new_full((), float(gt.numel()))])
        return loss, metrics  # metrics: [loss*B, correct, l1 sum, B, action tokens]


def target_columns(labels: torch.Tensor, n_target: int) -> torch.Tensor:
    """(B, n_target) columns of labels[:, 1:] that hold a label, in increasing order per row: what
    (labels[:, 1:] != IGNORE_INDEX).nonzero() gives row by row, when every row has exactly n_target of them (the
    collator's rows do). A stable sort of the "unlabelled" flags puts each row's labelled columns first, in order,
    with a shape known in advance: no host synchronization (nonzero's output size is data-dependent)."""
    unlabelled = (labels[:, 1:] == IGNORE_INDEX).to(torch.uint8)
    return torch.sort(unlabelled, dim=1, stable=True).indices[:, :n_target]


def count_targets(labels: torch.Tensor) -> int:
    """Labelled positions per row, checked to be the same in every row (one host synchronization)."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    lo, hi = int(counts.min()), int(counts.max())
    if lo != hi:
        raise ValueError(f"every row must have the same number of labelled positions, got {lo} to {hi}")
    return lo


def summarize(m: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, l1, n, tokens = m.tolist()
    return {"loss": loss_sum / n, "accuracy": correct / tokens, "l1": l1 / tokens}


# ---- LoRA ---------------------------------------------------------------------------------------------------------
def lora_targets(vla, target: str) -> list[str]:
    """peft target_modules for a target spec. "published": what peft 0.11's "all-linear" wrapped in the reference
    run: the last name component of every nn.Linear, suffix-matched, which also catches the patch-embedding Conv2d
    layers (".proj") and lm_head (OPENVLA.md §5). "all-linear": every nn.Linear, by full name (current peft's rule
    for a model that is not a transformers PreTrainedModel). "llm": the Llama projections only."""
    if target == "published":
        return sorted({name.rsplit(".", 1)[-1] for name, m in vla.named_modules() if isinstance(m, nn.Linear)})
    if target == "all-linear":
        return sorted(name for name, m in vla.named_modules() if isinstance(m, nn.Linear))
    if target == "llm":
        return sorted(name for name, m in vla.language_model.model.named_modules() if isinstance(m, nn.Linear)
                      for name in ["language_model.model." + name])
    return [t.strip() for t in target.split(",") if t.strip()]


def add_lora(vla, cfg: TrainConfig, base_path: str):
    from peft import LoraConfig, get_peft_model

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else min(cfg.lora_rank, 16)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=lora_targets(vla, cfg.lora_target),
                        init_lora_weights=True if cfg.lora_init == "default" else cfg.lora_init)
    peft_model = get_peft_model(vla, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    return peft_model


def keep_lora_inputs_in_autocast_dtype(peft_model) -> int:
    """Under bf16 autocast, stop peft from casting each LoRA layer's input to the adapter weights' fp32: that cast
    copies the whole activation to fp32, and autocast copies it straight back to bf16 for lora_A's matmul. A bf16 ->
    fp32 -> bf16 round trip is exact, so the math is unchanged (with the recipe's lora_dropout 0; a dropout > 0 would
    scale the bf16 input instead of the fp32 one). Measured on OpenVLA-7B, LoRA r=32, micro-batch 16, H200: these
    copies were ~115 ms of an 882 ms step. Returns the number of LoRA layers switched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def transformer_blocks(vla) -> list[nn.Module]:
    """Both towers' ViT blocks and the Llama decoder layers (the units compile_blocks compiles and FSDP shards)."""
    towers = (getattr(vla.vision_backbone, "featurizer", None), getattr(vla.vision_backbone, "fused_featurizer", None))
    vit = [blk for tower in towers if tower is not None for blk in tower.blocks]
    return vit + list(vla.language_model.model.layers)


def compile_blocks(vla) -> int:
    """torch.compile every transformer block (both towers' ViT blocks, the Llama decoder layers) so that each
    block's elementwise chains (norms, rotary, activations, LoRA's scale-and-add, casts) run as fused kernels.
    Per block, not the whole model: the blocks of a tower share one compiled graph (their parameters are graph
    inputs), gradient checkpointing still wraps each block, and the prefix splice stays eager. Returns the count."""
    blocks = transformer_blocks(vla)
    for blk in blocks:
        blk.compile()
    return len(blocks)


def build_model(cfg: TrainConfig, device, world_rank: int = 0):
    """(snapshot, vla module, peft model or None): the base loaded from cfg.base, LoRA added with cfg.seed."""
    from ..openvla.checkpoint import load_snapshot

    if cfg.fp8_base and not cfg.lora:
        raise VlaBenchError("--fp8-base applies to LoRA runs (it stores the frozen base in FP8); drop it or --full")
    bf16 = use_bf16(cfg, device)
    # LoRA keeps the frozen base in bf16 on GPU as the reference does; a full fine-tune trains fp32 master weights
    dtype = "bfloat16" if (bf16 and cfg.lora) else "float32"
    snap = load_snapshot(cfg.base, dtype=dtype, device=str(device))
    vla = snap.model
    torch.manual_seed(cfg.seed)  # the LoRA init (same on every rank, so DDP starts from one model)
    peft_model = None
    if cfg.lora:
        peft_model = add_lora(vla, cfg, cfg.base)
    else:
        vla.requires_grad_(True)
    if cfg.cuda_graph:
        from .cuda_graph import capture_safe_checkpointing, plain_causal_attention

        if not plain_causal_attention(vla):
            warnings.warn("--cuda-graph: this transformers version builds an attention mask inside the captured "
                          "step (slower attention; with --compile the capture may fail)", RuntimeWarning)
        if cfg.gradient_checkpointing:  # the same recomputation, without reading the RNG state (capture forbids it)
            capture_safe_checkpointing(vla)
    elif cfg.gradient_checkpointing:
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vla.vision_backbone.featurizer.set_grad_checkpointing(True)
        if hasattr(vla.vision_backbone, "fused_featurizer"):
            vla.vision_backbone.fused_featurizer.set_grad_checkpointing(True)
    if peft_model is not None and bf16:
        keep_lora_inputs_in_autocast_dtype(peft_model)
    if cfg.fp8_base:  # after LoRA is added (it converts the layers LoRA wraps), before compiling (graphs see FP8)
        from .fp8 import convert_frozen_linears_to_fp8

        convert_frozen_linears_to_fp8(vla)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the dropped bf16 weights' memory back
    if cfg.compile:
        compile_blocks(vla)
    vla.train()
    return snap, vla, peft_model


def use_bf16(cfg: TrainConfig, device) -> bool:
    return (device.type == "cuda") if cfg.bf16 is None else bool(cfg.bf16)


def fixed_text_length(collator: Collator, instructions, n_action: int) -> int:
    """The longest row any of `instructions` makes (prompt, action tokens, EOS): the one length every batch is
    padded to when a captured step needs a single shape."""
    return max(collator.row_length(t, n_action) for t in instructions)


def make_optimizer(params, cfg: TrainConfig, device, sharded: bool) -> torch.optim.Optimizer:
    """AdamW. On CUDA the fused kernel (one launch per dtype/device group instead of a chain of foreach kernels;
    the same update rule), except on FSDP's sharded parameters, which keep the default; capturable=True under
    --cuda-graph (its step count and learning rate live on the device, so the update can be captured)."""
    options = {}
    if device.type == "cuda" and not sharded:
        options["fused"] = True
    if cfg.cuda_graph:
        options["capturable"] = True
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **options)


# ---- data order ---------------------------------------------------------------------------------------------------
class Stream:
    """An endless, seeded stream of example indices: epoch e is a permutation seeded by (seed, e). Stream position
    p of micro-step m on rank r is m * global + r * batch + i, so any step's batch is known without replaying."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        for k, p in enumerate(range(start, start + count)):
            epoch = p // self.n
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
                self._perm, self._epoch = torch.randperm(self.n, generator=gen).numpy(), epoch
            out[k] = self._perm[p % self.n]
        return out


def augment_params(cfg_aug, seed: int, positions) -> torch.Tensor:
    from .augment import sample_params

    gens = (torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, int(p)]).generate_state(1)[0]))
            for p in positions)
    return torch.stack([sample_params(cfg_aug, g) for g in gens])


def make_batch(collator: Collator, examples: Examples, indices, device, aug_seed: int | None = None,
               positions=None) -> ActionBatch:
    frames, instructions, actions = examples.batch(indices)
    params = None
    if aug_seed is not None and collator.augment is not None:
        params = augment_params(collator.augment, aug_seed, positions)
    return collator(frames, instructions, actions, params, device)


# ---- distributed --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_opt: str) -> tuple[Dist, torch.device]:
    """torchrun / accelerate launch set WORLD_SIZE, RANK and LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    from ..openvla.checkpoint import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_opt)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_opt)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def wrap_ddp(module: nn.Module, d: Dist, device) -> nn.Module:
    if d.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .fp8 import fp8_buffer_names

    # --fp8-base: the FP8 weights are buffers, which DDP would broadcast from rank 0 at wrapping and before every
    # forward (gigabytes per step on 7B); every rank quantized the same base identically, so they are left out
    fp8_buffers = fp8_buffer_names(module)
    if fp8_buffers:
        DDP._set_params_and_buffers_to_ignore_for_model(module, fp8_buffers)
    # unused parameters exist by design: the last ViT block and SigLIP's MAP head (the reference's setting too)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
               gradient_as_bucket_view=True)


def wrap_fsdp(module: nn.Module, d: Dist, device) -> nn.Module:
    """Shard a full fine-tune over the ranks: FSDP2's fully_shard on every transformer block, then on the root
    (ActionModel: embeddings, patch embeddings, projector, norms, lm_head, SigLIP's unused MAP head). FSDP2, not
    FSDP1: fully_shard runs on CPU with a gloo device mesh in torch 2.14 (reduce-scatter, gradient-sync toggling,
    clip_grad_norm_ on DTensor gradients, AdamW on DTensor parameters and the full state-dict round trip were
    checked there; the CI test runs it with 2 CPU processes). Parameters become DTensors sharded on dim 0, in place,
    under their own names; no mixed-precision policy: bf16 autocast runs over fp32 gathered weights as without
    FSDP. Unused parameters (the last ViT block, the MAP head) keep grad None on every rank, which FSDP2 allows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    for blk in transformer_blocks(module.vla):
        fully_shard(blk, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def wrap_model(module: nn.Module, d: Dist, device, lora: bool) -> nn.Module:
    """One process: the module itself; several: DDP for LoRA (a small replicated adapter), FSDP for a full fine-tune
    (weights, gradients and AdamW state sharded). Returns what the loop calls; `module` keeps its parameter names."""
    if d.world == 1:
        return module
    return wrap_ddp(module, d, device) if lora else wrap_fsdp(module, d, device)


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # FSDP2's fully_shard-ed module


def gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-step's forward (its backward follows outside it): gradients are averaged over the
    ranks only on the last micro-step of an accumulation. DDP decides at forward time (no_sync); FSDP2 reads a flag
    at backward time, so it is set here for this micro-step's forward and backward (unsynced micro-steps keep
    unsharded gradients until the last one reduce-scatters the sum)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return _nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else _nullcontext()


def _names(module: nn.Module) -> list[str]:
    """Trainable parameter names in the optimizer's order (its param ids 0..n-1)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def gather_full_state(module: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """A sharded module's full state on rank 0 (CPU), through torch.distributed.checkpoint.state_dict: the model's
    state dict (parameters and buffers, unsharded) and the optimizer's in optimizer.state_dict()'s layout (param
    ids, so a checkpoint reads the same whatever wrote it). Every rank must call it (all-gathers); other ranks
    get empty dicts. Unsharded entries (buffers, AdamW's `step`) are the live tensors, not copies: write them out
    before the next step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=opts)
    if optimizer is None:
        return weights, None
    by_name = get_optimizer_state_dict(module, optimizer, options=opts)
    if not by_name:
        return weights, {}
    index = {n: i for i, n in enumerate(_names(module))}
    return weights, {"state": {index[n]: v for n, v in by_name["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                      for g in by_name["param_groups"]]}


def scatter_full_state(module: nn.Module, optimizer, weights: dict, optim_state: dict | None, main: bool) -> None:
    """The inverse of gather_full_state: rank 0 passes the full state (the others anything), every rank gets its
    shards (broadcast from rank 0, so only rank 0 reads files). The weights may be the trainable ones only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    # strict=False: the optimizer holds no state for parameters that never got a gradient (the unused ones)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(module, weights if main else {}, options=opts)
    if optimizer is not None:
        by_name = {}
        if main:
            names = _names(module)
            by_name = {"state": {names[i]: v for i, v in optim_state["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in optim_state["param_groups"]]}
        set_optimizer_state_dict(module, optimizer, by_name, options=opts)


class FullWeights:
    """What write_snapshot needs of a model whose weights are sharded: the gathered state dict and the arch."""

    def __init__(self, state: Mapping[str, torch.Tensor], arch):
        self._state, self.arch = dict(state), arch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


# ---- schedule and checkpoints -------------------------------------------------------------------------------------
def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, module, optimizer, scheduler, keep: int, sharded: bool = False,
                    main: bool = True) -> Path | None:
    """Write checkpoints/step-N atomically (a temp dir renamed into place, then the `latest` pointer replaced), so
    a kill at any moment leaves the previous checkpoint usable. Sharded (FSDP): every rank calls it, the full
    weights and optimizer state are gathered to rank 0, which writes the same files as an unsharded run."""
    from safetensors.torch import save_file

    if sharded:
        full, optim_state = gather_full_state(module, optimizer)
        if not main:
            return None
        weights = {n: full[n].contiguous() for n in _names(module)}
    else:
        weights, optim_state = trainable_state(module), optimizer.state_dict()
    root = out / "checkpoints"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng},
               tmp / "state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}) + "\n")
    final = root / f"step-{step:08d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, module, optimizer, scheduler, sharded: bool = False, main: bool = True) -> int:
    """Restore the latest checkpoint into module/optimizer/scheduler/RNG; returns its step (0 when none). Sharded
    (FSDP): every rank calls it; rank 0 reads the files and every rank receives its shards of the weights and of
    the optimizer state (so a checkpoint resumes under FSDP whatever world size or wrapping wrote it)."""
    from safetensors.torch import load_file

    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return 0
    folder = out / "checkpoints" / pointer.read_text().strip()
    if sharded:
        import torch.distributed as dist

        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True) if main else None
        weights = load_file(str(folder / "trainable.safetensors")) if main else {}
        scatter_full_state(module, optimizer, weights, state["optimizer"] if main else None, main)

        small = [{"scheduler": state["scheduler"], "rng": state["rng"]} if main else None]
        dist.broadcast_object_list(small, src=0)
        state = small[0]
    else:
        params = dict(module.named_parameters())
        for name, value in load_file(str(folder / "trainable.safetensors")).items():
            with torch.no_grad():
                params[name].copy_(value)
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(json.loads((folder / "step.json").read_text())["step"])


def trim_log(path: Path, step: int) -> None:
    """After a resume from step N, drop the killed run's records past N: the log stays one curve."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


# ---- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, collator, examples: Examples, cfg: TrainConfig, d: Dist, device, autocast) -> dict | None:
    """Loss, action-token accuracy and L1 over the first eval_batches global batches of a fixed order, without
    augmentation; every rank takes its share and the sums are all-reduced."""
    if examples is None or len(examples) == 0:
        return None
    model.eval()
    order = np.arange(len(examples))
    per = cfg.batch_size * d.world
    total = torch.zeros(5, device=device)
    for b in range(min(cfg.eval_batches, math.ceil(len(order) / per))):
        idx = order[b * per:(b + 1) * per][d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]
        if len(idx) == 0:
            continue
        batch = make_batch(collator, examples, idx, device)
        with autocast():
            _, m = model(batch.pixel_values, batch.input_ids, batch.labels, batch.n_action, batch.n_target)
        total += m
    model.train()
    return summarize(all_reduce(total, d))


# ---- the loop -----------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, train_set: Examples, val_set: Examples | None, norm_stats: Mapping[str, Any],
          extra_config: Mapping[str, Any] | None = None) -> dict:
    """Run (or resume) a fine-tune into cfg.out; returns {"out", "adapter" or "model", "merged", "final"}."""
    from ..openvla.checkpoint import write_dataset_statistics, write_snapshot
    from ..openvla.normalization import action_stats
    from . import augment, plots
    from .cuda_graph import check_cuda_graph_options

    d, device = setup_distributed(cfg.device)
    check_cuda_graph_options(cfg, device, d.world)
    out = Path(cfg.out)
    log_path = out / "log.jsonl"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_dataset_statistics(out, norm_stats)
        run_config = {"train": cfg.to_json(), "world_size": d.world,
                      "parallel": ("ddp" if cfg.lora else "fsdp") if d.world > 1 else None,
                      "global_batch": cfg.batch_size * d.world * cfg.grad_accum,
                      "examples": {"train": len(train_set), "val": len(val_set) if val_set is not None else 0},
                      **dict(extra_config or {})}
        (out / "train_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")

    snap, vla, peft_model = build_model(cfg, device, d.rank)
    if cfg.fp8_base and d.main:
        _record_fp8(out / "train_config.json", vla)
    collator = Collator(snap.tokenizer, vla.arch, action_stats(norm_stats, cfg.unnorm_key), prompt=cfg.prompt,
                        eos_loss=cfg.eos_loss, augment=augment.PUBLISHED if cfg.image_aug else None)
    n_action = train_set.actions.shape[1]
    if cfg.cuda_graph:  # one shape for every batch (held-out batches too: one compiled shape for evaluation)
        texts = list(train_set.instructions) + (list(val_set.instructions) if val_set is not None else [])
        collator.pad_to = fixed_text_length(collator, texts, n_action)
    module = ActionModel(vla).to(device)
    model = wrap_model(module, d, device, cfg.lora)  # FSDP shards `module` in place: model is module
    sharded = is_sharded(model)
    bf16 = use_bf16(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else \
        (lambda: torch.autocast(device.type, enabled=False))

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device, sharded)
    options = {k: optimizer.defaults[k] for k in ("fused", "capturable")}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step = load_checkpoint(out, module, optimizer, scheduler, sharded, d.main)
    if step > 0:  # a checkpoint's optimizer options may be another run's (e.g. written without --cuda-graph)
        from .cuda_graph import match_optimizer_options

        match_optimizer_options(optimizer, **options)
    if d.main:
        trim_log(log_path, step)
    clip = (lambda: torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm else None
    graphed = None
    if cfg.cuda_graph:
        from .cuda_graph import GraphedTrainStep

        graphed = GraphedTrainStep(module, optimizer, torch.bfloat16 if bf16 else None, n_action,
                                   collator.n_target(n_action), clip)

    stream = Stream(len(train_set), cfg.seed)
    per_micro = cfg.batch_size * d.world  # stream positions consumed by one micro-step across ranks
    running = torch.zeros(5, device=device)
    if step == 0:  # the base's held-out figures, before any update: where the curve starts
        val = evaluate(model, collator, val_set, cfg, d, device, autocast)
        if d.main and val is not None:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": 0, **{f"val/{k}": v for k, v in val.items()}}) + "\n")
    progress = _progress(cfg, d, step)
    started, start_step = time.monotonic(), step
    try:
        while step < cfg.max_steps:
            for micro in range(cfg.grad_accum):
                first = (step * cfg.grad_accum + micro) * per_micro + d.rank * cfg.batch_size
                positions = np.arange(first, first + cfg.batch_size)
                batch = make_batch(collator, train_set, stream.indices(first, cfg.batch_size), device,
                                   cfg.seed if cfg.image_aug else None, positions)
                if graphed is not None:  # forward, backward, clipping and the update, captured (grad_accum is 1)
                    running += graphed(batch.pixel_values, batch.input_ids, batch.labels)
                    continue
                sync = micro == cfg.grad_accum - 1 or d.world == 1
                with gradient_sync(model, sync), autocast():
                    loss, m = model(batch.pixel_values, batch.input_ids, batch.labels, batch.n_action,
                                    batch.n_target)
                (loss / cfg.grad_accum).backward()
                running += m
            lr = scheduler.get_last_lr()[0]
            if graphed is None:
                if clip is not None:  # FSDP: DTensor gradients, whose norm clip_grad_norm_ all-reduces
                    clip()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1

            final = step == cfg.max_steps
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or final:
                record = {"step": step, "lr": lr, "samples": step * cfg.grad_accum * per_micro,
                          **{f"train/{k}": v for k, v in summarize(all_reduce(running, d)).items()}}
                running.zero_()
                if step % cfg.eval_every == 0 or final:
                    val = evaluate(model, collator, val_set, cfg, d, device, autocast)
                    record.update({f"val/{k}": v for k, v in (val or {}).items()})
                record["seconds"] = time.monotonic() - started
                if d.main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if progress is not None:
                    progress.update(progress.task_ids[0], completed=step,
                                    description=f"loss {record['train/loss']:.3f} acc {record['train/accuracy']:.2f}")
            elif progress is not None:
                progress.update(progress.task_ids[0], completed=step)
            if step % cfg.save_every == 0 and step < cfg.max_steps and (d.main or sharded):
                save_checkpoint(out, step, module, optimizer, scheduler, cfg.keep_checkpoints, sharded, d.main)
    finally:
        if progress is not None:
            progress.stop()

    result: dict[str, Any] = {"out": str(out), "steps": step - start_step}
    if graphed is not None:
        result["cuda_graph"] = ("captured" if graphed.graph is not None else f"not used: {graphed.failure}"
                                if graphed.failure else "not captured: the run ended within the eager warmup steps")
        graphed.close()
    final_model = vla
    if sharded:  # every rank takes part in gathering the full weights; rank 0 writes them
        full, _ = gather_full_state(module)
        final_model = FullWeights({n[len("vla."):]: t for n, t in full.items() if n.startswith("vla.")}, vla.arch)
    if d.main:
        lines = log_path.read_text().splitlines() if log_path.is_file() else []
        result["final"] = json.loads(lines[-1]) if lines else {}
        if peft_model is not None:
            adapter = out / "adapter"
            with _written_whole(adapter) as partial:  # `adapter` existing means the run finished
                peft_model.save_pretrained(str(partial), save_embedding_layers=False)
                write_dataset_statistics(partial, norm_stats)  # the kind reads a fine-tune's stats beside it
            result["adapter"] = str(adapter)
            if cfg.merge:
                if cfg.fp8_base:  # merge into the base's own weights, read back from its snapshot (exact)
                    from .fp8 import restore_frozen_linears

                    restore_frozen_linears(vla, cfg.base)
                merged = peft_model.merge_and_unload()
                stats = {**snap.norm_stats, **norm_stats}
                with _written_whole(out / "merged") as partial:
                    write_snapshot(partial, merged, stats, cfg.base)
                    write_dataset_statistics(partial, norm_stats)
                result["merged"] = str(out / "merged")
        else:
            with _written_whole(out / "model") as partial:
                write_snapshot(partial, final_model, {**snap.norm_stats, **norm_stats}, cfg.base)
                write_dataset_statistics(partial, norm_stats)
            result["model"] = str(out / "model")
        plots.plot_curves(log_path, out / "curves.png")
        result["plot"] = str(out / "curves.png")
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


@contextlib.contextmanager
def _written_whole(folder: Path):
    """Yield a temporary sibling folder to write into, renamed to `folder` once the writing is done: a killed run
    leaves no half-written adapter or snapshot where a finished one is looked for."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def _record_fp8(config_path: Path, vla) -> None:
    """train_config.json gets what --fp8-base converted, and which LoRA layers it left in bf16 (and why)."""
    from .fp8 import FP8FrozenLinear, skipped_fp8_layers

    config = json.loads(config_path.read_text())
    config["fp8_layers"] = {"converted": sum(isinstance(m, FP8FrozenLinear) for m in vla.modules()),
                          "skipped (dims not multiples of 16)": skipped_fp8_layers(vla)}
    config_path.write_text(json.dumps(config, indent=2, default=str) + "\n")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(cfg: TrainConfig, d: Dist, step: int):
    if not (cfg.progress and d.main):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    progress = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.description}"), transient=False)
    progress.add_task("", total=cfg.max_steps, completed=step)
    progress.start()
    return progress
