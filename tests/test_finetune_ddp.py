"""Several processes: two gloo processes on the CPU, each with half of a global batch, end with the gradients of one
process that sees the whole batch, under DDP (LoRA) and under FSDP (a full fine-tune, sharded per transformer
block); `vla-bench finetune` under torchrun logs the loss curve of a single-process run with the same global batch
(LoRA: DDP; --full: FSDP, with gradient accumulation, clipping and a checkpoint that a resumed run continues from).

Run as a script (under torchrun) this file is the worker of the gradient tests.
"""
from __future__ import annotations

import json
import os
import shutil
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


def forward_backward(snapshot: str, rows: slice, distributed: bool, full: bool = False):
    """(module, model, dist) after one forward/backward of the trainer's own pieces on rows of the global batch
    (with augmentation keyed by the rows' global positions, as the loop does): LoRA, or a full fine-tune (full);
    distributed: wrapped as the trainer wraps it (DDP for LoRA, FSDP for full)."""
    from vla_bench.finetune.config import TrainConfig
    from vla_bench.finetune.distributed import Dist, setup_distributed, wrap_model
    from vla_bench.finetune.examples import augment_params
    from vla_bench.finetune.model import ActionModel, build_model
    from vla_bench.finetune.augment import PUBLISHED
    from vla_bench.finetune.collate import Collator
    from vla_bench.openvla.normalization import action_stats

    d, device = setup_distributed("cpu") if distributed else (Dist(), torch.device("cpu"))
    cfg = TrainConfig(base=snapshot, out="unused", unnorm_key="toy", lora=not full, lora_rank=4, lora_dropout=0.0)
    snap, vla, _ = build_model(cfg, device)
    collator = Collator(snap.tokenizer, vla.arch, action_stats(STATS, "toy"), augment=PUBLISHED)
    module = ActionModel(vla)
    model = wrap_model(module, d, device, cfg.lora)
    frames, texts, actions = _global_batch()
    positions = np.arange(GLOBAL)[rows]
    params = augment_params(PUBLISHED, 11, positions)
    batch = collator(frames[rows], texts[rows], actions[rows], params, device)
    loss, _ = model(batch.pixel_values, batch.input_ids, batch.labels, batch.n_action)
    loss.backward()
    return module, model, d


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather: every rank calls it), a plain tensor as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def gradients(snapshot: str, rows: slice, ddp: bool, full: bool = False) -> dict[str, torch.Tensor]:
    module, _, _ = forward_backward(snapshot, rows, ddp, full)
    return {n: _full(p.grad) for n, p in module.named_parameters() if p.grad is not None}


def _compare_to_single_process(got: dict, snap: Path, full: bool) -> dict:
    """The gradients of 2 processes x half the global batch against one process x the whole batch (and a check that
    one process's half alone would differ); returns the single-process gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers ran with one thread each: keep summation orders comparable
    try:
        single = gradients(str(snap), slice(0, GLOBAL), ddp=False, full=full)
        half = gradients(str(snap), slice(0, GLOBAL // 2), ddp=False, full=full)
    finally:
        torch.set_num_threads(threads)
    assert set(got) == set(single) and len(single) > 10
    differs = nonzero = 0
    for name in single:
        # float sums in another order: agreement to 1e-4 of each tensor's own scale
        scale = float(single[name].abs().max())
        assert float((got[name] - single[name]).abs().max()) <= 1e-4 * scale + 1e-12, name
        if scale > 0:  # lora_A gets no gradient while lora_B is still zero (its init)
            nonzero += 1
            differs += float((half[name] - single[name]).abs().max()) > 1e-2 * scale
    assert nonzero > 10 and differs == nonzero  # one rank's own gradients are not the global ones
    return single


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
    _compare_to_single_process(torch.load(out), snap, full=False)


def test_fsdp_full_finetune_gradients_match_single_process_and_its_checkpoint_round_trips(tmp_path):
    """A full fine-tune under 2 processes is sharded (FSDP2: every parameter a DTensor shard, one FSDP unit per
    transformer block plus the root); its gradients, gathered, are a single process's on the whole batch, and so is
    the clipped norm. After an AdamW step the trainer's checkpoint gathers the full weights and optimizer state on
    rank 0; wiping every rank's shards and loading it restores them exactly, and a plain single-process module
    loads the same files."""
    from vla_bench.finetune.checkpoints import load_checkpoint
    from vla_bench.finetune.config import TrainConfig
    from vla_bench.finetune.model import ActionModel, build_model

    snap = _snapshot(tmp_path)
    out = tmp_path / "fsdp"
    run = _torchrun(str(Path(__file__)), str(snap), str(out), "fsdp")
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out / "result.pt")
    assert got["sharded"] and got["units"] == got["blocks"] + 1 and got["blocks"] >= 8
    assert got["local_numel"] < 0.6 * got["numel"]  # this rank holds about half of the weights
    single = _compare_to_single_process(got["grads"], snap, full=True)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in single.values()])))
    assert abs(got["norm"] - norm) <= 1e-4 * norm
    assert got["restored"] == {"weights": True, "optimizer": True, "step": 1}

    # the files are an unsharded run's: a single process resumes from them (full weights, param-id optimizer state)
    cfg = TrainConfig(base=str(snap), out=str(out), unnorm_key="toy", lora=False)
    _, vla, _ = build_model(cfg, torch.device("cpu"))
    module = ActionModel(vla)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(out, module, optimizer, scheduler) == 1
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), got["weights"][name], rtol=0, atol=0)
    assert len(optimizer.state) == len(single)  # AdamW state for every parameter that had a gradient


def _cli_run(tmp_path: Path, steps: int, *extra: str):
    """A tiny snapshot, demos and checkpoints.toml for `vla-bench finetune`; returns (argv builder for an --out and
    a micro-batch, the single-process runner, the log reader)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_finetune_train as F

    from vla_bench.finetune.cli import main

    snap = _snapshot(tmp_path)
    demos = F._demos(tmp_path / "demos" / "libero_spatial", n_demos=2, steps=6)
    toml = tmp_path / "checkpoints.toml"
    toml.write_text(F.TOML.replace('"snap"', f'"{snap}"'))

    def args(out, batch):
        a = F._args(toml, demos, "c", out, steps, "--no-register", "--val-fraction", "0", *extra)
        a[a.index("--batch-size") + 1] = str(batch)
        return a

    def single(argv) -> int:  # one torch thread, like each launched rank
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return main(argv)
        finally:
            torch.set_num_threads(threads)

    return args, single, F._log


def _assert_same_curve(log, reference, steps: int) -> None:
    """The same steps, samples, and losses and L1 to rtol 1e-4 (only the summation order differs)."""
    assert [r["step"] for r in log] == [r["step"] for r in reference] == list(range(1, steps + 1))
    for a, b in zip(log, reference):
        assert a["samples"] == b["samples"]
        np.testing.assert_allclose([a["train/loss"], a["train/l1"]], [b["train/loss"], b["train/l1"]], rtol=1e-4)


def test_finetune_command_under_torchrun_follows_the_single_process_curve(tmp_path):
    """2 processes x micro-batch 2 log the same losses as 1 process x micro-batch 4 (same global batches, the
    same augmentations), and only rank 0 writes the outputs."""
    args, single, read_log = _cli_run(tmp_path, 3)
    run = _torchrun("-m", "vla_bench.finetune.cli", *args(tmp_path / "ddp", 2))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "train_config.json").read_text())["parallel"] == "ddp"
    assert single(args(tmp_path / "single", 4)) == 0
    _assert_same_curve(read_log(tmp_path / "ddp"), read_log(tmp_path / "single"), 3)
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_finetune_command_under_torchrun_is_fsdp_and_follows_the_single_process_curve(tmp_path):
    """`vla-bench finetune --full` under torchrun (FSDP) with gradient accumulation and clipping: 2 processes x
    micro-batch 1 x 2 accumulation steps log the losses of 1 process x micro-batch 2 x 2, its snapshot holds the
    same weights, and a run resumed from its step-2 checkpoint (FSDP again) ends with the very same weights."""
    from safetensors.torch import load_file

    args, single, read_log = _cli_run(tmp_path, 4, "--full", "--grad-accum", "2", "--max-grad-norm", "1.0",
                                      "--save-every", "2", "--lr", "1e-3")
    fsdp = tmp_path / "fsdp"
    run = _torchrun("-m", "vla_bench.finetune.cli", *args(fsdp, 1))
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((fsdp / "train_config.json").read_text())
    assert config["parallel"] == "fsdp" and config["global_batch"] == 4
    # a run killed after its step-2 checkpoint: the checkpoint, the log and the frame cache, nothing after
    resumed = tmp_path / "resumed"
    for part in ("checkpoints", "cache"):
        shutil.copytree(fsdp / part, resumed / part)
    shutil.copy(fsdp / "log.jsonl", resumed / "log.jsonl")
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    run = _torchrun("-m", "vla_bench.finetune.cli", *args(resumed, 1))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vla-bench finetune: 2 steps" in run.stdout  # it resumed at step 2 rather than starting over
    assert single(args(tmp_path / "single", 2)) == 0

    got = read_log(fsdp)
    _assert_same_curve(got, read_log(tmp_path / "single"), 4)
    untimed = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert untimed(read_log(resumed)) == untimed(got)  # steps 1-2 kept from the killed run, 3-4 recomputed alike
    weights = lambda out: {k: v for f in sorted((out / "model").glob("*.safetensors"))
                           for k, v in load_file(str(f)).items()}
    w_fsdp, w_single, w_resumed = weights(fsdp), weights(tmp_path / "single"), weights(resumed)
    assert w_fsdp.keys() == w_single.keys() == w_resumed.keys() and len(w_fsdp) > 50
    close = total = 0
    for k in w_single:
        assert torch.equal(w_fsdp[k], w_resumed[k]), k  # the same shards, state and batches: bit for bit on CPU
        # AdamW moves each weight by about lr * sign(gradient) per step; where a gradient is ~0, summation order
        # (2 ranks + reduce-scatter vs 1 process) can flip that sign, so single elements may differ by up to
        # steps * lr; everything else agrees to float noise
        diff = (w_fsdp[k] - w_single[k]).abs()
        assert float(diff.max()) <= 4 * 1e-3, k
        close += int((diff <= 1e-5 + 1e-4 * w_single[k].abs()).sum())
        total += diff.numel()
    assert close >= 0.999 * total, (close, total)


def fsdp_worker(snapshot: str, out: Path, rows: slice) -> None:
    """The FSDP test's worker: gradients, clipped norm, one AdamW step, the trainer's checkpoint written, the shards
    wiped and the checkpoint loaded back; rank 0 saves what the test compares."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from vla_bench.finetune.checkpoints import load_checkpoint, save_checkpoint
    from vla_bench.finetune.distributed import gather_full_state, is_sharded
    from vla_bench.finetune.model import transformer_blocks

    module, model, d = forward_backward(snapshot, rows, distributed=True, full=True)
    params = [p for p in module.parameters() if p.requires_grad]
    result = {"sharded": is_sharded(model) and all(isinstance(p, DTensor) for p in params),
              "units": sum(isinstance(m, FSDPModule) for m in module.modules()),
              "blocks": len(transformer_blocks(module.vla)),
              "numel": sum(p.numel() for p in params), "local_numel": sum(p.to_local().numel() for p in params),
              "grads": {n: _full(p.grad) for n, p in module.named_parameters() if p.grad is not None}}
    result["norm"] = float(_full(torch.nn.utils.clip_grad_norm_(params, 1e-3)))  # clips: the norm is far above
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    optimizer.step()
    scheduler.step()
    save_checkpoint(out, 1, module, optimizer, scheduler, keep=1, sharded=True, main=d.main)
    weights, optim_state = gather_full_state(module, optimizer)
    optim_state = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in optim_state.get("state", {}).items()}}
    with torch.no_grad():  # wipe this rank's shards: weights and AdamW moments
        for p in params:
            p.to_local().zero_()
        for state in optimizer.state.values():
            for v in state.values():
                (v.to_local() if isinstance(v, DTensor) else v).zero_()
    step = load_checkpoint(out, module, optimizer, scheduler, sharded=True, main=d.main)
    weights2, optim_state2 = gather_full_state(module, optimizer)
    if d.main:
        same = lambda a, b: len(a) > 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        moments, moments2 = optim_state["state"], optim_state2["state"]
        result["restored"] = {"weights": same(weights, weights2), "step": step,
                              "optimizer": len(moments) > 0 and moments.keys() == moments2.keys() and
                              all(same(moments[k], moments2[k]) for k in moments)}
        result["weights"] = {n: weights[n] for n, _ in module.named_parameters()}
        torch.save(result, out / "result.pt")


if __name__ == "__main__":  # the torchrun worker of the gradient tests: python this_file.py SNAPSHOT OUT [fsdp]
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per = GLOBAL // world
    rows = slice(rank * per, (rank + 1) * per)
    if sys.argv[3:] == ["fsdp"]:
        fsdp_worker(sys.argv[1], Path(sys.argv[2]), rows)
    else:
        grads = gradients(sys.argv[1], rows, ddp=True)
        if rank == 0:
            torch.save(grads, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()
