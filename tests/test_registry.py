import tomlkit
import pytest

from vla_bench.errors import VlaBenchError
from vla_bench.registry import Registry
from vla_bench.thresholds import Threshold

GOOD = """
# a comment that must survive write-back
default = "noop"

[thresholds.libero_spatial]
default = 0.9
task5 = 0.8

[checkpoints.noop]
kind = "noop"
[checkpoints.noop.thresholds.libero_spatial]
task5 = 0.1

[checkpoints.random]
kind = "random"   # inline comment
"""


def test_thresholds_resolve_checkpoint_then_file_then_library_default(checkpoints_file):
    reg = Registry.load(checkpoints_file(GOOD))
    noop, rnd = reg.get("noop"), reg.get("random")
    assert reg.threshold(noop, "libero_spatial", "task5") == Threshold.success_rate(0.1)  # checkpoint's task
    assert reg.threshold(noop, "libero_spatial", "task1") == Threshold.success_rate(0.9)  # file's suite default
    assert reg.threshold(rnd, "libero_spatial", "task5") == Threshold.success_rate(0.8)  # file's task
    assert reg.threshold(rnd, "bridge_v2", "correlation", library_default=Threshold(0.1)) == Threshold(0.1)
    with pytest.raises(VlaBenchError, match=r"no threshold for libero_goal task1"):
        reg.threshold(rnd, "libero_goal", "task1")
    assert reg.get(None).name == "noop"


@pytest.mark.parametrize("text, message", [
    ('default = "x"\n[checkpoints.x]\nkind = "nope"', r"\[checkpoints.x\] kind: unknown kind 'nope'; valid kinds: .*noop"),
    ('default = "x"\n[checkpoints.x]\nkind = "noop"\nsource = "a"', r"unknown key 'source' for kind 'noop'; valid keys:"),
    ('default = "x"\n[checkpoints.x]\ndescription = "no kind"', r"\[checkpoints.x\]: missing key 'kind'"),
    ('[checkpoints.x]\nkind = "noop"', r"missing top-level key 'default'.*entries: x"),
    ('default = "y"\n[checkpoints.x]\nkind = "noop"', r"default = 'y' is not an entry; entries: x"),
    ('default = "x"\n[checkpoints.x]\nkind = "noop"\ndescription = 3', r"\[checkpoints.x\] description: expected str, got int"),
    ('default = "x"\n[thresholds.libero_spatial]\ndefault = "high"\n[checkpoints.x]\nkind = "noop"',
     r"\[thresholds\].libero_spatial default: a threshold is a number or a \[low, high\] pair"),
    ('default = "x"\nfoo = 1\n[checkpoints.x]\nkind = "noop"', r"unknown top-level key\(s\) foo"),
    ('default = "x"\n[checkpoints.x\nkind = "noop"', r"not valid TOML"),
])
def test_validation_errors_name_file_entry_key_and_choices(checkpoints_file, text, message):
    path = checkpoints_file(text)
    with pytest.raises(VlaBenchError, match=message) as info:
        Registry.load(path)
    assert str(path) in str(info.value)


def test_unknown_checkpoint_lists_the_valid_ones(checkpoints_file):
    reg = Registry.load(checkpoints_file(GOOD))
    with pytest.raises(VlaBenchError, match=r"unknown checkpoint 'nope' .* valid: noop, random"):
        reg.get("nope")


def test_write_back_keeps_comments_and_order(checkpoints_file):
    path = checkpoints_file(GOOD)
    reg = Registry.load(path)
    reg.add_entry("candidate", {"kind": "noop", "baseline": "base-run"}, comment="made by a test")
    text = path.read_text()
    assert "# a comment that must survive write-back" in text and "# inline comment" in text
    assert text.index("[checkpoints.random]") < text.index("[checkpoints.candidate]")
    again = Registry.load(path)
    assert again.get("candidate").baseline == "base-run"
    with pytest.raises(VlaBenchError, match="exists already"):
        again.add_entry("candidate", {"kind": "noop"})
    with pytest.raises(VlaBenchError, match="unknown key 'bogus'"):
        again.add_entry("bad", {"kind": "noop", "bogus": 1})
    assert "bad" not in tomlkit.parse(path.read_text())["checkpoints"]


def test_identity_changes_with_the_entry_kind(checkpoints_file):
    reg = Registry.load(checkpoints_file(GOOD))
    a, b = reg.identity(reg.get("noop")), reg.identity(reg.get("random"))
    assert a != b and len(a) == 16


def test_shipped_checkpoints_file_is_valid_and_defaults_to_the_expert():
    from tests.conftest import REPO

    reg = Registry.load(REPO / "checkpoints.toml")
    assert reg.default == "expert" and reg.get(None).kind == "scripted"
    assert {"noop", "random"} <= set(reg.checkpoints)
