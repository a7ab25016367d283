"""Test ids and -k selection, through pytest's own collection as a user runs it (no simulator needed), in a project
of the test's own (tests/conftest.py: project)."""
import re

import pytest


def collected(project, *args):
    result = project.run("--collect-only", "-q", *args)
    ids = re.findall(r"::test_task\[([^\]]+)\]", result.stdout)
    return result, ids


@pytest.mark.parametrize("suite, n_tasks", [("libero_spatial", 10), ("libero_90", 90)])
def test_k_task1_selects_task1_only(project, suite, n_tasks):
    result, ids = collected(project, f"suites/{suite}", "-k", "task1", "--checkpoint", "noop")
    assert ids == ["task1-noop"], result.stdout + result.stderr
    assert f"{n_tasks - 1} deselected" in result.stdout


def test_task_words_combine_with_the_rest_of_the_expression(project):
    _, ids = collected(project, "suites/libero_90", "-k", "task10 or task1", "--checkpoint", "noop")
    assert ids == ["task1-noop", "task10-noop"]
    _, ids = collected(project, "suites/libero_spatial", "-k", "not task1", "--checkpoint", "noop")
    assert ids == [f"task{i}-noop" for i in range(2, 11)]  # task10 stays: it is not task1
    _, ids = collected(project, "suites/libero_spatial", "-k", "task2 and random", "--checkpoint", "noop",
                       "--checkpoint", "random")
    assert ids == ["task2-random"]


def test_ids_are_readable_and_numbered_from_one(project):
    _, ids = collected(project, "suites/libero_spatial", "--checkpoint", "noop")
    assert ids == [f"task{i}-noop" for i in range(1, 11)]


def test_unknown_checkpoint_is_a_usage_error_listing_the_valid_ones(project):
    result = project.run("--collect-only", "-q", "suites/libero_spatial", "--checkpoint", "nope")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unknown checkpoint 'nope'" in output and "valid: expert, expert-fumbly, noop, random, replay" in output
