"""Fault injection: SIGKILL a `pytest suites/...` run, `vla-bench collect` and `vla-bench finetune` at a handful of
seeded moments, run the same command again after each kill, and compare with a run that was never interrupted.

After every kill, every file the run left is readable; at the end no episode row, demo or checkpoint is lost or
duplicated, and the results equal the uninterrupted run's. Settings are tiny (eight short episodes of the `noop`
control, two physics-only expert demos, eight LoRA steps of a tiny OpenVLA) and the kills few (each rerun pays the
simulator's or torch's start-up again); a demo write is also killed after each of its dataset writes in turn.
"""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, sim_env

def kill_moments(seed: int, high: float, n: int) -> list[float]:
    """`n` seeded delays in [0, high) seconds, counted from the moment a run has visibly started working."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, high) for _ in range(n)]


def run_and_kill(command: list[str], started, delay: float, cwd: Path, env: dict, timeout: float = 240) -> bool:
    """Start `command`, wait until `started()` is true, wait `delay` s more, SIGKILL it; True if it was killed
    (False: it finished first)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.02)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return True


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ---------------------------------------------------------------------------------------------- pytest suites


def episode_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return c.execute("SELECT checkpoint, task_index, init_index, seed, success, steps, error FROM episodes "
                         "ORDER BY task_index, init_index").fetchall()


@pytest.mark.sim
def test_a_killed_suite_run_resumes_to_the_rows_of_an_uninterrupted_one(project, tmp_path):
    (tmp_path / "checkpoints.toml").write_text('default = "noop"\n[checkpoints.noop]\nkind = "noop"\n'
                                               '[thresholds.libero_spatial]\ndefault = 0.0\n')
    env = sim_env()

    def command(db: Path) -> list[str]:
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(project.path / "suites/libero_spatial"),
                "-k", "task1", "--checkpoints-file", str(tmp_path / "checkpoints.toml"), "--episodes", "8",
                "--max-steps", "15", "--vla-workers", "1", "--vla-results", str(db)]

    reference = tmp_path / "reference.sqlite"
    run(command(reference), tmp_path, env)
    killed = tmp_path / "killed.sqlite"
    for delay in kill_moments(17, 6.0, n=2):
        run_and_kill(command(killed), killed.exists, delay, tmp_path, env)
        if killed.exists():
            rows = episode_rows(killed)  # readable, and only finished episodes, each once
            assert len({r[2] for r in rows}) == len(rows) and all(r[6] is None for r in rows)
    run(command(killed), tmp_path, env)
    assert episode_rows(killed) == episode_rows(reference) and len(episode_rows(reference)) == 8
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


# ---------------------------------------------------------------------------------------------- collect


def demos_of(folder: Path) -> list[tuple]:
    """(file, demo key, seed, actions) of every complete demo; every file must open and every demo read whole."""
    from vla_bench.data.libero_hdf5 import demo_keys, read_libero_demos

    out = []
    for path in sorted(folder.rglob("*.hdf5")):
        with h5py.File(path, "r") as f:
            keys = demo_keys(f["data"])
            seeds = [int(f["data"][k].attrs["seed"]) for k in keys]
            assert int(f["data"].attrs["num_demos"]) == len(keys)
        demos = list(read_libero_demos(path, images=False)) if keys else []
        for key, seed, demo in zip(keys, seeds, demos):
            out.append((path.name, key, seed, demo["steps"]["action"].tobytes()))
    return out


@pytest.mark.sim
def test_a_killed_collect_resumes_to_the_demos_of_an_uninterrupted_one(tmp_path):
    env = sim_env()
    (tmp_path / "checkpoints.toml").write_text('default = "expert"\n[checkpoints.expert]\nkind = "scripted"\n')

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "vla_bench.cli", "collect", "--suite", "libero_spatial", "--tasks", "1",
                "--demos", "2", "--out", str(out), "--workers", "1", "--no-images", "--seed", "5",
                "--checkpoints-file", str(tmp_path / "checkpoints.toml")]

    reference = tmp_path / "reference"
    run(command(reference), tmp_path, env)
    expected = demos_of(reference)
    assert len(expected) == 2

    killed = tmp_path / "killed"
    for delay in kill_moments(23, 8.0, n=1):  # the demo write itself is killed at every dataset below
        run_and_kill(command(killed), lambda: any(killed.rglob("*.hdf5")), delay, tmp_path, env)
        demos = demos_of(killed)  # every file readable, only whole demos, each seed once
        assert len({d[2] for d in demos}) == len(demos) and demos == expected[:len(demos)]
    run(command(killed), tmp_path, env)
    assert demos_of(killed) == expected
    assert not list(killed.rglob("*.partial")) and not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_a_kill_while_a_demo_is_written_loses_only_that_demo(tmp_path):
    """SIGKILL inside append_libero_demo, after each of its dataset writes in turn, once what was written so far is
    on disk (as when libhdf5's metadata cache spills a large demo's groups mid-write): the file stays readable with
    the demos written before, and appending again gives the next demo its proper key."""
    from vla_bench.data.libero_hdf5 import append_libero_demo, demo_keys, read_libero_demos, write_libero_demos

    rng = np.random.default_rng(0)
    episode = {"actions": rng.normal(size=(6, 7)), "states": rng.normal(size=(6, 5)),
               "obs": {"agentview_rgb": rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
                       "ee_states": rng.normal(size=(6, 6))}, "attrs": {"seed": 11}}
    script = """
import os, signal, sys, pickle
import h5py
from vla_bench.data.libero_hdf5 import append_libero_demo
path, kill_at = sys.argv[1], int(sys.argv[2])
calls = [0]
create = h5py.Group.create_dataset
def create_then_maybe_die(self, *args, **kwargs):
    dataset = create(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == kill_at:
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return dataset
h5py.Group.create_dataset = create_then_maybe_die
append_libero_demo(path, pickle.loads(sys.stdin.buffer.read()))
"""
    import pickle

    for kill_at in range(1, 7):  # actions, rewards, dones, states, obs/agentview_rgb, obs/ee_states
        path = write_libero_demos(tmp_path / f"t{kill_at}_demo.hdf5", [episode], "do it")
        done = subprocess.run([sys.executable, "-c", script, str(path), str(kill_at)], input=pickle.dumps(episode),
                              capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
        assert [d["episode_metadata"]["demo_key"] for d in read_libero_demos(path)] == ["demo_0"]
        assert append_libero_demo(path, episode) == "demo_1"
        with h5py.File(path, "r") as f:
            assert demo_keys(f["data"]) == ["demo_0", "demo_1"] and int(f["data"].attrs["num_demos"]) == 2
            assert int(f["data"].attrs["total"]) == 12
        assert len(list(read_libero_demos(path))) == 2


# ---------------------------------------------------------------------------------------------- finetune


def test_a_killed_finetune_resumes_to_the_adapter_and_entry_of_an_uninterrupted_one(tmp_path):
    from safetensors.numpy import load_file

    from tests.test_finetune_train import TOML, _args, _demos
    from vla_bench.openvla import tiny
    from vla_bench.registry import Registry

    tokenizer = tiny.build_tokenizer(tmp_path / "tok")
    tiny.write_tiny_snapshot(tmp_path / "snap", tokenizer, seed=0)
    demos = _demos(tmp_path / "demos" / "libero_spatial", n_demos=2, steps=6)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def command(name: str) -> list[str]:
        toml = tmp_path / f"{name}.toml"
        if not toml.exists():
            toml.write_text(TOML.replace('"snap"', f'"{tmp_path / "snap"}"'))
        args = _args(toml, demos, "cand", tmp_path / name, 8, "--save-every", "2", "--eval-every", "4")
        return [sys.executable, "-m", "vla_bench.finetune.cli", *args]

    run(command("reference"), tmp_path, env)
    killed = tmp_path / "killed"
    for delay in kill_moments(31, 5.0, n=2):
        run_and_kill(command("killed"), (killed / "log.jsonl").is_file, delay, tmp_path, env)
        pointer = killed / "checkpoints" / "latest"
        if pointer.is_file():  # the checkpoint the next run resumes from is whole
            load_file(str(killed / "checkpoints" / pointer.read_text().strip() / "trainable.safetensors"))
        assert not (killed / "adapter").exists() or (killed / "adapter" / "adapter_model.safetensors").is_file()
        Registry.load(tmp_path / "killed.toml")  # never left half written
    run(command("killed"), tmp_path, env)

    def adapter(name):
        return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    expected, got = adapter("reference"), adapter("killed")
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6)
    steps = [line for line in (killed / "log.jsonl").read_text().splitlines() if '"train/loss"' in line]
    assert len(steps) == 8  # one record per step: none lost, none repeated
    for name in ("reference", "killed"):
        text = (tmp_path / f"{name}.toml").read_text()
        assert text.count("[checkpoints.cand]") == 1
        entry = Registry.load(tmp_path / f"{name}.toml").get("cand")
        assert entry.resolve_path(entry.options["adapter"]) == (tmp_path / name / "adapter").resolve()
    assert not list(killed.glob(".*.partial"))

    # killed between the adapter's rename and the entry: the same command writes the entry, and then has nothing
    # left to do (both without training again)
    from vla_bench.finetune.cli import main as finetune_main

    entry_text = (tmp_path / "killed.toml").read_text()
    (tmp_path / "killed.toml").write_text(TOML.replace('"snap"', f'"{tmp_path / "snap"}"'))
    assert finetune_main(command("killed")[3:]) == 0
    assert finetune_main(command("killed")[3:]) == 0
    again = Registry.load(tmp_path / "killed.toml")
    assert (tmp_path / "killed.toml").read_text().count("[checkpoints.cand]") == 1
    reference = Registry.load(tmp_path / "reference.toml").get("cand")
    options, expected_options = dict(again.get("cand").options), dict(reference.options)
    assert again.get("cand").resolve_path(options.pop("adapter")) == (killed / "adapter").resolve()
    expected_options.pop("adapter")
    assert options == expected_options and again.get("cand").baseline == reference.baseline
    assert "[checkpoints.cand]" in entry_text
