"""LoRA fine-tuning throughput and peak memory of the full OpenVLA-7B architecture (random weights) on one GPU, with
the published recipe: LoRA r=32 alpha 16 on the published target set (110.8M trainable), AdamW lr 5e-4, bf16
weights + autocast, micro-batch 16, gradient checkpointing; the trainer's own forward (vla_bench/finetune/train.py).

    .venv/bin/python -m pytest benchmarks/bench_finetune.py --benchmark-only

Anchor (issue 6): 0.25 s per sample, 18 GB on an RTX 4090 (effective batch 16); target on one H100: >= 40
samples/s at <= 24 GB peak. The figures are in the benchmark's extra_info (samples_per_s, peak_gib). Skips without
CUDA.
"""
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = 16
PROMPT_TOKENS = 24  # BOS + a LIBERO instruction in the OpenVLA prompt is ~20-30 Llama-2 tokens
CONFIG = {"timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
          "image_sizes": [224, 224], "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
          "text_config": {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}}


@pytest.fixture(scope="module")
def setup():
    from vla_bench.finetune.collate import IGNORE_INDEX
    from vla_bench.finetune.train import ActionModel, TrainConfig, add_lora, keep_lora_inputs_in_autocast_dtype
    from vla_bench.openvla.model import Arch, OpenVLA

    device = torch.device("cuda")
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
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(3, 31744, (BATCH, PROMPT_TOKENS + 8), generator=g)
    input_ids[:, 0] = 1
    input_ids[:, -8:-1] = torch.randint(31744, 32000, (BATCH, 7), generator=g)
    input_ids[:, -1] = 2
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -8:] = input_ids[:, -8:]
    batch = (torch.randn(BATCH, 6, 224, 224, generator=g).to(device), input_ids.to(device), labels.to(device))
    return model, optimizer, batch, sum(p.numel() for p in params), peft_model


def _train_step(model, optimizer, batch, sync: bool = True):
    """One optimizer step of the recipe on `batch`, as a callable (synchronized when `sync`, for timing)."""
    pixels, ids, labels = batch

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(pixels, ids, labels, 7)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync:
            torch.cuda.synchronize()

    return step


def _measure(benchmark, step, label: str, rounds: int, warmup: int = 2) -> tuple[float, float]:
    """pytest-benchmark over `step` after `warmup` steps (kernels, optimizer state, compiling): (mean seconds per
    step, peak GiB), both also in the benchmark's extra_info, and a printed line."""
    for _ in range(warmup):
        step()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    seconds = benchmark.stats.stats.mean
    peak = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info.update({"samples_per_s": BATCH / seconds, "seconds_per_step": seconds, "peak_gib": peak,
                                 "micro_batch": BATCH, "gpu": torch.cuda.get_device_name()})
    print(f"\n[train] {label}: {BATCH / seconds:.1f} samples/s, {seconds:.3f} s/step, peak {peak:.1f} GiB")
    return seconds, peak


def test_lora_r32_microbatch16_samples_per_second(benchmark, setup):
    """The recipe: the baseline the variants below are read against (same run, same model, same batch)."""
    model, optimizer, batch, trainable, _ = setup
    benchmark.extra_info["trainable_params"] = trainable
    _measure(benchmark, _train_step(model, optimizer, batch), f"recipe, LoRA r=32, micro-batch {BATCH}, grad ckpt, "
             f"{trainable / 1e6:.1f}M trainable", rounds=8)
    assert trainable == 110_828_288


def _print_breakdown(model, optimizer, batch, label: str) -> None:
    """Where a training step's time goes: wall time against the GPU's kernel time (a gap is host-bound launching),
    and the kernels by kind."""
    from bench_openvla import _kernel_table  # one home for the kernel classification

    step = _train_step(model, optimizer, batch, sync=False)
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall = 1000 * (time.perf_counter() - t0)
    count, kinds, top = _kernel_table(step)
    print(f"\n[train profile] {label}, micro-batch {BATCH}: wall {wall:.0f} ms, {count} kernels, "
          f"{sum(kinds.values()):.0f} ms of kernel time")
    print("    " + "  ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for name, ms in top:
        print(f"    {ms:8.2f} ms  {name[:110]}")


def test_lora_step_breakdown(setup):
    """The recipe's step as benchmarked above, broken down."""
    model, optimizer, batch, _, _ = setup
    _print_breakdown(model, optimizer, batch, "recipe")


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


def test_lora_compiled_blocks(benchmark, setup):
    """The recipe with every transformer block torch.compile'd (`vla-bench finetune --compile`), against the
    recipe's figures in the same run. Runs last: it compiles the shared model in place."""
    from vla_bench.finetune.train import compile_blocks

    model, optimizer, batch, _, _ = setup
    step = _train_step(model, optimizer, batch)
    t0 = time.perf_counter()
    n = compile_blocks(model.vla)
    step()  # compiles
    compile_s = time.perf_counter() - t0
    benchmark.extra_info["compile_s"] = compile_s
    _measure(benchmark, step, f"compiled ({n} blocks, {compile_s:.0f} s to compile)", rounds=5, warmup=1)


def test_lora_compiled_step_breakdown(setup):
    """The compiled step (after test_lora_compiled_blocks), broken down like the recipe's: what compiling left."""
    from vla_bench.finetune.train import transformer_blocks

    model, optimizer, batch, _, _ = setup
    if not any(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl for b in transformer_blocks(model.vla)):
        pytest.skip("runs after test_lora_compiled_blocks")
    _print_breakdown(model, optimizer, batch, "compiled")
