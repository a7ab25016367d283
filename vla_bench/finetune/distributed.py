"""Distributed set-up: one process or many under torchrun / accelerate (the env vars they set are all it reads),
DDP for LoRA, FSDP2 sharded per transformer block for a full fine-tune, and full-state gathering for writing."""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch
from torch import nn

from .model import transformer_blocks

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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
