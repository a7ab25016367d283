"""suites/bridge_v2 as a user runs it, on the real debug shard: the controls' verdicts and the stored figures."""


def outcomes(stdout: str, word: str) -> set[str]:
    return {line.split("[")[1].split("]")[0] for line in stdout.splitlines()
            if line.startswith(word) and "test_metric[" in line}


def test_replay_passes_every_check_and_noop_fails_every_check(project, tmp_path):
    db = tmp_path / "r.sqlite"
    result = project.run("suites/bridge_v2", "--checkpoint", "replay", "--checkpoint", "noop", "-rA",
                         "--vla-results", str(db))
    metrics = {"sign_accuracy", "correlation", "gripper_accuracy", "diversity", "success_proxy_rate"}
    assert outcomes(result.stdout, "PASSED") == {f"{m}-replay" for m in metrics}, result.stdout[-3000:]
    assert outcomes(result.stdout, "FAILED") == {f"{m}-noop" for m in metrics}
    from vla_bench.results import ResultsStore

    store = ResultsStore(db)
    rows = {m: f["episodes"] for m, f in store.proxy_figures("replay", "bridge_v2").items()}
    noop = store.proxy_figures("noop", "bridge_v2")
    assert store.proxy_figures("replay", "libero_demos") == {}
    store.close()
    assert metrics <= set(rows) and set(rows.values()) == {25}
    assert set(noop) == set(rows) and all(f["episodes"] == 25 and f["frames"] > 0 for f in noop.values())


def test_default_checkpoints_of_the_suite_come_from_its_dataset_table(project):
    result = project.run("suites/bridge_v2", "--collect-only", "-q")
    assert "test_metric[sign_accuracy-replay]" in result.stdout and "-expert]" not in result.stdout


def test_a_missing_dataset_names_the_path_and_how_to_set_it(project, tmp_path):
    result = project.run("suites/bridge_v2", "-k", "sign_accuracy", "--vla-data", f"bridge_v2={tmp_path}/nope",
                         "--vla-results", str(tmp_path / "r.sqlite"))
    assert result.returncode == 1
    assert f"dataset of bridge_v2 not found at {tmp_path}/nope" in result.stdout
    assert "--vla-data bridge_v2=PATH" in result.stdout
