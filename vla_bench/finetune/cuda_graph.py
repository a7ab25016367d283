"""Whole-step CUDA graph (`vla-bench finetune --cuda-graph`): one training step (forward, backward, optional
gradient clipping, AdamW) captured once with torch.cuda.graph and replayed for every later step, so the GPU runs
the step's ~12k kernels back to back instead of waiting for Python to launch each one.

This is PyTorch's "whole network capture" recipe: the first `warmup` steps run eagerly on a side stream (they are
real training steps: they compile, create the optimizer state and warm cuBLAS up, so that nothing inside the
capture allocates outside the graph's pool or synchronizes); the next step is captured and replayed; every step
copies its batch into the same static input tensors. What capture requires of the model and the loop:

- no host synchronization and no host-to-device copy inside the step (train.ActionModel's label positions come from
  a fixed-shape sort, its metrics are built on the device; the metrics tensor is a static output read after replay);
- fixed shapes (the collator pads every row to one length: train.fixed_text_length);
- gradient checkpointing that does not read the CUDA RNG state (illegal during capture):
  capture_safe_checkpointing, with no dropout (lora_dropout 0) since no RNG state is replayed;
- an AdamW built with capturable=True, its learning rate a device tensor that each step fills from the scheduler's
  float (the captured kernels read it from the device);
- autocast without its weight-cast cache (the cache would hand the graph tensors from an earlier, eager step).

Unsupported combinations are refused up front (check_cuda_graph_options) with what to change.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import VlaBenchError


def check_cuda_graph_options(cfg, device: torch.device, world: int) -> None:
    """Raise VlaBenchError for what a captured step cannot do; no-op when cfg.cuda_graph is off."""
    if not cfg.cuda_graph:
        return
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs a CUDA device (this run's device is {device.type})")
    if cfg.grad_accum > 1:
        problems.append(f"gradient accumulation (--grad-accum {cfg.grad_accum}) is not captured: use --grad-accum 1 "
                        "(a larger --batch-size if memory allows)")
    if world > 1:
        problems.append(f"several processes ({world}: DDP/FSDP) are not supported: run one process")
    if cfg.lora_dropout > 0:
        problems.append(f"dropout (--lora-dropout {cfg.lora_dropout}) needs RNG state replayed through the "
                        "checkpoint recomputation inside the graph, which is not done: use --lora-dropout 0")
    if problems:
        raise VlaBenchError("--cuda-graph: " + "; ".join(problems))


# ---- gradient checkpointing that capture allows -------------------------------------------------------------------
class _CaptureSafeCheckpoint:
    """Mixin put in front of a ViT block's class: a call in training with grad enabled runs through a non-reentrant
    checkpoint that does not save or restore RNG state (timm's own checkpointing keeps preserve_rng_state=True,
    whose torch.cuda.get_rng_state() fails during capture). It wraps __call__, outside a compiled block's graph, as
    timm's checkpoint(blk, x) does, so the block's compiled code is the same."""

    def __call__(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().__call__, *args, use_reentrant=False,
                                                     preserve_rng_state=False, **kwargs)
        return super().__call__(*args, **kwargs)


_SAFE_CLASSES: dict[type, type] = {}


def _capture_safe_class(cls: type) -> type:
    if issubclass(cls, _CaptureSafeCheckpoint):
        return cls
    if cls not in _SAFE_CLASSES:  # one subclass per block class (a class per instance would defeat compile caching)
        _SAFE_CLASSES[cls] = type(cls.__name__, (_CaptureSafeCheckpoint, cls), {"__module__": cls.__module__})
    return _SAFE_CLASSES[cls]


def capture_safe_checkpointing(vla: nn.Module) -> int:
    """Gradient checkpointing for a captured step on every transformer block: HF's Llama layers through its own
    kwargs (non-reentrant, preserve_rng_state=False); the ViT towers' blocks through _CaptureSafeCheckpoint (their
    class is swapped in place, so module names, parameters and state dicts stay as they are) with timm's own
    checkpointing turned off. Returns the number of ViT blocks switched."""
    vla.language_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    switched = 0
    for tower in (getattr(vla.vision_backbone, "featurizer", None),
                  getattr(vla.vision_backbone, "fused_featurizer", None)):
        if tower is None:
            continue
        tower.set_grad_checkpointing(False)
        for blk in tower.blocks:
            blk.__class__ = _capture_safe_class(type(blk))
            switched += 1
    return switched


# ---- attention without a mask ---------------------------------------------------------------------------------------
CAUSAL_SDPA = "vla_bench_causal_sdpa"


def plain_causal_attention(vla: nn.Module) -> bool:
    """Make the Llama run SDPA with is_causal=True and no mask-building step. The training rows are right-padded
    and causal (collate.py), so no mask is needed; but HF's create_causal_mask first checks the position ids for
    packed sequences, which reads a device value on the host (a synchronization) outside capture, and inside a
    capture skips that check and builds an explicit mask: the captured step would then differ from the eager
    warmup (a compiled decoder layer would see a mask tensor instead of None and recompile mid-capture, which fails).
    The same SDPA function registered under a name with no mask function makes create_causal_mask return None
    straight away, as it does for external attention backends. Checked on a 3-token probe; if this transformers
    version still builds a mask, the previous implementation is put back and False returned."""
    import inspect

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    config = vla.language_model.config
    previous = config._attn_implementation
    if previous not in ("sdpa", CAUSAL_SDPA):
        return False
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    config._attn_implementation = CAUSAL_SDPA
    probe = {"config": config, "inputs_embeds": torch.zeros(1, 3, 1), "attention_mask": None,
             "past_key_values": None, "position_ids": torch.arange(3)[None], "cache_position": torch.arange(3)}
    accepted = inspect.signature(create_causal_mask).parameters
    try:
        mask = create_causal_mask(**{k: v for k, v in probe.items() if k in accepted})
    except Exception:
        mask = "failed"
    if mask is not None:
        config._attn_implementation = previous
        return False
    return True


# ---- the optimizer ------------------------------------------------------------------------------------------------
def match_optimizer_options(optimizer: torch.optim.Optimizer, **options) -> None:
    """After optimizer.load_state_dict (a resume), put back the options this run built the optimizer with
    (capturable, fused): load_state_dict takes every group option from the checkpoint, whose run may have used
    others. A capturable or fused AdamW keeps `step` as a float32 tensor on the parameter's device."""
    for group in optimizer.param_groups:
        group.update(options)
        if group.get("capturable") or group.get("fused"):
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


# ---- the captured step ----------------------------------------------------------------------------------------------
class GraphedTrainStep:
    """step(pixel_values, input_ids, labels) -> the metrics tensor of train.ActionModel for one optimizer step
    (forward, backward, clipping, optimizer.step; the gradients are left for the next step to overwrite, not zeroed).

    The first `warmup` calls run eagerly on a side stream; the next one captures the step and replays it; later
    calls replay. Every call copies its inputs into the static ones first; the returned metrics tensor is the
    graph's static output from the capture on: read it (or add it up) before the next call. The scheduler's float
    learning rate of each group is copied into the device tensor the graph reads on every call.

    If capturing fails and `fallback` is set, a warning says why (with any synchronizing op the last warmup step
    was seen to run), the step is run eagerly (a failed capture ran no kernel, so no batch is lost or applied
    twice) and so is every later one, as without --cuda-graph; without `fallback` the error is raised."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, autocast_dtype: torch.dtype | None,
                 n_action: int, n_target: int, clip: Callable[[], object] | None = None, warmup: int = 3,
                 fallback: bool = True):
        if not all(g.get("capturable") for g in optimizer.param_groups):
            raise VlaBenchError("--cuda-graph: the optimizer must be built with capturable=True")
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.autocast_dtype = autocast_dtype
        self.n_action, self.n_target = n_action, n_target
        self.warmup, self.fallback = warmup, fallback
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None  # why capture failed (then every step runs eagerly)
        self.static: tuple[torch.Tensor, ...] | None = None
        self.metrics: torch.Tensor | None = None
        self._lrs: list[torch.Tensor] = []
        self._sync_warnings: list[str] = []

    # the pieces of one step
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cuda", enabled=False)
        # no weight-cast cache: the same autocast (and so the same compiled-code guards) in warmup and capture
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _forward_backward_update(self) -> torch.Tensor:
        with self._autocast():
            loss, metrics = self.model(*self.static, self.n_action, self.n_target)
        loss.backward()
        if self.clip is not None:
            self.clip()
        self.optimizer.step()
        return metrics

    def _eager(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self._forward_backward_update()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def _copy_inputs(self, tensors) -> None:
        if self.static is None:
            self.static = tuple(t.clone() for t in tensors)
            return
        for dst, src in zip(self.static, tensors):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(f"a captured step takes inputs of one shape: got {tuple(src.shape)} {src.dtype} "
                                 f"for {tuple(dst.shape)} {dst.dtype} (is the collator's pad_to set?)")
            dst.copy_(src, non_blocking=True)

    def __call__(self, pixel_values, input_ids, labels) -> torch.Tensor:
        self._copy_inputs((pixel_values, input_ids, labels))
        self.calls += 1
        if self.graph is not None:
            self._fill_lrs()
            self.graph.replay()
            return self.metrics
        if self.failure is not None:
            return self._eager()
        if self.calls <= self.warmup:
            return self._warmup_step(last=self.calls == self.warmup)
        try:
            return self._capture_and_replay()
        except Exception as e:
            self._abandon_capture()
            seen = "; ".join(dict.fromkeys(self._sync_warnings)) or "none seen"
            # an op that fails inside the capture is often reported by capture_end's error, raised on the way out
            # of torch.cuda.graph: keep the first one too
            first = e.__context__ or e.__cause__
            during = f" (raised while handling {type(first).__name__}: {first})" if first is not None else ""
            self.failure = (f"{type(e).__name__}: {e}{during}; synchronizing ops seen in the last eager step: "
                            f"{seen}")
            if not self.fallback:
                raise
            warnings.warn(f"--cuda-graph: capturing the training step failed, continuing without the graph: "
                          f"{self.failure}", RuntimeWarning, stacklevel=2)
            return self._eager()

    def _warmup_step(self, last: bool) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), (self._watch_syncs() if last else contextlib.nullcontext()):
            metrics = self._eager()
        torch.cuda.current_stream().wait_stream(side)
        return metrics

    @contextlib.contextmanager
    def _watch_syncs(self):
        """Record (warn mode, never fail) every synchronizing CUDA call of an eager step: if the capture fails, these
        are the first suspects, named in the message."""
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        self._sync_warnings = [f"{str(w.message).splitlines()[0]} at {w.filename}:{w.lineno}" for w in syncs]
        for w in caught:  # the step's other warnings, as they would have been shown
            if w not in syncs:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _fill_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            lr.fill_(float(group["lr"]))  # a Python float: a fill kernel, no synchronization

    def _capture_and_replay(self) -> torch.Tensor:
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        device = groups[0]["params"][0].device
        self._lrs = [torch.tensor(float(lr), dtype=torch.float32, device=device) for lr in floats]
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients in its own pool
        graph = torch.cuda.CUDAGraph()
        for g, lr in zip(groups, self._lrs):
            g["lr"] = lr
        try:
            with torch.cuda.graph(graph):
                metrics = self._forward_backward_update()
        finally:
            for g, lr in zip(groups, floats):  # the scheduler and checkpoints keep seeing floats
                g["lr"] = lr
        self.graph, self.metrics = graph, metrics
        self._fill_lrs()
        graph.replay()
        return metrics

    def _abandon_capture(self) -> None:
        self.graph, self.metrics = None, None
        self.optimizer.zero_grad(set_to_none=True)  # gradients from a failed capture hold nothing
        torch.cuda.synchronize()

    def close(self) -> None:
        """Free the graph and its memory pool (static outputs, gradients): before building another graph in the
        same process, or measuring memory without this one."""
        self.graph, self.metrics, self.static = None, None, None
        self.optimizer.zero_grad(set_to_none=True)
