"""LoRA fine-tuning throughput and peak memory of the full OpenVLA-7B architecture (random weights) on one GPU, with
the published recipe: LoRA r=32 alpha 16 on the published target set (110.8M trainable), AdamW lr 5e-4 (fused, as
the trainer builds it on CUDA), bf16 weights + autocast, micro-batch 16, gradient checkpointing; the trainer's own
forward (vla_bench/finetune/model.py).

    python3 -m pytest benchmarks/bench_fp8_cuda.py benchmarks/bench_finetune.py -s    # sanity first, then this

Anchor (issue 6): 0.25 s per sample, 18 GB on an RTX 4090 (effective batch 16); target on one H100: >= 40
samples/s at <= 24 GB peak. Each measurement prints `[train] <label>: X samples/s, Y s/step, peak Z GiB (reserved R
GiB)` as it finishes, and keeps the figures in the benchmark's extra_info. Skips without CUDA.

The tests share one model and change it in place, in this order (each later test first puts the model in the
state it needs, so one that fails, or one deselected with -k, does not stop the next):
  recipe -> recipe breakdown -> one-choice variants -> compiled (`--compile`) -> compiled breakdown
  -> compiled + fp8-base (`--fp8-base`: frozen base linears in FP8) -> its breakdown
  -> compiled + fp8-base + cuda-graph (`--cuda-graph`: the whole step one CUDA graph) -> its breakdown
  -> compiled + cuda-graph (the bf16 base put back, dequantized: timing only, the weights are random anyway)
Select with -k, e.g. `-k "fp8 or cuda_graph"` (the new variants only: they compile what they need themselves),
`-k fp8_base_cuda_graph` (the target configuration alone), `-k "not breakdown"`.

Measured on one H100 (2026-11-22, one run, samples/s and peak allocated): recipe 17.5 (18.1 GiB); compiled 24.7
(18.2); compiled + fp8-base 24.6 (18.3); compiled + cuda-graph 36.5 (18.7); compiled + fp8-base + cuda-graph 45.6
(18.6, 20.8 reserved). The README has the table.

Memory: "peak" is torch.cuda.max_memory_allocated over the measured steps; for a CUDA-graph variant it runs from
before the eager warmup and the capture, because during replay the graph's private pool holds its intermediates
as reserved, not allocated, memory; "reserved" (after the rounds, eager leftovers emptied from the cache) is what
the process then holds on the device.
"""
import gc
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = 16
N_ACTION, N_TARGET = 7, 8  # 7 action tokens + EOS are labelled in every row
PROMPT_TOKENS = 24  # BOS + a LIBERO instruction in the OpenVLA prompt is ~20-30 Llama-2 tokens
CONFIG = {"timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
          "image_sizes": [224, 224], "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
          "text_config": {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}}
ROUNDS = 5


def say(text: str) -> None:
    print(text, flush=True)


@pytest.fixture(scope="module")
def setup():
    from vla_bench.finetune.collate import IGNORE_INDEX
    from vla_bench.finetune.config import TrainConfig
    from vla_bench.finetune.model import ActionModel, add_lora, keep_lora_inputs_in_autocast_dtype, make_optimizer
    from vla_bench.openvla.model import Arch, OpenVLA

    # the model is recompiled after each in-place change (FP8 layers, capture-safe checkpointing): dynamo's default
    # of 8 compiled versions per code object (all blocks share Module._call_impl's) would silently fall back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    device = torch.device("cuda")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # frozen base in bf16, as the reference loads it
    try:
        with device:
            vla = OpenVLA(Arch.from_config(CONFIG))
    finally:
        torch.set_default_dtype(default)
    cfg = TrainConfig(base="random", out="unused", unnorm_key="x", gradient_checkpointing=True)
    peft_model = add_lora(vla, cfg, "random")
    keep_lora_inputs_in_autocast_dtype(peft_model)  # as build_model does under bf16 autocast
    vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vla.vision_backbone.featurizer.set_grad_checkpointing(True)
    vla.vision_backbone.fused_featurizer.set_grad_checkpointing(True)
    vla.train()
    model = ActionModel(vla).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device, sharded=False)
    g = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(3, 31744, (BATCH, PROMPT_TOKENS + 8), generator=g)
    input_ids[:, 0] = 1
    input_ids[:, -8:-1] = torch.randint(31744, 32000, (BATCH, 7), generator=g)
    input_ids[:, -1] = 2
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -8:] = input_ids[:, -8:]
    batch = (torch.randn(BATCH, 6, 224, 224, generator=g).to(device), input_ids.to(device), labels.to(device))
    say(f"\n[train] setup: OpenVLA-7B (random bf16 weights) + LoRA in {time.perf_counter() - t0:.0f} s, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, {torch.cuda.get_device_name()}")
    return model, optimizer, batch, sum(p.numel() for p in params), peft_model


def _train_step(model, optimizer, batch, sync: bool = True):
    """One optimizer step of the recipe on `batch`, as a callable (synchronized when `sync`, for timing)."""
    pixels, ids, labels = batch

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(pixels, ids, labels, N_ACTION, N_TARGET)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync:
            torch.cuda.synchronize()

    return step


def _fresh_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _measure(benchmark, step, label: str, rounds: int, warmup: int = 2, reset_peak: bool = True):
    """pytest-benchmark over `step` after `warmup` steps (kernels, optimizer state, compiling): (mean seconds per
    step, peak GiB), both also in the benchmark's extra_info, and a printed line. reset_peak=False: the peak counts
    from the caller's last reset (a graph variant's warmup and capture)."""
    for _ in range(warmup):
        step()
    if reset_peak:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    seconds = benchmark.stats.stats.mean
    peak = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.memory_reserved() / 2**30
    benchmark.extra_info.update({"samples_per_s": BATCH / seconds, "seconds_per_step": seconds, "peak_gib": peak,
                                 "reserved_gib": reserved, "micro_batch": BATCH, "gpu": torch.cuda.get_device_name()})
    say(f"\n[train] {label}: {BATCH / seconds:.1f} samples/s, {seconds:.3f} s/step, peak {peak:.1f} GiB "
        f"(reserved {reserved:.1f} GiB)")
    return seconds, peak


def test_lora_r32_microbatch16_samples_per_second(benchmark, setup):
    """The recipe: the baseline the variants below are read against (same run, same model, same batch)."""
    model, optimizer, batch, trainable, _ = setup
    benchmark.extra_info["trainable_params"] = trainable
    _measure(benchmark, _train_step(model, optimizer, batch), f"recipe, LoRA r=32, micro-batch {BATCH}, grad ckpt, "
             f"{trainable / 1e6:.1f}M trainable", rounds=8)
    assert trainable == 110_828_288


def _print_breakdown(step, label: str) -> None:
    """Where a training step's time goes: wall time against the GPU's kernel time (a gap is host-bound launching),
    and the kernels by kind. `step` runs one unsynchronized step."""
    from bench_openvla import _kernel_table  # one home for the kernel classification

    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall = 1000 * (time.perf_counter() - t0)
    count, kinds, top = _kernel_table(step)
    say(f"\n[train profile] {label}, micro-batch {BATCH}: wall {wall:.0f} ms, {count} kernels, "
        f"{sum(kinds.values()):.0f} ms of kernel time")
    say("    " + "  ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for name, ms in top:
        say(f"    {ms:8.2f} ms  {name[:110]}")


def test_lora_step_breakdown(setup):
    """The recipe's step as benchmarked above, broken down."""
    model, optimizer, batch, _, _ = setup
    _print_breakdown(_train_step(model, optimizer, batch, sync=False), "recipe")


@pytest.mark.parametrize("variant", ["peft-input-cast", "checkpoint-language-only", "checkpoint-none"])
def test_lora_variants(benchmark, setup, variant):
    """The recipe with one choice changed, against the recipe's figures in the same run: peft's own fp32 cast of
    every LoRA input (what keep_lora_inputs_in_autocast_dtype turns off), or less recomputation (speed bought with
    memory; the target caps peak memory at 24 GB)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, optimizer, batch, _, _ = setup
    vla = model.vla
    towers = [vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer]
    lora_layers = [m for m in vla.modules() if isinstance(m, BaseTunerLayer)]
    if variant == "peft-input-cast":
        for m in lora_layers:
            m.cast_input_dtype_enabled = True
    else:
        for t in towers:
            t.set_grad_checkpointing(False)
        if variant == "checkpoint-none":
            vla.language_model.gradient_checkpointing_disable()
    try:
        _measure(benchmark, _train_step(model, optimizer, batch), variant, rounds=5, warmup=1)
    finally:
        for m in lora_layers:
            m.cast_input_dtype_enabled = False
        for t in towers:
            t.set_grad_checkpointing(True)
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- the model's states, each put in place by the tests that need it ------------------------------------------------
def _is_compiled(vla) -> bool:
    from vla_bench.finetune.model import transformer_blocks

    return any(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(vla))


def _ensure_compiled(vla) -> int:
    from vla_bench.finetune.model import compile_blocks, transformer_blocks

    return len(transformer_blocks(vla)) if _is_compiled(vla) else compile_blocks(vla)


def _has_fp8(vla) -> bool:
    from vla_bench.finetune.fp8 import FP8FrozenLinear

    return any(isinstance(m, FP8FrozenLinear) for m in vla.modules())


def _ensure_base(vla, fp8: bool) -> None:
    """The frozen base in FP8 (convert_frozen_linears_to_fp8, as --fp8-base does) or in bf16 (restored from the FP8
    copies: random weights, so the timing is the same). Compiled code is dropped first: every block recompiles for
    the new layers anyway, and old cache entries could keep the replaced modules (and their weights) alive."""
    from vla_bench.finetune.fp8 import convert_frozen_linears_to_fp8, restore_frozen_linears, skipped_fp8_layers

    if _has_fp8(vla) == fp8:
        return
    torch._dynamo.reset()
    _fresh_memory()
    before = torch.cuda.memory_allocated() / 2**30
    t0 = time.perf_counter()
    if fp8:
        n = convert_frozen_linears_to_fp8(vla)
        what = f"{n} frozen linears to FP8 ({len(skipped_fp8_layers(vla))} skipped)"
    else:
        n = restore_frozen_linears(vla)
        what = f"{n} frozen linears back to bf16 (dequantized)"
    _fresh_memory()
    say(f"\n[train] {what} in {time.perf_counter() - t0:.1f} s: allocated {before:.2f} -> "
        f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB")


def _ensure_graph_ready(vla) -> None:
    """What --cuda-graph's build_model does: capture-safe checkpointing and attention without a mask-building step
    (both idempotent; the same math, so later eager variants measure the same step)."""
    from vla_bench.finetune.cuda_graph import capture_safe_checkpointing, plain_causal_attention

    if not plain_causal_attention(vla):
        say("[train] warning: this transformers version builds an attention mask inside the captured step")
    capture_safe_checkpointing(vla)


def test_lora_compiled_blocks(benchmark, setup):
    """The recipe with every transformer block torch.compile'd (`vla-bench finetune --compile`), against the
    recipe's figures in the same run. Compiles the shared model in place."""
    model, optimizer, batch, _, _ = setup
    step = _train_step(model, optimizer, batch)
    t0 = time.perf_counter()
    n = _ensure_compiled(model.vla)
    step()  # compiles
    compile_s = time.perf_counter() - t0
    benchmark.extra_info["compile_s"] = compile_s
    _measure(benchmark, step, f"compiled ({n} blocks, {compile_s:.0f} s to compile)", rounds=ROUNDS, warmup=1)


def test_lora_compiled_step_breakdown(setup):
    """The compiled step (after test_lora_compiled_blocks), broken down like the recipe's: what compiling left."""
    model, optimizer, batch, _, _ = setup
    if not _is_compiled(model.vla) or _has_fp8(model.vla):
        pytest.skip("runs after test_lora_compiled_blocks")
    _print_breakdown(_train_step(model, optimizer, batch, sync=False), "compiled")


def test_lora_compiled_fp8_base(benchmark, setup):
    """Compiled blocks over an FP8 frozen base (`--compile --fp8-base`): the frozen GEMMs (forward and input
    gradient) in FP8 with row-wise scales, the bf16 weights freed before the measurement."""
    model, optimizer, batch, _, _ = setup
    _ensure_base(model.vla, fp8=True)
    n = _ensure_compiled(model.vla)
    step = _train_step(model, optimizer, batch)
    t0 = time.perf_counter()
    step()  # compiles the FP8 blocks
    compile_s = time.perf_counter() - t0
    benchmark.extra_info["compile_s"] = compile_s
    _measure(benchmark, step, f"compiled + fp8-base ({n} blocks, {compile_s:.0f} s to compile)", rounds=ROUNDS,
             warmup=1)


def test_lora_compiled_fp8_base_step_breakdown(setup):
    model, optimizer, batch, _, _ = setup
    if not (_is_compiled(model.vla) and _has_fp8(model.vla)):
        pytest.skip("runs after test_lora_compiled_fp8_base")
    _print_breakdown(_train_step(model, optimizer, batch, sync=False), "compiled + fp8-base")


def _graphed(setup, label: str):
    """A GraphedTrainStep over the shared model with its own capturable fused AdamW (the recipe's optimizer state is
    dropped first, so memory compares), primed (warmup steps and the capture) inside a fresh peak-memory window."""
    from vla_bench.finetune.cuda_graph import GraphedTrainStep
    from vla_bench.finetune.config import TrainConfig
    from vla_bench.finetune.model import make_optimizer

    model, optimizer, batch, _, _ = setup
    optimizer.state.clear()
    cfg = TrainConfig(base="random", out="unused", unnorm_key="x", gradient_checkpointing=True, cuda_graph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    graph_optimizer = make_optimizer(params, cfg, torch.device("cuda"), sharded=False)
    graphed = GraphedTrainStep(model, graph_optimizer, torch.bfloat16, N_ACTION, N_TARGET, fallback=False)
    _fresh_memory()
    t0 = time.perf_counter()
    for _ in range(graphed.warmup + 1):  # eager warmup steps (compiling what is new), then capture + replay
        graphed(*batch)
    torch.cuda.synchronize()
    say(f"\n[train] {label}: {graphed.warmup} warmup steps + capture in {time.perf_counter() - t0:.0f} s")
    gc.collect()
    torch.cuda.empty_cache()  # the eager warmup's cached blocks; the graph's pool stays

    def step():
        graphed(*batch)
        torch.cuda.synchronize()

    return graphed, step


def _run_graphed(benchmark, setup, label: str, breakdown: bool = False) -> None:
    graphed, step = _graphed(setup, label)
    try:
        assert graphed.graph is not None, graphed.failure
        _measure(benchmark, step, label, rounds=ROUNDS, warmup=0, reset_peak=False)
        if breakdown:
            _print_breakdown(lambda: graphed(*setup[2]), label)
    finally:
        graphed.close()
        del graphed
        _fresh_memory()


def test_lora_compiled_fp8_base_cuda_graph(benchmark, setup):
    """The target configuration (`--compile --fp8-base --cuda-graph`): forward, backward and the fused capturable
    AdamW of the compiled FP8 step captured once and replayed; broken down after the measurement."""
    model = setup[0]
    _ensure_base(model.vla, fp8=True)
    _ensure_compiled(model.vla)
    _ensure_graph_ready(model.vla)
    _run_graphed(benchmark, setup, "compiled + fp8-base + cuda-graph", breakdown=True)


def test_lora_compiled_cuda_graph(benchmark, setup):
    """`--compile --cuda-graph` over the bf16 base: what the graph alone gives."""
    model = setup[0]
    _ensure_base(model.vla, fp8=False)
    _ensure_compiled(model.vla)
    _ensure_graph_ready(model.vla)
    _run_graphed(benchmark, setup, "compiled + cuda-graph")
