"""The `openvla` checkpoint kind and its LoRA handling: entries validated without torch, one cached base per
weights/dtype/device, adapters loaded once and switched, and the base bit-identical after adapters ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from vla_bench.errors import VlaBenchError
from vla_bench.openvla import checkpoint, kind, tiny
from vla_bench.openvla.lora import BaseModel
from vla_bench.openvla.policy import OpenVLAPolicy
from vla_bench.policies import BuildContext
from vla_bench.policies.cache import ModelCache
from vla_bench.registry import Registry

INSTRUCTIONS = ["put the bowl on the stove", "close the microwave door", "turn on the stove now"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvla_lora")
    tok = tiny.build_tokenizer(root / "tok")
    snap = tiny.write_tiny_snapshot(root / "snap", tok, seed=0)
    tiny.write_tiny_adapter(snap, root / "ad1", seed=1)
    tiny.write_tiny_adapter(snap, root / "ad2", seed=2)
    return root


def _registry(root, body: str, name="checkpoints.toml"):
    path = root / name
    path.write_text(textwrap.dedent(body))
    return Registry.load(path)


ENTRIES = """
    default = "base"
    [checkpoints.base]
    kind = "openvla"
    source = "snap"
    device = "cpu"
    [checkpoints.lora1]
    kind = "openvla"
    base = "base"
    adapter = "ad1"
    [checkpoints.lora2]
    kind = "openvla"
    base = "base"
    adapter = "ad2"
    [checkpoints.lora1-again]
    kind = "openvla"
    base = "base"
    adapter = "ad1"
    center_crop = false
"""


def _observations(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)} for _ in range(n)]


def _run(policy):
    return policy.infer(_observations(), INSTRUCTIONS, return_logits=True)


def test_base_is_loaded_once_and_stays_bit_identical_after_adapters(files):
    """Three adapter entries over one base load the base once and each distinct adapter once; the adapters change
    the outputs, and afterwards the base's logits are bit-identical to those it gave before any adapter existed."""
    registry = _registry(files, ENTRIES)
    ctx = BuildContext(registry, "libero_spatial", ModelCache())
    base_policy = kind.build(registry.get("base"), ctx)
    before = _run(base_policy)
    policies = {n: kind.build(registry.get(n), ctx) for n in ("lora1", "lora2", "lora1-again")}
    assert ctx.cache.loads == 1
    shared = policies["lora1"].base
    assert all(p.base is shared for p in policies.values()) and len(shared.adapters) == 2
    out = {n: _run(p) for n, p in policies.items()}
    for n in ("lora1", "lora2"):
        assert not torch.equal(out[n].logits, before.logits)
    assert not torch.equal(out["lora1"].logits, out["lora2"].logits)
    after = _run(base_policy)
    assert torch.equal(after.logits, before.logits) and np.array_equal(after.actions, before.actions)
    # switching back to an adapter after the base ran gives its outputs again
    assert torch.equal(_run(policies["lora1"]).logits, out["lora1"].logits)


def test_switched_adapter_equals_a_model_holding_only_that_adapter(files):
    """An adapter selected among several in the shared model gives the same tokens and logits as a fresh model
    that only ever loaded that adapter."""
    shared = BaseModel(checkpoint.load_snapshot(files / "snap", device="cpu"))
    shared.ensure_adapter("one", files / "ad1")
    shared.ensure_adapter("two", files / "ad2")
    alone = BaseModel(checkpoint.load_snapshot(files / "snap", device="cpu"))
    alone.ensure_adapter("two", files / "ad2")
    a = _run(OpenVLAPolicy(shared, "libero_spatial", adapter="two"))
    b = _run(OpenVLAPolicy(alone, "libero_spatial", adapter="two"))
    assert np.array_equal(a.tokens, b.tokens) and torch.allclose(a.logits, b.logits, atol=1e-5)


def test_adapter_for_another_base_is_refused(files, tmp_path):
    """An adapter trained on a differently shaped model is refused, naming layers that do not fit."""
    other = tiny.write_tiny_snapshot(tmp_path / "wide", files / "tok", seed=3, hidden=96)
    tiny.write_tiny_adapter(other, tmp_path / "wide_ad")
    base = BaseModel(checkpoint.load_snapshot(files / "snap", device="cpu"))
    with pytest.raises(VlaBenchError, match=r"adapter does not match the base model.*q_proj \(input 64, adapter 96\)"):
        base.ensure_adapter("wide", tmp_path / "wide_ad")
    (tmp_path / "wide_ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(VlaBenchError, match="adapter_model.safetensors: missing"):
        base.ensure_adapter("wide", tmp_path / "wide_ad")


def test_adapter_statistics_override_the_base(files, tmp_path):
    """An adapter dir with its own dataset_statistics.json (a fine-tune's) unnormalizes with those statistics."""
    import shutil

    shutil.copytree(files / "ad1", tmp_path / "ad")
    shutil.copytree(files / "snap", tmp_path / "snap")
    checkpoint.write_dataset_statistics(tmp_path / "ad", tiny.tiny_norm_stats(("libero_goal_no_noops",), seed=9))
    registry = _registry(tmp_path, """
        default = "b"
        [checkpoints.b]
        kind = "openvla"
        source = "snap"
        [checkpoints.a]
        kind = "openvla"
        base = "b"
        adapter = "ad"
    """)
    ctx = BuildContext(registry, "libero_goal", ModelCache())
    assert kind.build(registry.get("a"), ctx).unnorm_key == "libero_goal_no_noops"
    with pytest.raises(VlaBenchError, match="present: bridge_orig, libero_spatial_no_noops"):
        kind.build(registry.get("b"), ctx)


def test_identity_follows_content_and_behaviour(files, tmp_path):
    """The identity is stable, differs between base and adapter entries and between adapters, and changes when
    an option that changes outputs (center_crop) or the adapter's bytes change."""
    registry = _registry(files, ENTRIES)
    ids = {n: kind.identity(registry.get(n), registry) for n in registry.checkpoints}
    assert ids["base"] == kind.identity(registry.get("base"), registry)
    assert len({ids["base"], ids["lora1"], ids["lora2"], ids["lora1-again"]}) == 4
    assert ids["lora1"].split("/")[0] == ids["lora1-again"].split("/")[0]
    import shutil

    shutil.copytree(files / "ad1", tmp_path / "ad1")
    shutil.copy(files / "checkpoints.toml", tmp_path / "checkpoints.toml")
    os.symlink(files / "snap", tmp_path / "snap")
    os.symlink(files / "ad2", tmp_path / "ad2")
    with open(tmp_path / "ad1" / "adapter_config.json", "a") as f:
        f.write("\n")
    moved = Registry.load(tmp_path / "checkpoints.toml")
    assert kind.identity(moved.get("lora1"), moved) != ids["lora1"]
    assert kind.identity(moved.get("base"), moved) == ids["base"]


@pytest.mark.parametrize("body, match", [
    ('source = "snap"\nbase = "x"\nadapter = "ad1"', "exactly one of 'source'"),
    ('base = "base"', "adapter: missing"),
    ('base = "nope"\nadapter = "ad1"', "no entry 'nope'; openvla entries with a source: base"),
    ('base = "lora"\nadapter = "ad1"', "must be an openvla entry with a 'source'"),
    ('source = "snap"\ndtype = "float16"', "unknown dtype 'float16'; valid: auto, float32, bfloat16"),
    ('source = "snap"\ndevice = "tpu"', "unknown device 'tpu'"),
    ('source = "snap"\nprompt = "llava"', "unknown prompt 'llava'"),
    ('source = "snap"\ncenter_crop = "yes"', "center_crop: expected bool"),
])
def test_invalid_entries_name_the_key(files, tmp_path, body, match):
    """Each malformed openvla entry is refused when checkpoints.toml is read, with the entry and key named."""
    text = ('default = "base"\n[checkpoints.base]\nkind = "openvla"\nsource = "snap"\n'
            '[checkpoints.lora]\nkind = "openvla"\nbase = "base"\nadapter = "ad1"\n'
            '[checkpoints.bad]\nkind = "openvla"\n' + body + "\n")
    with pytest.raises(VlaBenchError, match=r"\[checkpoints\.bad\].*" + match.replace("(", r"\(").replace(")", r"\)")):
        _registry(tmp_path, text)


def test_missing_source_dir_is_named_when_used(tmp_path):
    """A source directory that does not exist is reported with the entry and key when the entry is used."""
    registry = _registry(tmp_path, 'default = "b"\n[checkpoints.b]\nkind = "openvla"\nsource = "gone"\n')
    with pytest.raises(VlaBenchError, match=r"\[checkpoints\.b\] source: .*gone: no such directory"):
        kind.identity(registry.get("b"), registry)


def test_reading_checkpoints_toml_does_not_import_torch(files):
    """Validating openvla entries imports neither torch nor transformers."""
    code = ("import sys; from vla_bench.registry import Registry; "
            f"Registry.load({str(files / 'checkpoints.toml')!r}); "
            "bad = [m for m in ('torch', 'transformers', 'timm', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    _registry(files, ENTRIES)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())


def test_kind_module_contract():
    """The kind module offers the registry's contract: its keys, validate, identity and build."""
    assert set(kind.KEYS) >= {"source", "unnorm_key", "center_crop", "dtype", "device", "base", "adapter"}
    assert callable(kind.validate) and callable(kind.identity) and callable(kind.build)
    assert json.dumps(kind.REQUIRED) == "[]"
