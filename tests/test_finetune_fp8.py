"""`--fp8-base` (finetune/fp8.py) and the pieces `--cuda-graph` (finetune/cuda_graph.py) relies on, on the CPU:
FP8 frozen linears compute what their e4m3 operands say (checked against the dequantize-and-matmul reference) and
stay within e4m3's error of the bf16/fp32 layer; a LoRA run on an FP8 base learns, saves only the adapter and merges
into the base's exact weights; the training step has none of the operations a CUDA-graph capture forbids (host
synchronization, host-to-device copies of Python data, RNG state reads); the sync-free label positions are the
nonzero ones; and the options reach the run's config or fail with a message that names them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vla_bench.errors import VlaBenchError
from vla_bench.finetune import fp8
from vla_bench.finetune.cli import add_finetune_arguments, config_from_args
from vla_bench.finetune.cli import main as finetune_main
from vla_bench.finetune.collate import IGNORE_INDEX, Collator
from vla_bench.finetune.cuda_graph import (CAUSAL_SDPA, capture_safe_checkpointing, check_cuda_graph_options,
                                           match_optimizer_options, plain_causal_attention)
from vla_bench.finetune.fp8 import FP8FrozenLinear, convert_frozen_linears_to_fp8, quantize_rows
from vla_bench.finetune.config import TrainConfig
from vla_bench.finetune.model import ActionModel, build_model, count_targets, fixed_text_length, target_columns
from vla_bench.openvla.normalization import action_stats

from test_finetune_train import STATS, TASKS, TOML, _args, _losses, files  # noqa: F401 (files: the tiny snapshot
# and demos the training tests use, as a module fixture here too)

REL = 0.06  # e4m3 keeps 3 mantissa bits: ~3.5% relative error on a random GEMM (both operands quantized)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _linear(k=64, n=48, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False)


# ---- the FP8 layer ------------------------------------------------------------------------------------------------
def test_fp8_linear_is_within_e4m3_error_of_the_linear_and_really_quantized():
    """Outputs and input gradients of a frozen nn.Linear (fp32) and its FP8 copy agree to e4m3's precision, on a
    non-contiguous input with leading dims; they are not identical (the operands really are quantized); the FP8
    layer has no trainable weight (the bias stays the frozen original) and gives its weight back to 1/16."""
    lin = _linear()
    layer = FP8FrozenLinear(lin)
    x = torch.randn(3, 64, 5).transpose(1, 2).requires_grad_(True)  # (3, 5, 64), not contiguous
    assert not x.is_contiguous()
    grad = torch.randn(3, 5, 48)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    ref = lin(x)
    (gref,) = torch.autograd.grad(ref, x, grad)
    assert y.shape == ref.shape and gx.shape == x.shape and y.dtype == gx.dtype == torch.float32
    assert _rel(y, ref) < REL and _rel(gx, gref) < REL
    assert not torch.equal(y, ref) and not torch.equal(gx, gref)

    assert [p for p in layer.parameters()] == [lin.bias] and not lin.bias.requires_grad
    assert all(not b.requires_grad for b in layer.buffers()) and list(layer.state_dict()) == ["bias"]
    assert layer.weight.shape == lin.weight.shape and layer.weight.dtype == lin.weight.dtype
    assert torch.isnan(layer.weight).all()  # any use of the stand-in weight shows, rather than computing quietly
    assert layer.weight8.dtype == layer.weight8_t.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight8_t, layer.weight8.t())
    w = lin.weight
    assert ((layer.dequantized_weight() - w).abs() <= w.abs() / 16 + 1e-3 * w.abs().amax(1, keepdim=True)).all()


def test_fp8_linear_computes_exactly_the_scaled_e4m3_products():
    """The layer's GEMMs are the dequantize-and-matmul reference of their e4m3 operands: forward (x8 * s_x) @
    (W8 * s_w)^T; input gradient (q(dY * s_w) * s_g) @ W8, the weight's row scales folded into dY. This pins the
    operand layouts and where each scale goes (what torch._scaled_mm is called with)."""
    lin = _linear(bias=False, seed=1)
    layer = FP8FrozenLinear(lin)
    x = torch.randn(7, 64, requires_grad=True)
    grad = torch.randn(7, 48)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, grad)

    w8, w_scale = quantize_rows(lin.weight)
    x8, x_scale = quantize_rows(x.detach())
    expect_y = (x8.double() * x_scale.double()) @ (w8.double() * w_scale.double()).t()
    g8, g_scale = quantize_rows(grad * w_scale.view(1, -1))
    expect_gx = (g8.double() * g_scale.double()) @ w8.double()
    torch.testing.assert_close(y.double(), expect_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), expect_gx, rtol=1e-5, atol=1e-5)


def test_fp8_linear_handles_zero_rows_autocast_and_compiles_without_graph_breaks():
    """All-zero input rows and weight rows give zeros, not NaN (no division by a zero amax); under bf16 autocast
    the output is bf16 (as nn.Linear's would be) and the input's gradient keeps the input's dtype; dynamo traces
    forward and backward as one graph (fullgraph=True), so compiled blocks stay whole."""
    lin = _linear()
    with torch.no_grad():
        lin.weight[:16] = 0.0
    layer = FP8FrozenLinear(lin)
    x = torch.randn(4, 64)
    x[1] = 0.0
    x.requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all() and torch.equal(y[1], lin.bias)
    assert torch.equal(y[:, :16], lin.bias[:16].expand(4, 16))
    (gx,) = torch.autograd.grad(y, x, torch.zeros_like(y))
    assert torch.equal(gx, torch.zeros_like(x))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.bfloat16
    (gb,) = torch.autograd.grad(yb.float().sum(), x)
    assert gb.dtype == torch.float32 and torch.isfinite(gb).all()

    compiled = torch.compile(lambda t: layer(t).square().sum(), backend="aot_eager", fullgraph=True)
    xc = torch.randn(2, 3, 64, requires_grad=True)
    compiled(xc).backward()
    xe = xc.detach().clone().requires_grad_(True)
    layer(xe).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 80), seed=st.integers(0, 2**31 - 1),
       log_scale=st.floats(-30, 30), zero_row=st.booleans())
def test_row_wise_quantization_round_trip_is_within_one_sixteenth(rows, cols, seed, log_scale, zero_row):
    """Invariant: dequantizing a row-wise quantized tensor gives back every row within 1/16 of its magnitude
    (e4m3 keeps 3 mantissa bits, so rounding to nearest is off by at most half a step of 2^-3: 2^-4 relative),
    element by element, for elements in e4m3's normal range relative to their row's largest (the rest, below
    2^-6 of the 448 grid, are off by at most half a subnormal step: 2^-10 of the row's scale); so the row's error
    norm is within 1/16 of its norm. The largest element of a row comes back exactly, and a zero row stays zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * rng.lognormal(0, 2, (rows, 1)) * 10.0 ** log_scale
    if zero_row:
        x[0] = 0.0
    x = torch.from_numpy(x).float()
    q, scale = quantize_rows(x)
    back = fp8.dequantize_rows(q, scale)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1) and scale.dtype == torch.float32
    assert torch.isfinite(back).all()
    err = (back.double() - x.double()).abs()
    bound = x.double().abs() / 16 + scale.double() * 2.0 ** -10 + 1e-6 * x.double().abs()
    assert (err <= bound).all()
    assert ((back - x).double().norm(dim=1) <= x.double().norm(dim=1) / 16 * (1 + 1e-6) + 1e-300).all()
    amax = x.abs().amax(1)
    nonzero = amax > 0
    torch.testing.assert_close(back.abs().amax(1)[nonzero], amax[nonzero], rtol=1e-6, atol=0)
    if zero_row:
        assert torch.equal(back[0], torch.zeros(cols))


def test_conversion_swaps_aligned_frozen_base_layers_and_skips_the_rest():
    """convert_frozen_linears_to_fp8 swaps the base layer of each LoRA layer whose dims are multiples of 16, leaves
    the others (skipped_fp8_layers names them), keeps the LoRA weights trainable and the model's outputs within
    e4m3's error; restore_frozen_linears without a snapshot puts nn.Linear back with the dequantized weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 30), nn.GELU(), nn.Linear(30, 32))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                                  init_lora_weights="gaussian"))
    x = torch.randn(5, 64)
    before = peft_model(x).detach()
    assert fp8.skipped_fp8_layers(model) == ["0", "2", "4"]
    assert convert_frozen_linears_to_fp8(model) == 1
    assert isinstance(model[0].base_layer, FP8FrozenLinear)
    assert fp8.skipped_fp8_layers(model) == ["2", "4"]
    assert all(type(model[i].base_layer) is nn.Linear for i in (2, 4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = peft_model(x)
    assert _rel(after, before) < REL and not torch.equal(after, before)
    after.sum().backward()
    assert model[0].lora_A["default"].weight.grad is not None
    assert convert_frozen_linears_to_fp8(model) == 0  # idempotent
    assert fp8.restore_frozen_linears(model) == 1 and type(model[0].base_layer) is nn.Linear
    assert not model[0].base_layer.weight.requires_grad


def test_fp8_needs_an_fp8_gpu(monkeypatch):
    """On a CUDA device older than compute capability 8.9 the error names --fp8-base."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(VlaBenchError, match="--fp8-base.*8.9"):
        fp8.check_fp8_device(torch.device("cuda", 0))
    fp8.check_fp8_device(torch.device("cpu"))


# ---- a LoRA run on an FP8 base --------------------------------------------------------------------------------------
def test_lora_on_an_fp8_base_learns_saves_only_the_adapter_and_merges_into_the_exact_base(files, tmp_path):
    """`vla-bench finetune --fp8-base --merge` on the CPU: the loss falls, train_config.json records the option and
    the converted layers, checkpoints and the adapter hold LoRA weights only, and the merged snapshot is the base's
    own weights (read back from its files, not the FP8 copies) plus B @ A * alpha / r."""
    from safetensors.torch import load_file

    from vla_bench.openvla.checkpoint import load_snapshot

    root, snap_dir, demos = files
    toml = root / "checkpoints.toml"
    toml.write_text(TOML)
    out = tmp_path / "run"
    assert finetune_main(_args(toml, demos, "fp8", out, 12, "--fp8-base", "--merge", "--save-every", "6",
                               "--no-register")) == 0

    losses = _losses(out)
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 1.0
    config = json.loads((out / "train_config.json").read_text())
    assert config["train"]["fp8_base"] is True and config["train"]["cuda_graph"] is False
    assert config["fp8_layers"]["converted"] > 20
    assert any(name.endswith("lm_head") for name in config["fp8_layers"]["skipped (dims not multiples of 16)"])
    saved = load_file(str(out / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved) and all("lora_" in k for k in adapter)

    base = load_snapshot(snap_dir, device="cpu").model.state_dict()
    merged = load_snapshot(out / "merged", device="cpu").model.state_dict()
    assert merged.keys() == base.keys()
    scale = 32 / 8  # --lora-alpha 32 --lora-rank 8
    checked = 0
    for key, a in adapter.items():
        if ".lora_A." not in key or a.ndim != 2:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", "")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + b @ a * scale, rtol=1e-5,
                                   atol=1e-6)
        checked += 1
    layers = config["fp8_layers"]
    assert checked == layers["converted"] + len(layers["skipped (dims not multiples of 16)"])
    assert not any(torch.equal(merged[k], base[k]) for k in base if k.endswith("mlp.gate_proj.weight"))


def test_fp8_base_under_ddp_follows_the_single_process_curve_without_broadcasting_fp8_weights(tmp_path):
    """`--fp8-base` under torchrun (DDP, 2 gloo processes x micro-batch 2) runs, with the FP8 buffers kept out of
    DDP's buffer broadcasts (gloo cannot even send float8), and starts on the curve of one process x micro-batch 4:
    the first loss is the same (the quantization is per token row, so it does not depend on how the batch is
    split) and so is the second, after one update from gradients that differ only in summation order. Later steps
    part further than without FP8, as they should: a last-bit difference can flip an e4m3 rounding (1/16)."""
    from test_finetune_ddp import _cli_run, _torchrun

    args, single, read_log = _cli_run(tmp_path, 3, "--fp8-base")
    run = _torchrun("-m", "vla_bench.finetune.cli", *args(tmp_path / "ddp", 2))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "train_config.json").read_text())["parallel"] == "ddp"
    assert single(args(tmp_path / "single", 4)) == 0
    ddp, one = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3]
    np.testing.assert_allclose(ddp[0]["train/loss"], one[0]["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(ddp[1]["train/loss"], one[1]["train/loss"], rtol=1e-3)
    assert all(np.isfinite(r["train/loss"]) for r in ddp)


def test_ddp_ignores_exactly_the_fp8_buffers():
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 20))
    get_peft_model(model, LoraConfig(r=2, target_modules=["0", "1"]))
    convert_frozen_linears_to_fp8(model)
    names = fp8.fp8_buffer_names(model)
    assert names == [f"0.base_layer.{b}" for b in ("weight8", "weight8_t", "weight_scale", "unit_scale",
                                                     "weight_stub")]
    assert set(names) <= {n for n, _ in model.named_buffers()}


# ---- what a captured step needs -------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(2, 40), data=st.data())
def test_sync_free_label_positions_equal_the_nonzero_ones(b, t, data):
    """target_columns (a stable sort: fixed shape, no host synchronization) gives, row by row, the labelled columns
    of labels[:, 1:] in the order nonzero() gives them, for any layout with k labelled positions in every row."""
    k = data.draw(st.integers(1, t - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    labels = np.full((b, t), IGNORE_INDEX, np.int64)
    labels[:, 0] = rng.choice([IGNORE_INDEX, 5], size=b)  # column 0 is never a target column
    for row in range(b):
        cols = rng.choice(t - 1, size=k, replace=False) + 1
        labels[row, cols] = rng.integers(0, 32000, size=k)
    labels = torch.from_numpy(labels)
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    got = target_columns(labels, k)
    assert got.shape == (b, k)
    assert torch.equal(got, cols.view(b, k)) and torch.equal(rows.view(b, k), torch.arange(b)[:, None].expand(b, k))
    assert count_targets(labels) == k


def test_count_targets_refuses_ragged_rows():
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2:4] = 1
    labels[1, 2:5] = 1
    with pytest.raises(ValueError, match="same number"):
        count_targets(labels)


def _batch(snap, vla, pad_to=None, eos_loss=True):
    collator = Collator(snap.tokenizer, vla.arch, action_stats(STATS, "toy"), eos_loss=eos_loss, pad_to=pad_to)
    rng = np.random.default_rng(4)
    texts = list(TASKS) + ["pick up the black bowl between the plate and the ramekin and place it on the plate"]
    return collator, texts, collator(rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8), texts,
                                     rng.uniform(-1, 1, (3, 7)))


def test_forward_with_fixed_targets_and_fixed_length_gives_the_same_loss(files):
    """ActionModel with n_target passed (no host sync) gives the loss and metrics bits of the counted path; rows
    padded to the fixed length (fixed_text_length over the instructions) give the same loss up to rounding; the
    collator's n_target follows eos_loss."""
    _, snap_dir, _ = files
    cfg = TrainConfig(base=str(snap_dir), out="unused", unnorm_key="toy", lora_rank=4)
    snap, vla, _ = build_model(cfg, torch.device("cpu"))
    vla.eval()
    model = ActionModel(vla)
    collator, texts, batch = _batch(snap, vla)
    assert batch.n_target == 8 and _batch(snap, vla, eos_loss=False)[2].n_target == 7
    length = fixed_text_length(collator, texts, 7)
    assert length == batch.input_ids.shape[1]  # the longest instruction sets both
    _, _, padded = _batch(snap, vla, pad_to=length + 5)
    assert padded.input_ids.shape[1] == length + 5
    with torch.no_grad():
        loss, m = model(batch.pixel_values, batch.input_ids, batch.labels, 7)
        loss_k, m_k = model(batch.pixel_values, batch.input_ids, batch.labels, 7, batch.n_target)
        loss_p, m_p = model(padded.pixel_values, padded.input_ids, padded.labels, 7, padded.n_target)
    assert torch.equal(loss, loss_k) and torch.equal(m, m_k)
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(m_p[[1, 3, 4]], m[[1, 3, 4]])
    # --cuda-graph's attention (SDPA is_causal, no mask-building step) is the same computation
    assert plain_causal_attention(vla) and vla.language_model.config._attn_implementation == CAUSAL_SDPA
    with torch.no_grad():
        loss_c, m_c = model(batch.pixel_values, batch.input_ids, batch.labels, 7, batch.n_target)
    assert torch.equal(loss_c, loss) and torch.equal(m_c, m)
    with pytest.raises(ValueError, match="fixed length"):
        _batch(snap, vla, pad_to=length - 1)


#: aten ops a CUDA-graph capture cannot contain: reading a device value on the host (a synchronization), shapes that
#: depend on data (nonzero and friends synchronize to size their output), and tensors made from Python data
#: (lift_fresh: torch.tensor(...), a host-to-device copy on CUDA)
CAPTURE_HAZARDS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                   "unique_consecutive", "unique_dim", "is_nonzero", "equal", "lift_fresh", "item"}


class HazardRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                for i in (args[1] if len(args) > 1 else []) if i is not None)
        if name in CAPTURE_HAZARDS or boolean_index:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _step_hazards(files, monkeypatch, cuda_graph: bool, n_target=True) -> list[str]:
    """The trainer's step (forward, backward, clipping) of the tiny model built as `train` builds it (gradient
    checkpointing, FP8 base) under HazardRecorder, with RNG-state reads turned into errors (capture forbids them)."""
    _, snap_dir, _ = files
    cfg = TrainConfig(base=str(snap_dir), out="unused", unnorm_key="toy", lora_rank=4, gradient_checkpointing=True,
                      fp8_base=True, cuda_graph=cuda_graph)
    snap, vla, _ = build_model(cfg, torch.device("cpu"))
    model = ActionModel(vla)
    collator, texts, _ = _batch(snap, vla)
    collator.pad_to = fixed_text_length(collator, texts, 7)
    rng = np.random.default_rng(1)
    batch = collator(rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8), texts[:2], rng.uniform(-1, 1, (2, 7)))
    params = [p for p in model.parameters() if p.requires_grad]

    def no_rng_state(*args, **kwargs):
        raise RuntimeError("RNG state read during the step (illegal in a CUDA-graph capture)")

    monkeypatch.setattr(torch, "get_rng_state", no_rng_state)
    recorder = HazardRecorder()
    with recorder:
        loss, _ = model(batch.pixel_values, batch.input_ids, batch.labels, 7, batch.n_target if n_target else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    return recorder.seen


def test_captured_step_has_no_sync_no_host_copy_and_no_rng_state_read(files, monkeypatch):
    """The step --cuda-graph captures (with --fp8-base and gradient checkpointing) runs no host-synchronizing op, no
    torch.tensor(...) from Python data and no RNG-state read; the recorder is not blind: counting the targets on the
    host is seen, and the default checkpointing (timm's and HF's, preserve_rng_state=True) reads the RNG state."""
    assert _step_hazards(files, monkeypatch, cuda_graph=True) == []
    assert any("_local_scalar_dense" in op for op in _step_hazards(files, monkeypatch, True, n_target=False))
    with pytest.raises(RuntimeError, match="RNG state read"):
        _step_hazards(files, monkeypatch, cuda_graph=False)


def test_capture_safe_checkpointing_recomputes_every_block_and_keeps_names(files, monkeypatch):
    """capture_safe_checkpointing keeps the model's parameter names and state-dict keys and still recomputes every
    ViT block and every Llama layer in the backward pass (each block's MLP runs twice per step)."""
    _, snap_dir, _ = files
    cfg = TrainConfig(base=str(snap_dir), out="unused", unnorm_key="toy", lora_rank=4)
    snap, vla, _ = build_model(cfg, torch.device("cpu"))
    names = [n for n, _ in vla.named_parameters()]
    keys = list(vla.state_dict())
    capture_safe_checkpointing(vla)
    assert [n for n, _ in vla.named_parameters()] == names and list(vla.state_dict()) == keys
    towers = vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer
    assert not any(t.grad_checkpointing for t in towers)
    layers = vla.language_model.model.layers
    calls = {}
    for label, cls in (("vit", type(towers[0].blocks[0].mlp)), ("llama", type(layers[0].mlp))):
        def counted(self, *args, _forward=cls.forward, _label=label, **kwargs):
            calls[_label] = calls.get(_label, 0) + 1
            return _forward(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", counted)
    _, _, batch = _batch(snap, vla)
    loss, _ = ActionModel(vla)(batch.pixel_values, batch.input_ids, batch.labels, 7, batch.n_target)
    ran = dict(calls)
    assert ran["vit"] >= sum(len(t.blocks) for t in towers) - 2 and ran["llama"] == len(layers)
    loss.backward()
    assert calls == {k: 2 * v for k, v in ran.items()}


def test_cuda_graph_refuses_what_it_cannot_capture():
    cfg = TrainConfig(base="b", out="o", unnorm_key="k", cuda_graph=True)
    with pytest.raises(VlaBenchError, match="--cuda-graph: it needs a CUDA device"):
        check_cuda_graph_options(cfg, torch.device("cpu"), 1)
    bad = TrainConfig(base="b", out="o", unnorm_key="k", cuda_graph=True, grad_accum=2, lora_dropout=0.1)
    with pytest.raises(VlaBenchError) as e:
        check_cuda_graph_options(bad, torch.device("cuda"), 2)
    message = str(e.value)
    assert "--grad-accum 2" in message and "several processes (2" in message and "--lora-dropout" in message
    check_cuda_graph_options(TrainConfig(base="b", out="o", unnorm_key="k"), torch.device("cpu"), 4)  # off: no-op


def test_fused_adamw_gives_the_default_adamw_update_and_resume_keeps_this_runs_options():
    """The fused AdamW the trainer uses on CUDA follows the default (foreach) AdamW's trajectory (checked with the
    CPU's fused kernel); after loading a checkpoint written with other options, match_optimizer_options restores
    this run's (load_state_dict takes the checkpoint's)."""
    torch.manual_seed(0)
    start = [torch.randn(33, 7), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    results = []
    for fused in (None, True):
        params = [nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01, fused=fused)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        results.append(([p.detach().clone() for p in params], opt.state_dict()))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    params = [nn.Parameter(p.clone()) for p in start]
    opt = torch.optim.AdamW(params, lr=5e-3, fused=True)
    opt.load_state_dict(results[0][1])  # written by the default optimizer
    assert opt.param_groups[0]["fused"] is None
    match_optimizer_options(opt, fused=True, capturable=False)
    assert opt.param_groups[0]["fused"] is True
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 4 for s in opt.state.values())


# ---- the command line -----------------------------------------------------------------------------------------------
def test_cli_options_reach_the_config_and_cuda_graph_on_cpu_exits_with_its_name(files, tmp_path, capsys):
    import argparse

    root, _, demos = files
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    args = parser.parse_args(["--base", "b", "--data", "d", "--name", "n", "--fp8-base", "--cuda-graph"])
    cfg = config_from_args(args, Path("b"), Path("o"), "k", "openvla")
    assert cfg.fp8_base and cfg.cuda_graph and cfg.to_json()["fp8_base"] and cfg.to_json()["cuda_graph"]
    plain = config_from_args(parser.parse_args(["--base", "b", "--data", "d", "--name", "n"]), Path("b"), Path("o"),
                             "k", "openvla")
    assert not plain.fp8_base and not plain.cuda_graph

    toml = root / "checkpoints.toml"
    toml.write_text(TOML)
    out = tmp_path / "run"
    assert finetune_main(_args(toml, demos, "g", out, 2, "--cuda-graph", "--device", "cpu", "--no-register")) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph" in err and "CUDA device" in err
    assert not out.exists()  # refused before anything was prepared
    assert finetune_main(_args(toml, demos, "f", out, 2, "--fp8-base", "--full", "--no-register")) == 2
    assert "--fp8-base" in capsys.readouterr().err


# ---- the captured step's bookkeeping, with CUDA faked ---------------------------------------------------------------
class _TinyStep(nn.Module):
    """ActionModel's call signature and outputs over a linear model: (loss, [loss*B, 0, 0, B, tokens])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)

    def forward(self, pixel_values, input_ids, labels, n_action, n_target):
        loss = (self.lin(pixel_values) - labels).square().mean()
        b = pixel_values.shape[0]
        return loss, torch.stack([loss.detach() * b, loss.new_zeros(()), loss.new_zeros(()),
                                  loss.new_full((), float(b)), loss.new_full((), float(n_action * b))])


class _FakeCuda:
    """torch.cuda's stream and graph API, faked on the CPU: a "capture" runs its body once (as the first replay of
    a real capture would: together they are one step); each later replay runs the step again from the static
    inputs, its backward writing fresh gradients, as a replayed graph's does. fail: the capture raises, having run
    nothing (as a real failed capture has executed no kernel)."""

    def __init__(self, monkeypatch, fail: bool = False):
        import contextlib

        self.captures, self.replays, self.target, self.fail = 0, 0, None, fail
        fake = self

        class Graph:
            def __init__(self):
                self.first = True

            def replay(self):
                fake.replays += 1
                if self.first:
                    self.first = False
                    return
                fake.target.optimizer.zero_grad(set_to_none=True)
                fake.target.metrics.copy_(fake.target._forward_backward_update())

        @contextlib.contextmanager
        def graph(g):
            fake.captures += 1
            if fake.fail:  # a failed capture ran no kernel: fail before the body has any effect
                raise RuntimeError("operation not permitted when stream is capturing")
            yield

        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        for name, value in {"Stream": stream, "stream": lambda s: contextlib.nullcontext(),
                            "current_stream": lambda: stream(), "CUDAGraph": Graph, "graph": graph,
                            "synchronize": lambda: None, "get_sync_debug_mode": lambda: 0,
                            "set_sync_debug_mode": lambda mode: None}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.zeros(4, 5, dtype=torch.long), torch.randn(4, 3, generator=g))
            for _ in range(n)]


def _reference_metrics(batches, lrs):
    model = _TinyStep()
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], foreach=False)
    out = []
    for batch, lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr
        loss, m = model(*batch, 7, 8)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(m)
    return out, model


def _graphed_run(batches, lrs, fallback=True):
    from vla_bench.finetune.cuda_graph import GraphedTrainStep

    model = _TinyStep()
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], foreach=False)
    opt.param_groups[0]["capturable"] = True  # what GraphedTrainStep checks for (SGD ignores the key)
    step = GraphedTrainStep(model, opt, None, 7, 8, fallback=fallback)
    out = []
    for batch, lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr  # the scheduler's float
        out.append(step(*batch).clone())
        assert isinstance(opt.param_groups[0]["lr"], float)  # the device tensor is only swapped in for capture
        if step.graph is not None:
            assert step._lrs[0].item() == pytest.approx(lr, rel=1e-7)  # float32 on the device
    return out, model, step


def test_graphed_step_warms_up_captures_replays_and_copies_each_batch_in(monkeypatch):
    """GraphedTrainStep (CUDA faked): 3 eager warmup steps, one capture, then replays; each call's batch reaches the
    static inputs and the scheduler's learning rate the device tensor, so the steps are those of a plain loop, step
    for step; close() drops the graph and the gradients it held."""
    fake = _FakeCuda(monkeypatch)
    batches, lrs = _batches(7), [0.1, 0.1, 0.05, 0.05, 0.02, 0.01, 0.01]
    ref, ref_model = _reference_metrics(batches, lrs)
    from vla_bench.finetune import cuda_graph

    original = cuda_graph.GraphedTrainStep._capture_and_replay

    def capture(self):
        fake.target = self
        return original(self)

    monkeypatch.setattr(cuda_graph.GraphedTrainStep, "_capture_and_replay", capture)
    got, model, step = _graphed_run(batches, lrs)
    assert fake.captures == 1 and fake.replays == 4 and step.calls == 7 and step.failure is None
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)
    step.close()
    assert step.graph is None and all(p.grad is None for p in model.parameters())
    step._copy_inputs(batches[0])
    with pytest.raises(ValueError, match="one shape"):  # a batch of another shape cannot reach a captured step
        step._copy_inputs((torch.randn(5, 6), torch.zeros(5, 5, dtype=torch.long), torch.randn(5, 3)))


def test_a_failed_capture_falls_back_to_eager_steps_or_raises(monkeypatch):
    """When the capture fails, no step is lost: with fallback the step is run eagerly, a warning says why, and every
    later step runs eagerly (the same steps as a plain loop); without fallback the error propagates."""
    _FakeCuda(monkeypatch, fail=True)
    batches, lrs = _batches(6), [0.1] * 6
    ref, ref_model = _reference_metrics(batches, lrs)
    with pytest.warns(RuntimeWarning, match="capturing the training step failed.*not permitted"):
        got, model, step = _graphed_run(batches, lrs)
    assert step.graph is None and "not permitted" in step.failure
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="not permitted"):
        _graphed_run(batches, lrs, fallback=False)
    with pytest.raises(VlaBenchError, match="capturable=True"):
        from vla_bench.finetune.cuda_graph import GraphedTrainStep

        GraphedTrainStep(_TinyStep(), torch.optim.SGD(_TinyStep().parameters(), lr=0.1), None, 7, 8)
