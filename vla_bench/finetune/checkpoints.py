"""Checkpoints of a fine-tune: the trainable state, optimizer, scheduler and RNG every `save_every` steps, resume from
the newest one, and the log trimmed back to it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .distributed import _names, gather_full_state, scatter_full_state

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
