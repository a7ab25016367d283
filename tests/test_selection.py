"""Test ids and -k selection, through pytest's own collection as a user runs it (no simulator needed).

The runs happen in a project of their own (suite modules and a checkpoints.toml of ENTRIES), so new entries or suites
in the shipped files change nothing here."""
import re

import pytest


ENTRIES = """
default = "noop"
[checkpoints.noop]
kind = "noop"
[checkpoints.random]
kind = "random"
[checkpoints.steady]
kind = "scripted"
"""


@pytest.fixture
def collected(project):
    """collected(*pytest args) -> (result, test ids) of `pytest --collect-only` in a project whose checkpoints.toml
    holds ENTRIES (tests/conftest.py: project)."""
    project.checkpoints(ENTRIES)

    def collect(*args):
        result = project.run("--collect-only", "-q", *args)
        return result, re.findall(r"::test_task\[([^\]]+)\]", result.stdout)
    return collect


@pytest.mark.parametrize("suite, n_tasks", [("libero_spatial", 10), ("libero_90", 90)])
def test_k_task1_selects_task1_only(collected, suite, n_tasks):
    result, ids = collected(f"suites/{suite}", "-k", "task1", "--checkpoint", "noop")
    assert ids == ["task1-noop"], result.stdout + result.stderr
    assert f"{n_tasks - 1} deselected" in result.stdout


def test_task_words_combine_with_the_rest_of_the_expression(collected):
    _, ids = collected("suites/libero_90", "-k", "task10 or task1", "--checkpoint", "noop")
    assert ids == ["task1-noop", "task10-noop"]
    _, ids = collected("suites/libero_spatial", "-k", "not task1", "--checkpoint", "noop")
    assert ids == [f"task{i}-noop" for i in range(2, 11)]  # task10 stays: it is not task1
    _, ids = collected("suites/libero_spatial", "-k", "task2 and random", "--checkpoint", "noop",
                       "--checkpoint", "random")
    assert ids == ["task2-random"]


def test_ids_are_readable_and_numbered_from_one(collected):
    _, ids = collected("suites/libero_spatial", "--checkpoint", "noop")
    assert ids == [f"task{i}-noop" for i in range(1, 11)]


def test_unknown_checkpoint_is_a_usage_error_listing_the_valid_ones(collected):
    result, _ = collected("suites/libero_spatial", "--checkpoint", "nope")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unknown checkpoint 'nope'" in output and "valid: noop, random, steady" in output
