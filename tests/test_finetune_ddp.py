"""DDP: two gloo processes on the CPU, each with half of a global batch, end with the gradients of one process that
sees the whole batch; and `vla-bench finetune` under torchrun logs the loss curve of a single-process run with the
same global batch.

Run as a script (under torchrun) this file is the worker of the first test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STATS = {"toy": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}}}
GLOBAL = 4


def _global_batch():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (GLOBAL, 224, 224, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, (GLOBAL, 7))
    actions[:, 6] = rng.integers(0, 2, GLOBAL)
    texts = ["put the bowl on the stove", "close the microwave", "turn on the stove", "put the bowl on the stove"]
    return frames, texts, actions


def gradients(snapshot: str, rows: slice, ddp: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients after one forward/backward of the trainer's own pieces on rows of the global batch (with
    augmentation keyed by the rows' global positions, as the loop does)."""
    from vla_bench.finetune import train as T
    from vla_bench.finetune.augment import PUBLISHED
    from vla_bench.finetune.collate import Collator
    from vla_bench.openvla.normalization import action_stats

    d, device = T.setup_distributed("cpu") if ddp else (T.Dist(), torch.device("cpu"))
    cfg = T.TrainConfig(base=snapshot, out="unused", unnorm_key="toy", lora_rank=4, lora_dropout=0.0)
    snap, vla, _ = T.build_model(cfg, device)
    collator = Collator(snap.tokenizer, vla.arch, action_stats(STATS, "toy"), augment=PUBLISHED)
    module = T.ActionModel(vla)
    model = T.wrap_ddp(module, d, device)
    frames, texts, actions = _global_batch()
    positions = np.arange(GLOBAL)[rows]
    params = T.augment_params(PUBLISHED, 11, positions)
    batch = collator(frames[rows], texts[rows], actions[rows], params, device)
    loss, _ = model(batch.pixel_values, batch.input_ids, batch.labels, batch.n_action)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _snapshot(root: Path) -> Path:
    from vla_bench.openvla import tiny

    if not (root / "snap" / "config.json").is_file():
        tok = tiny.build_tokenizer(root / "tok")
        tiny.write_tiny_snapshot(root / "snap", tok, seed=0)
    return root / "snap"


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ddp_gradients_match_single_process_on_the_same_global_batch(tmp_path):
    snap = _snapshot(tmp_path)
    out = tmp_path / "ddp_grads.pt"
    run = _torchrun(str(Path(__file__)), str(snap), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers ran with one thread each: keep summation orders comparable
    try:
        single = gradients(str(snap), slice(0, GLOBAL), ddp=False)
        half = gradients(str(snap), slice(0, GLOBAL // 2), ddp=False)
    finally:
        torch.set_num_threads(threads)
    assert set(ddp) == set(single) and len(single) > 10
    differs = nonzero = 0
    for name in single:
        # float sums in another order: agreement to 1e-4 of each tensor's own scale
        scale = float(single[name].abs().max())
        assert float((ddp[name] - single[name]).abs().max()) <= 1e-4 * scale + 1e-12, name
        if scale > 0:  # lora_A gets no gradient while lora_B is still zero (its init)
            nonzero += 1
            differs += float((half[name] - single[name]).abs().max()) > 1e-2 * scale
    assert nonzero > 10 and differs == nonzero  # one rank's own gradients are not the global ones


def test_finetune_command_under_torchrun_follows_the_single_process_curve(tmp_path):
    """2 processes x micro-batch 2 log the same losses as 1 process x micro-batch 4 (same global batches, the
    same augmentations), and only rank 0 writes the outputs."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_finetune_train as F

    from vla_bench.finetune.cli import main

    snap = _snapshot(tmp_path)
    demos = F._demos(tmp_path / "demos" / "libero_spatial", n_demos=2, steps=6)
    toml = tmp_path / "checkpoints.toml"
    toml.write_text(F.TOML.replace('"snap"', f'"{snap}"'))

    def args(out, batch):
        a = F._args(toml, demos, "c", out, 3, "--no-register", "--val-fraction", "0")
        a[a.index("--batch-size") + 1] = str(batch)
        return a

    run = _torchrun("-m", "vla_bench.finetune.cli", *args(tmp_path / "ddp", 2))
    assert run.returncode == 0, run.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args(tmp_path / "single", 4)) == 0
    finally:
        torch.set_num_threads(threads)
    ddp, single = F._log(tmp_path / "ddp"), F._log(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3]
    for a, b in zip(ddp, single):
        assert a["samples"] == b["samples"]
        np.testing.assert_allclose([a["train/loss"], a["train/l1"]], [b["train/loss"], b["train/l1"]], rtol=1e-4)
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()


if __name__ == "__main__":  # the torchrun worker of the first test: python this_file.py SNAPSHOT OUT
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per = GLOBAL // world
    grads = gradients(sys.argv[1], slice(rank * per, (rank + 1) * per), ddp=True)
    if rank == 0:
        torch.save(grads, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()
