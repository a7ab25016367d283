"""The closed-loop benchmark's pieces on the CPU: the random full-size snapshot's tokenizer (32000 base pieces, LIBERO
prompts tokenize, fillers unreachable), its snapshot and checkpoints.toml entry (with the tiny architecture), and
benchmarks/bench_closed_loop.py's arguments, user command line, summary arithmetic and flow."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla_bench.openvla import random_snapshot
from vla_bench.openvla.model import OPENVLA_7B_CONFIG, Arch
from vla_bench.openvla.prompt import build_prompt
from vla_bench.openvla.tokenizer import PromptTokenizer

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_closed_loop", REPO / "benchmarks" / "bench_closed_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("rand")
    folder, reused = random_snapshot.write_random_snapshot(root / "rand7b", tiny=True)
    toml = random_snapshot.write_checkpoints_entry(root / "checkpoints.toml", "rand7b", folder)
    return root, folder, toml, reused


def test_the_random_7b_tokenizer_fits_the_published_config(tmp_path):
    """The tokenizer has exactly the 32000 base pieces that the 7B config's 32064 rows imply and <PAD> at the
    config's pad id; every LIBERO instruction's prompt starts with BOS, ends with the standalone space piece,
    decodes back to its text and uses no filler piece (no text can reach them), at a Llama-2-like length."""
    tok = PromptTokenizer.from_dir(random_snapshot.build_tokenizer_7b(tmp_path / "tok"))
    assert tok.base_vocab_size == Arch.from_config(OPENVLA_7B_CONFIG).action_vocab_size == 32000
    assert tok.tokenizer.token_to_id("<PAD>") == OPENVLA_7B_CONFIG["pad_token_id"]
    first_filler = tok.tokenizer.token_to_id("<filler0>")
    assert 259 < first_filler < 32000 and tok.tokenizer.token_to_id("<filler1>") == first_filler + 1
    texts = random_snapshot.libero_instructions()
    assert len(texts) == 40
    for text in texts + ["Grab the <filler7> ZEBRA, then <filler0>!"]:
        ids = tok.encode(build_prompt(text))
        assert ids[0] == tok.bos_id and ids[-1] == tok.space_id and max(ids) < first_filler
        assert tok.tokenizer.decode(ids[1:-1]) == build_prompt(text)
    lengths = [len(tok.encode(build_prompt(t))) for t in texts]
    assert 10 <= min(lengths) and max(lengths) <= 48, lengths


def test_the_random_7b_model_is_the_published_architecture_in_bf16():
    """Built on the meta device (no memory), the random 7B model has the reference's parameter count in bf16, and
    the config it writes implies the tokenizer's 32000 base pieces; the default dtype is left as found."""
    model = random_snapshot.random_openvla_7b(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_541_237_184
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    assert Arch.from_config(model.arch.to_config()).action_vocab_size == random_snapshot.BASE_VOCAB


def test_the_random_snapshot_loads_and_its_entry_builds_a_policy(written):
    """The written snapshot (tiny architecture, the same files as the 7B one) loads with the 32000-piece tokenizer,
    a second write reuses it, and its checkpoints.toml entry builds an OpenVLA policy for libero_spatial with the
    suite's norm stats and a 0 threshold (random weights never succeed)."""
    from vla_bench.policies import BuildContext, ModelCache, build_policy
    from vla_bench.registry import Registry

    root, folder, toml, reused = written
    assert not reused and not (root / "rand7b.partial").exists()
    assert random_snapshot.write_random_snapshot(folder, tiny=True) == (folder, True)
    registry = Registry.load(toml)
    spec = registry.get(None)
    assert spec.name == "rand7b" and spec.resolve_path(spec.options["source"]) == folder.resolve()
    assert registry.threshold(spec, "libero_spatial", "task3").minimum == 0.0
    policy = build_policy(spec, BuildContext(registry, "libero_spatial", ModelCache()))
    assert policy.unnorm_key == "libero_spatial_no_noops"
    assert policy.base.snapshot.tokenizer.base_vocab_size == 32000


def test_the_entry_joins_an_existing_file_and_keeps_it(tmp_path):
    """Added to an existing checkpoints.toml (the repo's), the entry leaves its default, entries and comments as
    they were; written again, it replaces itself."""
    from vla_bench.registry import Registry

    toml = tmp_path / "checkpoints.toml"
    shutil.copyfile(REPO / "checkpoints.toml", toml)
    (tmp_path / "snap").mkdir()
    before = toml.read_text()
    random_snapshot.write_checkpoints_entry(toml, "rand7b", tmp_path / "snap")
    random_snapshot.write_checkpoints_entry(toml, "rand7b", tmp_path / "snap")
    after = toml.read_text()
    assert after.count("[checkpoints.rand7b]") == 1
    rest = iter(after.splitlines())
    assert all(line in rest for line in before.splitlines()), "a line of the existing file was lost or moved"
    registry = Registry.load(toml)
    assert registry.default == "expert" and {"expert", "rand7b"} <= set(registry.checkpoints)


# ---- the benchmark script -----------------------------------------------------------------------------------------
def test_bench_arguments_are_checked():
    """Unknown phases, empty phases and non-positive counts are refused with the option named."""
    bench = _bench()
    for argv, message in ((["--phases", "write,fly"], "--phases: unknown fly"), (["--phases", ","], "--phases"),
                          (["--episodes", "0"], "--episodes"), (["--tasks", "0"], "--tasks")):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2
    args = bench.parse_args(["--phases", "loop, kernel", "--tasks", "1", "10", "--", "-x"])
    assert args.phases == ["loop", "kernel"] and args.pytest_args == ["-x"]


def test_the_user_command_selects_the_tasks_asked_for(written, tmp_path):
    """The loop phase's pytest command line, without the engine's --vla-engine-stats, is accepted by the real
    plugin and selects exactly the asked tasks of the random entry (task1 never selects task10)."""
    bench = _bench()
    root, folder, toml, _ = written
    args = bench.parse_args(["--snapshot", str(folder), "--tasks", "1", "10", "--episodes", "2", "--workers", "3",
                             "--max-steps", "5"])
    cmd = bench.loop_command(args, tmp_path / "stats.json", tmp_path / "r.sqlite")
    assert cmd[cmd.index("--vla-engine-stats") + 1] == str(tmp_path / "stats.json")
    assert cmd[cmd.index("-k") + 1] == "task1 or task10"
    cmd = bench.loop_command(args, tmp_path / "stats.json", tmp_path / "r.sqlite", engine_stats=False)
    out = subprocess.run(cmd + ["--collect-only", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    collected = sorted(line.split("::")[-1] for line in out.stdout.splitlines() if "::test_" in line)
    assert collected == ["test_task[task1-rand7b]", "test_task[task10-rand7b]"]


def test_summary_compares_the_loop_with_the_kernel_on_the_loop_mix():
    """The kernel's actions/s is taken on the loop's own mix of batch sizes (calls x size over calls x time), the
    ratio is the loop's actions/s over it, and a size the kernel did not time lowers the coverage, not the rate."""
    bench = _bench()
    engine = {"wall_s": 3.6, "episodes": 4, "actions": 176, "policy_s": 1.8, "gpu_busy": 0.5,
              "batches": {"16": 10, "8": 2}}
    kernel = {"per_batch": {"16": {"ms_per_call": 160.0, "actions_per_s": 100.0},
                            "8": {"ms_per_call": 100.0, "actions_per_s": 80.0}}}
    s = bench.summarize(engine, kernel, suite_episodes=500, max_steps=220)
    assert s["kernel_actions_per_s_on_loop_mix"] == pytest.approx(176 / 1.8)
    assert s["loop_actions_per_s"] == pytest.approx(176 / 3.6) and s["ratio"] == pytest.approx(0.5)
    assert s["main_batch"] == 16 and s["kernel_actions_per_s_at_main_batch"] == 100.0 and s["kernel_covers"] == 1
    assert s["extrapolated_suite_min"] == pytest.approx(500 * 3.6 / 4 / 60)
    assert s["suite_min_at_85pct_in_110_steps"] == pytest.approx(500 * (0.85 * 110 + 0.15 * 220) / (176 / 3.6) / 60)
    del kernel["per_batch"]["8"]
    s = bench.summarize(engine, kernel, 500, 220)
    assert s["kernel_actions_per_s_on_loop_mix"] == pytest.approx(100.0)
    assert s["kernel_covers"] == pytest.approx(160 / 176)


def test_the_flow_times_the_kernel_at_the_loops_batch_sizes(written, tmp_path):
    """With the engine's stats from a loop (written here as the engine would), the kernel phase loads the snapshot,
    prepares, times exactly the loop's batch sizes without capturing anything more, and the JSON holds each
    phase's time and the summary."""
    bench = _bench()
    root, folder, toml, _ = written
    out = tmp_path / "out"
    out.mkdir()
    (out / bench.STATS).write_text(json.dumps({"wall_s": 10.0, "episodes": 2, "actions": 7, "policy_s": 4.0,
                                               "gpu_busy": 0.4, "batches": {"3": 2, "1": 1}}))
    assert bench.main(["--tiny", "--snapshot", str(folder), "--out", str(out), "--phases", "write,kernel",
                       "--kernel-rounds", "1"]) == 0
    result = json.loads((out / bench.RESULT).read_text())
    assert result["write"]["reused"] and set(result["phase_s"]) == {"write", "kernel"}
    kernel = result["kernel"]
    assert set(kernel["per_batch"]) == {"1", "3"} and kernel["captures_while_timing"] == 0
    assert kernel["prepared_graphs"] >= 2 and kernel["device"] == "cpu"
    assert result["summary"]["loop_actions_per_s"] == pytest.approx(0.7) and result["summary"]["ratio"] > 0


@pytest.mark.sim
def test_the_engine_sweep_reports_each_configuration_beside_the_kernel(written, tmp_path):
    """benchmarks/bench_engine_sweep.py on the tiny snapshot and real LIBERO workers: each configuration's timed part
    has its actions, the policy's busy share, the workers' step timings (every executed step timed, renders inside
    the step), the host's CPU share and the workers' memory; a model configuration has the kernel at its batch size
    and their ratio; the simulators-alone configuration runs without the policy."""
    spec = importlib.util.spec_from_file_location("bench_engine_sweep", REPO / "benchmarks" / "bench_engine_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    _, folder, _, _ = written
    out = tmp_path / "sweep"
    assert sweep.main(["--tiny", "--snapshot", str(folder), "--out", str(out), "--configs", "2x2", "2xsim",
                       "--tasks", "1", "--steps", "4", "--kernel-rounds", "1"]) == 0
    record = json.loads((out / "bench_engine_sweep.json").read_text())
    assert record["arenas"] is True and set(record["kernel"]["per_batch"]) == {"1"}
    model, alone = record["configs"]
    for config in (model, alone):
        timing = config["step_timing"]
        assert config["actions"] > 0 and timing["steps_timed"] >= config["actions"]
        assert 0 < timing["render_ms"] < timing["sim_ms"] and timing["group_span_ms"] > 0
        assert 0 < config["host_cpu_busy"] <= 1 and config["memory"]["worker_rss_gib_mean"] > 0.1
    assert model["groups"] == 2 and model["busy"] > 0 and model["ratio"] == pytest.approx(
        model["actions_per_s"] / record["kernel"]["per_batch"]["1"]["actions_per_s"])
    assert alone["groups"] == "sim" and alone["busy"] < model["busy"]
