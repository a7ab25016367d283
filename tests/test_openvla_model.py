"""The native OpenVLA model on a tiny configuration: published layout written and loaded back, batched greedy
decoding equal to one-at-a-time decoding, the policy's chain, and the errors a user can cause."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vla_bench.errors import VlaBenchError
from vla_bench.openvla import checkpoint, frames, image, tiny
from vla_bench.openvla.lora import BaseModel
from vla_bench.openvla.fast_generator import FastGenerator
from vla_bench.openvla.model import _patch_features
from vla_bench.openvla.policy import OpenVLAPolicy
from vla_bench.openvla.prompt import build_prompt

INSTRUCTIONS = ["put the bowl on the stove", "close the microwave door",
                "pick up the black bowl between the plate and the ramekin and place it on the plate",
                "turn on the stove now"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvla")
    tok = tiny.build_tokenizer(root / "tok")
    snap = tiny.write_tiny_snapshot(root / "snap", tok, seed=0)
    return root, tok, snap


@pytest.fixture(scope="module")
def snapshot(files):
    return checkpoint.load_snapshot(files[2], device="cpu")


def _frames(n, seed=0, size=224):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _inputs(snapshot, n, seed=0):
    pv = image.to_pixel_values(_frames(n, seed), snapshot.model.arch.timm_model_ids)
    return pv, [snapshot.tokenizer.encode(build_prompt(t)) for t in INSTRUCTIONS[:n]]


def _copy(files, tmp_path):
    dst = tmp_path / "snap"
    shutil.copytree(files[2], dst)
    return dst


# ---- layout -------------------------------------------------------------------------------------------------------
def test_written_snapshot_has_the_published_layout(files):
    """The writer produces config.json with norm_stats, sharded safetensors with an index, the tokenizer, and the
    published key names: LayerScale as scale_factor, towers under vision_backbone.featurizer/fused_featurizer,
    projector fc1..fc3, Llama under language_model, SigLIP's unused MAP head kept."""
    snap = files[2]
    config = json.loads((snap / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["arch_specifier"] == "no-align+fused-gelu-mlp"
    assert "libero_spatial_no_noops" in config["norm_stats"]
    keys = json.loads((snap / checkpoint.INDEX).read_text())["weight_map"]
    assert len(set(keys.values())) > 1 and (snap / "tokenizer.json").is_file()
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert not any(k.endswith(".gamma") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"vision_backbone", "projector", "language_model"}
    assert {"projector.fc3.weight", "language_model.lm_head.weight", "vision_backbone.featurizer.reg_token",
            "vision_backbone.fused_featurizer.attn_pool.latent"} <= set(keys)


def test_full_architecture_matches_the_published_model():
    """Built from openvla-7b's config fields (on the meta device, no memory), the model has the reference's
    7,541,237,184 parameters, Llama eps 1e-6 and 2048 positions, and action ids counting down from 32000."""
    from vla_bench.openvla.model import OPENVLA_7B_CONFIG, Arch, OpenVLA

    arch = Arch.from_config(OPENVLA_7B_CONFIG)
    with torch.device("meta"):
        model = OpenVLA(arch)
    assert sum(p.numel() for p in model.parameters()) == 7_541_237_184
    cfg = model.language_model.config
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.vocab_size) == (1e-6, 2048, 32064)
    assert arch.action_vocab_size == 32000 and model.num_patches == 256
    assert model.vision_backbone.embed_dim == 2176 and model.projector.fc1.out_features == 8704


def test_round_trip_is_bit_exact(files, snapshot):
    """Loading a written snapshot gives back exactly the weights that were written."""
    model = tiny.random_model(tiny.tiny_arch(tiny.base_vocab_size(files[1])), seed=0)
    loaded = snapshot.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key]), key


def test_features_come_from_the_second_to_last_block(snapshot):
    """Each tower's features equal timm's get_intermediate_layers at block depth-2 (the reference's call):
    prefix tokens dropped, no final norm, 256 patches."""
    x = torch.randn(2, 3, 224, 224)
    for vit in (snapshot.model.vision_backbone.featurizer, snapshot.model.vision_backbone.fused_featurizer):
        (ref,) = vit.get_intermediate_layers(x, n={len(vit.blocks) - 2})
        got = _patch_features(vit, x)
        assert got.shape == (2, 256, vit.embed_dim) and torch.allclose(got, ref, atol=1e-6)


def test_patches_follow_bos_in_every_row(snapshot):
    """In the left-padded batch each row reads [pads][BOS][256 patch embeddings][rest of its prompt], positions
    count from 0 at BOS, and pads are invisible keys."""
    model = snapshot.model
    pv, prompts = _inputs(snapshot, 3)
    with torch.no_grad():
        batch = model.build_prefix(pv, prompts)
        patches = model.projector(model.vision_backbone(pv))
        emb = model.language_model.get_input_embeddings()
        for i, p in enumerate(prompts):
            pad = batch.embeds.shape[1] - len(p) - 256
            row = batch.embeds[i]
            assert torch.equal(row[pad], emb.weight[p[0]])
            assert torch.equal(row[pad + 1: pad + 257], patches[i])
            assert torch.equal(row[pad + 257:], emb(torch.tensor(p[1:])))
            assert not batch.key_valid[i, :pad].any() and batch.key_valid[i, pad:].all()
            assert batch.positions[i, pad:].tolist() == list(range(len(p) + 256))


def test_prompt_ends_with_the_tokenizers_space_piece(snapshot):
    """Prompts start with BOS and end with the tokenizer's own "▁" id (not Llama-2's 29871)."""
    tok = snapshot.tokenizer
    ids = tok.encode(build_prompt("put the bowl on the stove"))
    assert ids[0] == tok.bos_id and ids[-1] == tok.tokenizer.token_to_id("\u2581") != 29871
    assert ids.count(tok.space_id) >= 1 and ids[-2] != tok.space_id


# ---- decoding -----------------------------------------------------------------------------------------------------
def test_batched_equals_one_at_a_time(snapshot):
    """Greedy tokens of a batch with mixed prompt lengths equal those of each row decoded alone, token for token,
    and the logits agree to float32 noise: padding leaks into neither attention nor positions."""
    pv, prompts = _inputs(snapshot, 4)
    assert len({len(p) for p in prompts}) == 4
    ids, logits = snapshot.model.generate(pv, prompts, return_logits=True)
    assert ids.shape == (4, 7)
    for i in range(4):
        one, one_logits = snapshot.model.generate(pv[i:i + 1], prompts[i:i + 1], return_logits=True)
        assert torch.equal(one[0], ids[i])
        assert torch.allclose(one_logits[0], logits[i], atol=1e-4, rtol=1e-4)
    assert len({tuple(r) for r in ids.tolist()}) > 1, "the tiny model ignores its inputs; the test would be vacuous"


def test_static_cache_and_eager_attention_agree_with_the_default_path(snapshot):
    """The static-cache layout (the GPU fast path's) and eager attention give the same tokens as SDPA with a
    dynamic cache."""
    model = snapshot.model
    pv, prompts = _inputs(snapshot, 3, seed=1)
    ref, ref_logits = model.generate(pv, prompts, return_logits=True)
    static, static_logits = model.generate(pv, prompts, cache="static", return_logits=True)
    assert torch.equal(ref, static) and torch.allclose(ref_logits, static_logits, atol=1e-4)
    model.set_attn_implementation("eager")
    try:
        eager = model.generate(pv, prompts)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(ref, eager)


#: the fused serving path sums float32 logits (up to ~15 in size) in another order than the plain path: measured
#: up to 2.1e-4 apart on torch 2.14's CPU kernels (1e-4 held on earlier versions); the tokens must stay identical
LOGIT_ATOL = 5e-4


def test_fast_generator_equals_the_plain_path_across_calls(snapshot):
    """The serving path (static cache reused across calls and batch sizes) gives the plain path's tokens and
    logits on every call, so state left over from one call never reaches the next."""
    model = snapshot.model
    fast = FastGenerator(model)
    for n, seed in ((3, 4), (1, 5), (3, 6), (2, 7)):
        pv, prompts = _inputs(snapshot, n, seed=seed)
        prompts = prompts[::-1]
        ref, ref_logits = model.generate(pv, prompts, return_logits=True)
        ids, logits = fast.generate(pv, prompts, return_logits=True)
        assert torch.equal(ids, ref) and torch.allclose(logits, ref_logits, atol=LOGIT_ATOL)


def test_fast_generator_right_padding_matches_left_padding(snapshot):
    """The serving path right-pads rows to a bucketed length and runs its prefill unmasked; the plain path left-pads
    to the longest row with a mask. They agree for prompts that fill a text bucket exactly or leave pads, for a lone
    BOS, for one and for several new tokens, and for two buckets sharing one KV cache; and the model's attention
    setting is left as found."""
    model = snapshot.model
    pv, prompts = _inputs(snapshot, 4, seed=8)
    bucket = FastGenerator.TEXT_BUCKET
    cases = [
        [prompts[0][:bucket], prompts[1][:bucket]],  # exactly one bucket: no pad column at all
        [prompts[2], prompts[3][:1]],  # a long prompt beside a lone BOS: the most pads a row can have
        [prompts[0][: bucket + 1], prompts[1]],  # one column into the next bucket
    ]
    fast = FastGenerator(model)
    model.set_attn_implementation("eager")
    try:
        for rows in cases:
            for new in (1, 3, 7):
                ref, ref_logits = model.generate(pv[: len(rows)], rows, max_new_tokens=new, return_logits=True)
                ids, logits = fast.generate(pv[: len(rows)], rows, max_new_tokens=new, return_logits=True)
                assert ids.shape == (len(rows), new)
                assert torch.equal(ids, ref) and torch.allclose(logits, ref_logits, atol=LOGIT_ATOL)
        assert model.language_model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    assert len(fast._caches) < len(fast._states), "neighbouring text buckets should share a KV cache"


def test_policy_runs_the_libero_chain(snapshot):
    """On raw 256x256 LIBERO renders the policy returns (B, 7) finite actions with arm dims inside the unnorm
    key's [q01, q99] and the gripper in {-1, +1}; the suite name falls back to its _no_noops stats key."""
    policy = OpenVLAPolicy(BaseModel(snapshot), "libero_spatial")
    assert policy.unnorm_key == "libero_spatial_no_noops" and policy.center_crop
    obs = [{"agentview_image": f} for f in _frames(3, seed=2, size=256)]
    out = policy.infer(obs, INSTRUCTIONS[:3])
    a = out.actions
    assert a.shape == (3, 7) and np.isfinite(a).all()
    stats = snapshot.norm_stats["libero_spatial_no_noops"]["action"]
    assert np.all(a[:, :6] >= np.array(stats["q01"][:6]) - 1e-9) and np.all(a[:, :6] <= np.array(stats["q99"][:6]))
    assert set(a[:, 6].tolist()) <= {-1.0, 1.0}
    # the frame the model saw is the flipped, JPEG'd, resized, cropped render
    expected = frames.center_crop(frames.resize(frames.jpeg_roundtrip(frames.flip_180(obs[0]["agentview_image"]))))
    assert np.array_equal(out.frames[0], expected)
    assert np.array_equal(policy.act(obs, INSTRUCTIONS[:3], [0, 1, 2]), a)


def test_bridge_policy_uses_bridge_conventions(snapshot):
    """For bridge_v2 the policy reads obs["image"] upright, uses bridge_orig stats, no crop by default, and leaves
    the gripper as predicted (a bin centre, not a sign)."""
    policy = OpenVLAPolicy(BaseModel(snapshot), "bridge_v2")
    assert policy.unnorm_key == "bridge_orig" and not policy.center_crop
    out = policy.infer([{"image": f} for f in _frames(2, seed=3, size=256)], INSTRUCTIONS[:2])
    assert np.all(np.abs(out.actions[:, 6]) < 1.0)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_unknown_unnorm_key_lists_present_keys(snapshot):
    """An unnorm_key the checkpoint lacks is refused with the keys it has."""
    with pytest.raises(VlaBenchError, match="present: bridge_orig, libero_spatial_no_noops"):
        OpenVLAPolicy(BaseModel(snapshot), "libero_spatial", unnorm_key="libero_goal")


def test_dataset_statistics_override_config_norm_stats(files, tmp_path):
    """A dataset_statistics.json next to the weights replaces config.json's norm_stats."""
    snap = _copy(files, tmp_path)
    checkpoint.write_dataset_statistics(snap, tiny.tiny_norm_stats(("libero_goal_no_noops",), seed=5))
    loaded = checkpoint.load_snapshot(snap, device="cpu")
    assert sorted(loaded.norm_stats) == ["libero_goal_no_noops"]


def test_missing_shard_and_tokenizer_are_named(files, tmp_path):
    """A missing weight shard or tokenizer.json is reported by file name."""
    snap = _copy(files, tmp_path)
    shard = sorted(snap.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(VlaBenchError, match=shard.name):
        checkpoint.load_snapshot(snap, device="cpu")
    snap2 = _copy(files, tmp_path / "b")
    (snap2 / "tokenizer.json").unlink()
    with pytest.raises(VlaBenchError, match="tokenizer.json"):
        checkpoint.load_snapshot(snap2, device="cpu")


def test_unexpected_and_missing_keys_are_listed(files, tmp_path):
    """Weights with a key the architecture lacks, or lacking one it has, are refused with the keys named."""
    snap = _copy(files, tmp_path)
    index_file = snap / checkpoint.INDEX
    index = json.loads(index_file.read_text())
    dropped = "projector.fc2.bias"
    del index["weight_map"][dropped]
    save_file({"projector.fc9.weight": torch.zeros(2)}, str(snap / "extra.safetensors"))
    index["weight_map"]["projector.fc9.weight"] = "extra.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(VlaBenchError, match=r"missing keys: projector\.fc2\.bias.*unexpected keys: projector\.fc9"):
        checkpoint.load_snapshot(snap, device="cpu")


def test_device_and_dtype_errors(files):
    """bfloat16 on the CPU is refused, and so is a CUDA device on a machine without CUDA."""
    with pytest.raises(VlaBenchError, match="bfloat16 on the CPU"):
        checkpoint.load_snapshot(files[2], device="cpu", dtype="bfloat16")
    if not torch.cuda.is_available():
        with pytest.raises(VlaBenchError, match="CUDA is not available"):
            checkpoint.load_snapshot(files[2], device="cuda")


def test_only_safetensors_are_loaded(files, tmp_path):
    """A snapshot without safetensors weights (e.g. pickled .bin only) is refused."""
    snap = _copy(files, tmp_path)
    for p in list(snap.glob("model*.safetensors")) + [snap / checkpoint.INDEX]:
        p.unlink()
    (snap / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(VlaBenchError, match="only safetensors"):
        checkpoint.load_snapshot(snap, device="cpu")


def test_published_dtype_is_cast_on_load(files, tmp_path):
    """A snapshot stored in bfloat16 (as published) loads as float32 on the CPU."""
    snap = _copy(files, tmp_path)
    for shard in snap.glob("model-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}
        save_file(tensors, str(shard))
    model = checkpoint.load_snapshot(snap, device="cpu").model
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_chain_that_cannot_compile_falls_back_to_the_plain_ops_with_a_warning():
    """The fast path's compiled elementwise chains are a speed-up, never a requirement: when compiling fails, the
    call warns once and returns the plain function's result, and later calls go straight to the plain function."""
    import warnings

    from vla_bench.openvla.fast_generator import _compiled_or_plain

    calls = []

    def needs_the_host(x):  # .tolist() is a graph break, which fullgraph=True refuses
        calls.append(1)
        return x * float(sum(x.tolist()))

    fn = _compiled_or_plain(needs_the_host)
    x = torch.tensor([1.0, 2.0])
    with pytest.warns(UserWarning, match="torch.compile of needs_the_host failed"):
        assert torch.equal(fn(x), torch.tensor([3.0, 6.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn(x), torch.tensor([3.0, 6.0]))
