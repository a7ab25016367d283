"""LIBERO-Spatial: closed-loop success of each checkpoint on each task (one test per task and checkpoint)."""
SUITE = "libero_spatial"


def test_task(libero_task):
    result = libero_task.evaluate()
    assert result.passed, libero_task.describe(result)
    assert not libero_task.gate_failed(result), libero_task.describe_gate(result)
