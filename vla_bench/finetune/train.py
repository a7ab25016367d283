"""The fine-tuning loop: an OpenVLA snapshot + training examples -> a LoRA adapter (or a full fine-tune), with the
published recipe's defaults (OPENVLA.md §5): LoRA r=32, alpha=min(r, 16), dropout 0, gaussian init, on every linear
layer (the module set the published run wrapped), AdamW lr 5e-4 constant, micro-batch 16, loss on the action tokens
(+ EOS), random-crop + colour-jitter augmentation.

`train(config, train_set, val_set, norm_stats)` reads top to bottom: distributed setup, model, data order,
optimizer, resume, the loop (accumulate, step, log, evaluate, checkpoint), outputs. Its parts live beside it, one
job each: config.py (TrainConfig, the schedule), examples.py (cached examples, their order, batches), model.py (the
training forward, LoRA, compilation, optimizer), distributed.py (DDP / FSDP), checkpoints.py (save and resume). The same code runs in one process
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
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoints import load_checkpoint, save_checkpoint, trim_log
from .collate import Collator
from .config import TrainConfig, lr_lambda
from .distributed import (Dist, FullWeights, all_reduce, gather_full_state, gradient_sync, is_sharded,
                          setup_distributed, wrap_model)
from .examples import Examples, Stream, make_batch
from .model import ActionModel, build_model, fixed_text_length, make_optimizer, summarize, use_bf16

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
    from ..openvla.checkpoint import write_dataset_statistics
    from ..openvla.normalization import action_stats
    from . import augment
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
    result.update(write_outputs(cfg, d, out, snap, vla, peft_model, module, sharded, norm_stats))
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def write_outputs(cfg: TrainConfig, d: Dist, out: Path, snap, vla, peft_model, module, sharded: bool,
                  norm_stats: Mapping[str, Any]) -> dict:
    """The run's products: the adapter (and a merged snapshot with cfg.merge) or the full model, each with its
    dataset statistics, the last log record and the curves' plot. Every rank takes part (FSDP gathers the full
    weights); rank 0 writes."""
    from ..openvla.checkpoint import write_dataset_statistics, write_snapshot
    from . import plots

    result: dict[str, Any] = {}
    log_path = out / "log.jsonl"
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
