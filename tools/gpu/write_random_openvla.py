"""Write a full-size OpenVLA-7B snapshot with random weights and a checkpoints.toml entry for it (no network needed):

    python3 tools/gpu/write_random_openvla.py [--out bench_out/rand7b] [--name rand7b]
        [--checkpoints-file bench_out/checkpoints.toml] [--seed 0] [--device cuda] [--tiny] [--force]

then evaluate it through the user path, e.g.
    python3 -m pytest suites/libero_spatial --checkpoints-file bench_out/checkpoints.toml --checkpoint rand7b

The model is built in bf16 on the GPU (about 15 GB written; a finished snapshot of the same seed is reused unless
--force). --tiny writes the same files around a tiny architecture (CPU, seconds). What is written and why:
vla_bench/openvla/random_snapshot.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/rand7b"), help="snapshot folder (default: %(default)s)")
    p.add_argument("--name", default="rand7b", help="the checkpoints.toml entry (default: %(default)s)")
    p.add_argument("--checkpoints-file", type=Path, default=None,
                   help="checkpoints.toml to add the entry to (default: checkpoints.toml beside the snapshot folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="where the 7B model is built (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="a tiny architecture instead of the 7B one (CPU tests)")
    p.add_argument("--force", action="store_true", help="write again even if a finished snapshot is there")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vla_bench.openvla.random_snapshot import write_checkpoints_entry, write_random_snapshot

    if not args.tiny and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {args.device} but CUDA is not available here; use --tiny for a CPU snapshot",
                  file=sys.stderr)
            return 2
    start = time.perf_counter()
    folder, reused = write_random_snapshot(args.out, device=args.device, seed=args.seed, tiny=args.tiny,
                                           reuse=not args.force)
    toml = write_checkpoints_entry(args.checkpoints_file or args.out.parent / "checkpoints.toml", args.name, folder)
    print(f"{'reused' if reused else 'wrote'} {folder} in {time.perf_counter() - start:.1f} s; "
          f"entry [checkpoints.{args.name}] in {toml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
