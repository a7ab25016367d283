"""GPU sanity checks for `--fp8-base` and `--cuda-graph`, in a few minutes: run before bench_finetune.py, so a wrong
torch._scaled_mm call convention or a capture that fails shows up on a tiny model, not after the 7B one is built.

    python3 -m pytest benchmarks/bench_fp8_cuda.py -s

1. the row-wise FP8 GEMM as fp8.py calls it (row-major first operand, column-major second, scale_a (M, 1),
   scale_b (1, N), float32) equals the dequantize-and-matmul reference of its e4m3 operands;
2. FP8FrozenLinear against the bf16 nn.Linear at OpenVLA-7B's shapes: outputs and input gradients within 5%
   (e4m3's precision; ~3.5% expected), eager and compiled by Inductor;
3. `vla-bench finetune`'s train() on a tiny OpenVLA with --fp8-base --cuda-graph (with and without --compile):
   the step is captured (result["cuda_graph"] == "captured", not the eager fallback) and the loss curve follows
   the same run without the graph (the compiled pair takes a minute or two of compiling).

Skips without CUDA; the FP8 checks skip on GPUs older than compute capability 8.9.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs an FP8 GPU (compute capability 8.9+)")

# several shapes of the same compiled code below: keep dynamo from falling back to eager after its default 8
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)

TOKENS = 16 * 290  # micro-batch 16 x (256 patches + ~34 text tokens): the Llama layers' M
SHAPES = [(4096, 4096, False), (4096, 11008, False), (11008, 4096, False), (1152, 4304, True), (4096, 32064, False)]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@fp8_gpu
def test_scaled_mm_convention_is_the_dequantized_product():
    from vla_bench.finetune.fp8 import dequantize_rows, fp8_matmul, quantize_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(11008, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x8, sx = quantize_rows(x)
    w8, sw = quantize_rows(w)
    ref = dequantize_rows(x8, sx) @ dequantize_rows(w8, sw).t()
    for fast in (False, True):
        out = fp8_matmul(x8, w8.t(), sx, sw.view(1, -1).contiguous(), torch.bfloat16, fast_accum=fast)
        err = _rel(out, ref)
        print(f"\n[fp8] _scaled_mm row-wise, fast_accum={fast}: relative error to the dequantized product {err:.2e}")
        assert out.shape == (512, 11008) and out.dtype == torch.bfloat16
        assert err < 1e-2, "the FP8 GEMM is not the product of its scaled operands: check the call convention"


@fp8_gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("k,n,bias", SHAPES, ids=[f"{k}x{n}" for k, n, _ in SHAPES])
def test_fp8_linear_matches_the_bf16_linear(k, n, bias, compiled):
    from vla_bench.finetune.fp8 import FP8FrozenLinear

    torch.manual_seed(0)
    with torch.device("cuda"):
        lin = nn.Linear(k, n, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
        nn.init.normal_(lin.weight, std=0.02)
        x = torch.randn(TOKENS // 16, 16, k, dtype=torch.bfloat16).requires_grad_(True)
        grad = torch.randn(TOKENS // 16, 16, n, dtype=torch.bfloat16)
    ref = x.detach().float() @ lin.weight.float().t() + (lin.bias.float() if bias else 0)
    ref_grad = grad.float() @ lin.weight.float()
    layer = FP8FrozenLinear(lin)
    run = torch.compile(layer) if compiled else layer
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = run(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_bf16 = lin(x)
    out_err, grad_err = _rel(y, ref), _rel(gx, ref_grad)
    print(f"\n[fp8] {k}->{n} {'inductor' if compiled else 'eager'}: output {out_err:.3%}, input grad {grad_err:.3%} "
          f"(bf16 linear: {_rel(y_bf16, ref):.3%})")
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16 and gx.shape == x.shape
    assert out_err < 0.05 and grad_err < 0.05
    assert not torch.equal(y, y_bf16)


def _tiny_run(root, cuda_graph: bool, compile: bool):
    """train() on a tiny OpenVLA (two tasks, coloured frames, task actions plus noise): (result, losses by step)."""
    import json

    from vla_bench.finetune.config import TrainConfig
    from vla_bench.finetune.examples import Examples
    from vla_bench.finetune.train import train
    from vla_bench.openvla import tiny

    snap = root / "snap"
    if not snap.is_dir():
        tiny.write_tiny_snapshot(snap, tiny.build_tokenizer(root / "tok"), seed=0, hidden=128)
    tasks = {"put the bowl on the stove": [0.6, -0.4, 0.2, 0.0, 0.1, -0.2, 1.0],
             "close the microwave": [-0.5, 0.5, -0.3, 0.2, -0.1, 0.3, 0.0]}
    rng = np.random.default_rng(0)
    n = 24
    frames = np.concatenate([np.clip(60 + 120 * i + rng.integers(0, 40, (n, 224, 224, 3)), 0, 255)
                             for i in range(len(tasks))]).astype(np.uint8)
    noise = rng.normal(0, 0.03, (len(tasks) * n, 7))
    noise[:, 6] = 0.0  # the gripper command stays exact
    actions = (np.repeat(np.array(list(tasks.values())), n, axis=0) + noise).astype(np.float32)
    examples = Examples(frames, np.repeat(np.arange(len(tasks)), n), list(tasks), actions)
    stats = {"toy": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}}}
    out = root / f"run-graph{int(cuda_graph)}-compile{int(compile)}"
    cfg = TrainConfig(base=str(snap), out=str(out), unnorm_key="toy", lora_rank=8, lora_alpha=32, max_steps=12,
                      batch_size=4, lr=1e-2, log_every=1, eval_every=6, eval_batches=1, save_every=1000,
                      progress=False, gradient_checkpointing=True, fp8_base=True, cuda_graph=cuda_graph,
                      compile=compile, device="cuda", seed=3)
    result = train(cfg, examples, None, stats)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return result, {r["step"]: r["train/loss"] for r in log if "train/loss" in r}


@fp8_gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager-blocks", "compiled-blocks"])
def test_tiny_finetune_is_captured_and_follows_the_eager_loss_curve(tmp_path, compile):
    """Steps 1-3 are the graph's eager warmup, step 4 the first replay of the captured step: from the same weights
    on the same batch as the run without the graph, so its loss must match closely; later steps drift apart only
    by rounding (padding lengths differ), and the curve must fall as that run's does."""
    if compile:
        torch._dynamo.reset()  # the Inductor checks above compiled other shapes of the same code
    eager, eager_losses = _tiny_run(tmp_path, cuda_graph=False, compile=compile)
    graphed, graph_losses = _tiny_run(tmp_path, cuda_graph=True, compile=compile)
    print(f"\n[cuda-graph] tiny finetune, compile={compile}: {graphed.get('cuda_graph')}")
    print("    eager: " + " ".join(f"{eager_losses[s]:.3f}" for s in sorted(eager_losses)))
    print("    graph: " + " ".join(f"{graph_losses[s]:.3f}" for s in sorted(graph_losses)))
    assert graphed["cuda_graph"] == "captured"
    assert sorted(graph_losses) == list(range(1, 13))
    assert all(math.isfinite(v) for v in graph_losses.values())
    assert np.mean([graph_losses[s] for s in (10, 11, 12)]) < np.mean([graph_losses[s] for s in (1, 2, 3)]) - 1.0
    np.testing.assert_allclose([graph_losses[s] for s in range(1, 5)], [eager_losses[s] for s in range(1, 5)],
                               rtol=0.02)
    np.testing.assert_allclose([graph_losses[s] for s in range(5, 13)], [eager_losses[s] for s in range(5, 13)],
                               rtol=0.2)
