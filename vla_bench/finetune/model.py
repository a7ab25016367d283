"""The model being fine-tuned: OpenVLA with a training forward (loss and metrics on the action tokens), LoRA set-up,
per-block compilation, precision and the optimizer."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlaBenchError
from ..openvla.action_tokenizer import BIN_CENTERS
from .collate import IGNORE_INDEX, Collator
from .config import TrainConfig

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
