"""`vla-bench finetune` on a tiny OpenVLA: the training forward agrees with inference, the augmentation is the
reference's, a short LoRA run lowers the loss and yields a candidate entry that the registry loads and runs next to
an untouched base, and a run killed mid-way resumes onto the very same loss curve."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_bench.data.libero_hdf5 import write_libero_demos
from vla_bench.finetune import augment
from vla_bench.finetune.cli import main as finetune_main
from vla_bench.finetune.collate import IGNORE_INDEX, Collator
from vla_bench.finetune.config import TrainConfig
from vla_bench.finetune.examples import Examples, make_batch
from vla_bench.finetune.model import ActionModel, build_model
from vla_bench.openvla import action_tokenizer, checkpoint, image, tiny
from vla_bench.openvla.frames import center_crop
from vla_bench.openvla.normalization import action_stats
from vla_bench.openvla.prompt import build_prompt

REPO = Path(__file__).resolve().parents[1]
TASKS = {"put the bowl on the stove": [0.6, -0.4, 0.2, 0.0, 0.1, -0.2, -1.0],
         "close the microwave": [-0.5, 0.5, -0.3, 0.2, -0.1, 0.3, 1.0]}
TOML = """# checkpoints for the finetune tests
default = "tiny-base"   # the tiny random OpenVLA

# the base model: a tiny snapshot in the published layout
[checkpoints.tiny-base]
kind = "openvla"
source = "snap"   # relative to this file
"""
STATS = {"toy": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}}}


def _demos(folder: Path, n_demos: int = 3, steps: int = 10, size: int = 64) -> Path:
    """Per task, demos whose frames are a task-coloured image with noise and whose actions are the task's action
    plus noise, in LIBERO's raw convention (gripper -1 open / +1 close): a mapping a tiny model can learn."""
    rng = np.random.default_rng(0)
    for k, (text, action) in enumerate(TASKS.items()):
        episodes = []
        for _ in range(n_demos):
            base = np.full((steps, size, size, 3), 60 + 120 * k, np.uint8)
            frames = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
            noise = rng.normal(0, 0.03, (steps, 7))
            noise[:, 6] = 0.0
            acts = np.tile(action, (steps, 1)) + noise
            episodes.append({"actions": acts, "obs": {"agentview_rgb": frames}})
        write_libero_demos(folder / f"SCENE1_{text.replace(' ', '_')}_demo.hdf5", episodes, text)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tok = tiny.build_tokenizer(root / "tok")
    snap = tiny.write_tiny_snapshot(root / "snap", tok, seed=0)
    demos = _demos(root / "demos" / "libero_spatial")
    return root, snap, demos


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _args(toml, demos, name, out, steps, *extra):
    return ["--checkpoints-file", str(toml), "--base", "tiny-base", "--data", str(demos), "--name", name,
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--lr", "2e-2", "--lora-rank", "8", "--lora-alpha", "32",
            "--log-every", "1", "--eval-every", "4", "--eval-batches", "2", "--no-progress", "--workers", "0",
            "--seed", "3", *extra]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _log(out) if "train/loss" in r}


# ---- pieces -------------------------------------------------------------------------------------------------------
def test_augmentation_crop_is_tf_crop_and_resize_and_neutral_params_change_nothing():
    """The random crop at the centred offset equals the evaluation center crop (openvla/frames.py center_crop, TensorFlow's
    crop_and_resize arithmetic) to the uint8 level; zero brightness/hue and unit contrast/saturation are the
    identity; parameters depend only on the generator's seed and stay in the published ranges."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    side = np.sqrt(0.9)
    centred = torch.tensor([[(1 - side) / 2, (1 - side) / 2, 0.0, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    ours = augment.to_uint8_levels(augment.apply(x, centred)).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - center_crop(frames[i]).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    no_crop = augment.AugmentConfig(crop_area=1.0)
    neutral = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    assert torch.allclose(augment.apply(x, neutral, no_crop), x, atol=1e-5)
    p1 = augment.sample_params(augment.PUBLISHED, torch.Generator().manual_seed(5))
    p2 = augment.sample_params(augment.PUBLISHED, torch.Generator().manual_seed(5))
    assert torch.equal(p1, p2)
    ps = torch.stack([augment.sample_params(augment.PUBLISHED, torch.Generator().manual_seed(s)) for s in range(200)])
    assert ps[:, :2].min() >= 0 and ps[:, :2].max() <= 1 - side + 1e-9
    assert ps[:, 2].abs().max() <= 0.2 and ps[:, 5].abs().max() <= 0.05
    assert ps[:, 3].min() >= 0.8 and ps[:, 3].max() <= 1.2 and ps[:, 4].min() >= 0.8 and ps[:, 4].max() <= 1.2
    jittered = augment.apply(x, ps[:2])
    assert not torch.allclose(jittered, x, atol=1e-2)


def test_lora_inputs_kept_in_bf16_under_autocast_give_the_same_loss_and_gradients(files):
    """Turning off peft's cast of each LoRA input to the adapters' fp32 (keep_lora_inputs_in_autocast_dtype, a
    speed-up) changes no bit of the loss or of any adapter gradient under bf16 autocast: autocast casts the input
    straight back to bf16 for the matmul, and bf16 -> fp32 -> bf16 is exact."""
    from vla_bench.finetune.model import keep_lora_inputs_in_autocast_dtype

    _, snap_dir, _ = files
    cfg = TrainConfig(base=str(snap_dir), out="unused", unnorm_key="toy", lora_rank=4, bf16=False)
    snap, vla, peft_model = build_model(cfg, torch.device("cpu"))
    vla.to(torch.bfloat16)
    for name, param in vla.named_parameters():  # adapters in fp32 over a bf16 base, as on the GPU
        if param.requires_grad:
            param.data = param.data.float()
    model = ActionModel(vla)
    collator = Collator(snap.tokenizer, vla.arch, action_stats(STATS, "toy"))
    rng = np.random.default_rng(4)
    batch = collator(rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8), list(TASKS), rng.uniform(-1, 1, (2, 7)))

    def loss_and_grads():
        vla.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(batch.pixel_values, batch.input_ids, batch.labels, batch.n_action)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in vla.named_parameters() if p.grad is not None}

    loss_cast, grads_cast = loss_and_grads()
    assert keep_lora_inputs_in_autocast_dtype(peft_model) > 0
    loss_kept, grads_kept = loss_and_grads()
    assert torch.equal(loss_cast, loss_kept)
    assert grads_cast.keys() == grads_kept.keys() and len(grads_kept) > 0
    assert any(g.abs().sum() > 0 for g in grads_kept.values())
    for name in grads_cast:
        assert torch.equal(grads_cast[name], grads_kept[name]), name


def test_compile_blocks_compiles_every_tower_block_and_decoder_layer_and_nothing_else(files):
    """`--compile` wraps each ViT block of both towers and each Llama decoder layer (the units FSDP shards too),
    and leaves the prefix splice, the projector and the LM head eager (compiling is lazy: no forward runs here)."""
    from vla_bench.finetune.model import compile_blocks, transformer_blocks

    _, snap_dir, _ = files
    cfg = TrainConfig(base=str(snap_dir), out="unused", unnorm_key="toy", lora_rank=4)
    _, vla, _ = build_model(cfg, torch.device("cpu"))
    blocks = transformer_blocks(vla)
    towers = vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer
    assert len(blocks) == sum(len(t.blocks) for t in towers) + len(vla.language_model.model.layers)
    assert compile_blocks(vla) == len(blocks)
    compiled = {id(m) for m in vla.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {id(b) for b in blocks}


def test_labels_cover_action_tokens_and_training_forward_matches_inference(files):
    """Labels are -100 except the 7 action tokens and EOS; the training forward (right-padded rows, causal
    attention, patches after BOS, LM head only at target positions) gives the logits and loss of the inference
    path (model.build_prefix: left-padded rows, explicit mask), and its first action position equals greedy
    decoding's first step."""
    import torch.nn.functional as F

    _, snap_dir, _ = files
    cfg = TrainConfig(base=str(snap_dir), out="unused", unnorm_key="toy", lora_rank=4)
    snap, vla, _ = build_model(cfg, torch.device("cpu"))
    vla.eval()
    collator = Collator(snap.tokenizer, vla.arch, action_stats(STATS, "toy"))
    texts = list(TASKS) + ["pick up the black bowl between the plate and the ramekin and place it on the plate"]
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, (3, 7))
    actions[:, 6] = [0.0, 1.0, 1.0]
    batch = collator(frames, texts, actions)
    pixels = image.to_pixel_values(list(frames), vla.arch.timm_model_ids)
    assert torch.equal(batch.pixel_values, pixels)
    prompts = [snap.tokenizer.encode(build_prompt(t)) for t in texts]
    action_ids = collator.action_ids(actions)
    assert ((action_ids >= vla.arch.action_vocab_size - 256) & (action_ids < vla.arch.action_vocab_size)).all()
    for i, p in enumerate(prompts):
        row = batch.labels[i]
        assert row[row != IGNORE_INDEX].tolist() == action_ids[i].tolist() + [collator.eos_id]
        assert (row[: len(p)] == IGNORE_INDEX).all() and batch.input_ids[i, : len(p)].tolist() == p

    with torch.no_grad():
        loss, m = ActionModel(vla)(batch.pixel_values, batch.input_ids, batch.labels, batch.n_action)
        prefix = vla.build_prefix(pixels, [p + a.tolist() for p, a in zip(prompts, action_ids)])
        seq = prefix.key_valid.shape[1]
        ref = vla.language_model(inputs_embeds=prefix.embeds, attention_mask=vla._mask(prefix.key_valid, seq, seq),
                                 position_ids=prefix.positions).logits[:, -8:]  # predict a1..a7, EOS
        targets = torch.cat([torch.as_tensor(action_ids), torch.full((3, 1), collator.eos_id)], 1)
        torch.testing.assert_close(loss, F.cross_entropy(ref.reshape(24, -1), targets.reshape(-1)), atol=1e-4,
                                   rtol=1e-5)
        correct = (ref[:, :7].argmax(-1) == targets[:, :7]).sum().item()
        assert m[1].item() == correct and m[4].item() == 21 and m[3].item() == 3
        _, first = vla.generate(pixels, prompts, max_new_tokens=1, return_logits=True)
        torch.testing.assert_close(first[:, 0], ref[:, 0], atol=1e-4, rtol=1e-4)


# ---- the command --------------------------------------------------------------------------------------------------
def test_finetune_lowers_loss_writes_candidate_and_leaves_the_base_untouched(files, tmp_path):
    from vla_bench.policies import BuildContext, ModelCache, build_policy
    from vla_bench.registry import Registry

    root, snap_dir, demos = files
    toml = root / "checkpoints.toml"
    toml.write_text(TOML)
    obs = [{"agentview_image": np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)}
           for i in range(2)]
    texts = list(TASKS)
    reg = Registry.load(toml)
    before = build_policy(reg.get("tiny-base"), BuildContext(reg, "libero_spatial", ModelCache())).infer(
        obs, texts, return_logits=True)
    snap_digest = _digest(snap_dir)

    out = tmp_path / "run"
    assert finetune_main(_args(toml, demos, "cand", out, 12, "--merge")) == 0

    losses = _losses(out)
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 2.0
    log = _log(out)
    assert log[0]["step"] == 0 and log[-1]["step"] == 12  # held-out figures of the base, then of the candidate
    assert {"val/loss", "val/accuracy", "val/l1"} <= set(log[-1])
    assert log[-1]["val/loss"] < log[0]["val/loss"] - 2.0
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/dataset_statistics.json",
              "dataset_statistics.json", "train_config.json", "curves.png", "merged/config.json"):
        assert (out / f).is_file(), f
    stats = json.loads((out / "dataset_statistics.json").read_text())
    assert list(stats) == ["libero_spatial_no_noops"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["train"]["lora_rank"] == 8 and config["data"]["noop_filter"]["enabled"]

    text = toml.read_text()
    assert text.startswith(TOML.rstrip("\n"))  # comments, order and the old entry survive the write-back
    assert "# vla-bench finetune" in text
    reg = Registry.load(toml)
    spec = reg.get("cand")
    assert spec.options["base"] == "tiny-base" and spec.options["unnorm_key"] == "libero_spatial_no_noops"
    assert spec.baseline == "tiny-base" and spec.resolve_path(spec.options["adapter"]) == (out / "adapter").resolve()

    cache = ModelCache()
    context = BuildContext(reg, "libero_spatial", cache)
    base = build_policy(reg.get("tiny-base"), context)
    cand = build_policy(spec, context)
    assert cache.loads == 1  # the candidate shares the base model
    cand_out = cand.infer(obs, texts, return_logits=True)
    base_out = base.infer(obs, texts, return_logits=True)
    # the base weights are untouched (digest) and the base's actions identical; its logits pass through peft's
    # disabled-adapter path, whose kernels may sum in another order (measured: within 1e-5 on torch 2.14 / peft 0.21)
    assert np.array_equal(base_out.actions, before.actions)
    torch.testing.assert_close(base_out.logits, before.logits, rtol=0, atol=1e-5)
    assert _digest(snap_dir) == snap_digest
    assert cand_out.actions.shape == (2, 7) and not torch.equal(cand_out.logits, before.logits)

    merged = checkpoint.load_snapshot(out / "merged", device="cpu").model
    pixels = image.to_pixel_values(cand_out.frames, merged.arch.timm_model_ids)
    prompts = [base.base.snapshot.tokenizer.encode(build_prompt(t)) for t in texts]
    _, merged_logits = merged.generate(pixels, prompts, return_logits=True)
    torch.testing.assert_close(merged_logits, cand_out.logits, atol=1e-3, rtol=1e-3)


def test_resume_after_kill_continues_the_same_loss_curve(files, tmp_path):
    """A run SIGKILLed after its step-4 checkpoint and started again ends with the loss curve of a run that was
    never interrupted, step for step."""
    root, _, demos = files
    toml = tmp_path / "checkpoints.toml"
    toml.write_text(TOML.replace('"snap"', f'"{root / "snap"}"'))
    steps = ("--save-every", "4", "--no-register")
    # every run is a fresh subprocess with the same thread settings, so no state left by earlier tests in this
    # process (thread pools, RNG streams) can make the reference differ from the resumed run
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, "-m", "vla_bench.finetune.cli"]
    reference = tmp_path / "reference"
    done = subprocess.run([*command, *_args(toml, demos, "ref", reference, 10, *steps)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, *_args(toml, demos, "k", killed, 10, *steps)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "log.jsonl").is_file() and max(_losses(killed), default=0) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists() and (killed / "checkpoints" / "latest").read_text().strip().endswith("4")
    assert max(_losses(killed)) >= 6

    resumed = subprocess.run([*command, *_args(toml, demos, "k", killed, 10, *steps)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-5)


def test_published_lora_targets_reproduce_the_reference_parameter_count():
    """On the full 7.5B architecture (built on the meta device, no memory), "published" targets wrap what peft
    0.11's all-linear wrapped in the reference run, patch-embedding convs and lm_head included: 110,828,288
    trainable LoRA parameters at r=32 (OPENVLA.md §5)."""
    from peft import LoraConfig, get_peft_model

    from vla_bench.finetune.model import lora_targets
    from vla_bench.openvla.model import Arch, OpenVLA

    config = {"timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
              "image_sizes": [224, 224], "arch_specifier": "no-align+fused-gelu-mlp",
              "use_fused_vision_backbone": True,
              "text_config": {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}}
    with torch.device("meta"):
        model = OpenVLA(Arch.from_config(config))
        assert sum(p.numel() for p in model.parameters()) == 7_541_237_184
        peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian",
                                                      target_modules=lora_targets(model, "published")))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 110_828_288
