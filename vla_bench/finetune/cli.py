"""`vla-bench finetune`: a checkpoints.toml entry + demonstrations -> a trained candidate entry.

    vla-bench finetune --base openvla-7b --data demos/libero_spatial --name my-lora
    torchrun --nproc_per_node 8 -m vla_bench.cli finetune ...     # DDP, same flags (or `accelerate launch`)

The run folder (default runs/NAME) holds the adapter in PEFT's layout (adapter/, with dataset_statistics.json next to
it, which the openvla kind reads), dataset_statistics.json, train_config.json (every knob, the data's provenance and
execution rule), log.jsonl, curves.png and checkpoints/ (resume: run the same command again). A new
[checkpoints.NAME] entry (kind openvla, base, adapter, unnorm_key, baseline, and action_repeat = k for a run with
--action-repeat k > 1, which evaluation replays) is written into checkpoints.toml with comments and order kept,
so `pytest suites/libero_spatial --checkpoint NAME --vla-compare` gates it directly.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path

from ..errors import VlaBenchError, choices

DATA_KINDS = ("auto", "libero_hdf5", "libero_rlds", "bridge_rlds")


def add_finetune_arguments(parser) -> None:
    a = parser.add_argument
    a("--base", required=True, help="checkpoints.toml entry to fine-tune (kind openvla, with a source)")
    a("--data", required=True, nargs="+", help="demonstrations: LIBERO HDF5 files/folders, or one RLDS dataset dir")
    a("--name", required=True, help="name of the new checkpoints.toml entry")
    a("--data-kind", default="auto", choices=DATA_KINDS, help="format of --data (auto: HDF5 when *.hdf5 found)")
    a("--out", default=None, help="run folder (default runs/NAME)")
    a("--unnorm-key", default=None, help="dataset key of the norm stats (default: from the data, e.g. "
                                         "libero_spatial_no_noops for demos/libero_spatial)")
    a("--val-fraction", type=float, default=0.05, help="trajectories held out for evaluation (default 0.05)")
    a("--val-data", nargs="+", default=None, help="held-out demonstrations instead of a split of --data")
    a("--no-noop-filter", action="store_true", help="keep no-op steps (OpenVLA's filter is on by default)")
    a("--action-repeat", type=int, default=1,
      help="aggregate k steps into one example (written to the run and the entry; evaluation replays it)")
    a("--baseline", default=None, help="stored baseline the candidate is gated against (default: the base's name)")
    a("--replace", action="store_true", help="replace an existing entry of that name")
    a("--no-register", action="store_true", help="do not write the entry into checkpoints.toml")
    a("--workers", type=int, default=None, help="processes preparing frames (default: CPU count, max 16)")
    g = parser.add_argument_group("model")
    g.add_argument("--full", action="store_true", help="full fine-tune (all weights; small models) instead of LoRA")
    g.add_argument("--lora-rank", type=int, default=32)
    g.add_argument("--lora-alpha", type=float, default=None, help="default min(rank, 16), the published rule")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-target", default="published",
                   help="published (every layer the reference run wrapped) | all-linear | llm | name,name,...")
    g.add_argument("--lora-init", default="gaussian", choices=("gaussian", "default"))
    g.add_argument("--merge", action="store_true", help="also write the merged model in the published layout")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=16, help="micro-batch per process (default 16)")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--max-grad-norm", type=float, default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--bf16", default="auto", choices=("auto", "on", "off"), help="bf16 autocast (auto: on CUDA)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (fused elementwise kernels; compiling takes a minute)")
    g.add_argument("--fp8-base", action="store_true",
                   help="LoRA: keep the frozen base linears in FP8 and run their GEMMs in FP8 (needs an FP8 GPU: "
                        "compute capability 8.9+; the bf16 weights are dropped)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step as one CUDA graph and replay it (one CUDA process, "
                        "--grad-accum 1, no dropout; rows padded to one length)")
    g.add_argument("--no-image-aug", action="store_true", help="turn off random crop + colour jitter")
    g.add_argument("--no-eos-loss", action="store_true", help="loss on the 7 action tokens only, not EOS")
    g.add_argument("--seed", type=int, default=7)
    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--keep-checkpoints", type=int, default=1)
    g.add_argument("--no-progress", action="store_true")


def _data_kind(args) -> str:
    if args.data_kind != "auto":
        return args.data_kind
    paths = [Path(p) for p in args.data]
    if any(p.suffix == ".hdf5" or (p.is_dir() and any(p.glob("*.hdf5"))) for p in paths):
        return "libero_hdf5"
    raise VlaBenchError(f"cannot tell the format of --data {' '.join(args.data)}: no *.hdf5 files; pass "
                        f"--data-kind ({choices(DATA_KINDS[1:])})")


def default_unnorm_key(kind: str, paths, filter_noops: bool) -> str | None:
    """OpenVLA's dataset names: libero_<suite>_no_noops (suite = the demo folder, as `vla-bench collect` and
    LIBERO lay files out), bridge_orig."""
    if kind == "bridge_rlds":
        return "bridge_orig"
    p = Path(paths[0])
    folder = (p if p.is_dir() else p.parent).resolve().name
    if kind == "libero_rlds":
        return folder if folder.endswith("_no_noops") else f"{folder}_no_noops"
    if folder.startswith("libero_"):
        return f"{folder}_no_noops" if filter_noops else folder
    return None


def _base_entry(registry, name: str):
    if name not in registry.checkpoints:
        raise VlaBenchError(f"--base {name!r}: no such entry in {registry.path}; valid: {choices(registry.checkpoints)}")
    spec = registry.checkpoints[name]
    if spec.kind != "openvla" or "source" not in spec.options:
        ok = [n for n, s in registry.checkpoints.items() if s.kind == "openvla" and "source" in s.options]
        raise VlaBenchError(f"--base {name!r} must be an openvla entry with a 'source' (a snapshot dir); "
                            f"candidates: {choices(ok) or '(none)'}")
    return spec, spec.resolve_path(spec.options["source"])


def _relative(path: Path, toml: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), toml.parent)
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def config_from_args(args, base_dir: Path, out: Path, unnorm_key: str, prompt: str):
    from .config import TrainConfig

    return TrainConfig(
        base=str(base_dir), out=str(out), unnorm_key=unnorm_key, lora=not args.full, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target=args.lora_target,
        lora_init=args.lora_init, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm, device=args.device,
        bf16={"auto": None, "on": True, "off": False}[args.bf16], gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile, fp8_base=args.fp8_base, cuda_graph=args.cuda_graph,
        image_aug=not args.no_image_aug, eos_loss=not args.no_eos_loss, prompt=prompt, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
        merge=args.merge)


def register_candidate(registry, name: str, base: str, result: dict, unnorm_key: str, baseline: str | None,
                       center_crop: bool, comment: str, replace: bool = False, action_repeat: int = 1):
    """Write [checkpoints.NAME] for a finished run (comments and order of the file kept, via Registry.add_entry);
    a run trained with --action-repeat k > 1 gets `action_repeat = k`, so evaluation replays its execution rule."""
    values = {"kind": "openvla"}
    if "adapter" in result:
        values.update(base=base, adapter=_relative(Path(result["adapter"]), registry.path))
    else:
        values["source"] = _relative(Path(result["model"]), registry.path)
    values.update(unnorm_key=unnorm_key, center_crop=center_crop)
    if action_repeat > 1:
        values["action_repeat"] = int(action_repeat)
    if baseline:
        values["baseline"] = baseline
    return registry.add_entry(name, values, comment=comment, replace=replace)


def _finished_output(out: Path) -> Path | None:
    """The adapter (LoRA) or model (--full) folder of a finished run in `out` (train.py renames it into place
    whole, last), else None."""
    return next((out / name for name in ("adapter", "model") if (out / name).is_dir()), None)


def _entry_points_at(entry, folder: Path) -> bool:
    value = entry.options.get("adapter") or entry.options.get("source")
    return value is not None and entry.resolve_path(value) == folder.resolve()


def _register_finished(args, registry, out: Path, finished: Path) -> int:
    """Write the entry of a run that finished but was killed before its entry was written."""
    kind = _data_kind(args)
    unnorm_key = args.unnorm_key or default_unnorm_key(kind, args.data, not args.no_noop_filter)
    config = json.loads((out / "train_config.json").read_text()) if (out / "train_config.json").is_file() else {}
    image_aug = bool(config.get("image_aug", not args.no_image_aug))
    result = {finished.name: str(finished)}
    comment = f"vla-bench finetune: run folder {out} (entry written when the finished run was found)"
    spec = register_candidate(registry, args.name, args.base, result, unnorm_key, args.baseline or args.base,
                              image_aug, comment, action_repeat=args.action_repeat)
    print(f"vla-bench finetune: {out} was finished; wrote [checkpoints.{spec.name}] to {registry.path}")
    return 0


def run_finetune(args) -> int:
    """The `vla-bench finetune` command; returns the exit status."""
    from ..registry import Registry
    from . import data as data_mod
    from . import stats as stats_mod
    from .examples import prepare_examples
    from .train import train

    rank = int(os.environ.get("RANK", "0"))
    started = time.monotonic()
    registry = Registry.load(getattr(args, "checkpoints_file", None))
    base_spec, base_dir = _base_entry(registry, args.base)
    out = Path(args.out) if args.out else Path("runs") / args.name
    finished = _finished_output(out)
    if finished is not None and not args.no_register and not args.replace:
        # the same command again after a kill between the final write and the entry: finish what is left
        entry = registry.checkpoints.get(args.name)
        if entry is None:
            return _register_finished(args, registry, out, finished)
        if _entry_points_at(entry, finished):
            print(f"vla-bench finetune: {out} is finished and [checkpoints.{args.name}] names it; nothing to do")
            return 0
    if args.name in registry.checkpoints and not args.replace and not args.no_register:
        raise VlaBenchError(f"{registry.path}: entry [checkpoints.{args.name}] exists already; choose another "
                            "--name or pass --replace")
    if args.full and args.merge:
        raise VlaBenchError("--merge applies to LoRA runs; a --full run writes a whole snapshot already")
    if args.full and args.fp8_base:
        raise VlaBenchError("--fp8-base applies to LoRA runs (it stores the frozen base in FP8); drop it or --full")
    if args.cuda_graph:  # before the data is prepared: say what cannot work now, not minutes later
        from ..openvla.checkpoint import resolve_device
        from .cuda_graph import check_cuda_graph_options

        check_cuda_graph_options(config_from_args(args, base_dir, Path("."), "", "openvla"),
                                 resolve_device(args.device), int(os.environ.get("WORLD_SIZE", "1")))
    if finished is not None:
        raise VlaBenchError(f"{out}: holds a finished run already; choose another --out or --name")

    kind = _data_kind(args)
    filter_noops = not args.no_noop_filter
    load = lambda paths: data_mod.load_training_data(kind, paths if len(paths) > 1 else paths[0],
                                                     filter_noops=filter_noops, action_repeat=args.action_repeat)
    full = load(args.data)
    if args.val_data:
        train_data, val_data = full, load(args.val_data)
    else:
        train_data, val_data = full.split(args.val_fraction, seed=args.seed)
    unnorm_key = args.unnorm_key or default_unnorm_key(kind, args.data, filter_noops)
    if not unnorm_key:
        raise VlaBenchError(f"cannot derive the norm-stats key from --data {args.data[0]}; pass --unnorm-key "
                            "(e.g. libero_spatial_no_noops)")
    # the reference computes stats over the whole dataset (split "all"), train and held-out together
    norm_stats = stats_mod.dataset_statistics(full, unnorm_key)

    from ..openvla.checkpoint import read_config

    size = int(read_config(base_dir).get("image_sizes", [224])[0])
    digest = hashlib.sha256(json.dumps([full.info, args.seed, args.val_fraction, args.val_data, size],
                                       sort_keys=True, default=str).encode()).hexdigest()[:12]
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    examples = {}
    for split, d in (("train", train_data), ("val", val_data)):
        if len(d.trajectories) == 0:
            examples[split] = None
            continue
        cache = out / "cache" / f"{split}-{digest}.npy"
        if rank == 0:
            prepare_examples(d, size, cache, workers)
        examples[split] = cache
    cfg = config_from_args(args, base_dir, out, unnorm_key, base_spec.options.get("prompt", "openvla"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # other ranks wait for rank 0's frame cache
        from .distributed import setup_distributed
        import torch.distributed as dist

        setup_distributed(cfg.device)
        dist.barrier()
    sets = {s: (prepare_examples(d, size, examples[s], 0) if examples[s] is not None else None)
            for s, d in (("train", train_data), ("val", val_data))}
    prepared = time.monotonic()
    extra = {"base_entry": args.base, "base_dir": str(base_dir), "data": full.info,
             "val_data": val_data.info, "execution": full.info.get("execution"), "candidate": args.name}
    result = train(cfg, sets["train"], sets["val"], norm_stats, extra)
    if rank != 0:
        return 0

    final = result.get("final", {})
    shown = {k: round(v, 4) for k, v in final.items() if "/" in k}
    print(f"vla-bench finetune: {result['steps']} steps -> {out}; {json.dumps(shown)}")
    if "cuda_graph" in result:
        print(f"vla-bench finetune: --cuda-graph: {result['cuda_graph']}")
    # where a run's wall time went (data and frame cache vs model build, training, evaluation and writing)
    print(f"vla-bench finetune: {len(train_data)} train / {len(val_data)} held-out examples; data + frames "
          f"{prepared - started:.1f} s, model + training + writing {time.monotonic() - prepared:.1f} s")
    if not args.no_register:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        comment = (f"vla-bench finetune {stamp}: {'full' if args.full else 'LoRA r=%d' % args.lora_rank} on "
                   f"{' '.join(args.data)}, {args.steps} steps, run folder {out}")
        spec = register_candidate(registry, args.name, args.base, result, unnorm_key,
                                  args.baseline or args.base, cfg.image_aug, comment, args.replace,
                                  action_repeat=args.action_repeat)
        print(f"vla-bench finetune: wrote [checkpoints.{spec.name}] to {registry.path}")
    return 0


def main(argv=None) -> int:
    """Standalone entry (`python -m vla_bench.finetune.cli`, `torchrun -m vla_bench.finetune.cli`), the same
    arguments as `vla-bench finetune`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="vla-bench finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints-file", default=None, help="checkpoints.toml (default: nearest one)")
    add_finetune_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_finetune(args)
    except VlaBenchError as e:
        print(f"vla-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
