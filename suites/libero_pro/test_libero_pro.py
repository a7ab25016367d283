"""LIBERO-PRO robustness suites: each checkpoint on each task of each perturbation family (lan, object, swap, task)
of each base suite, beside its own rate on the unperturbed task; the summary shows the drop with its 95% interval.

Ids read `libero_goal_lan-task1-expert`: `-k libero_goal_lan` runs one variant, `-k _swap` one family, `-k task1`
the first task of each (exactly, never task10). Thresholds: [thresholds.libero_pro] in checkpoints.toml, overridden
per variant by [thresholds.libero_goal_lan] and per checkpoint like any suite's.
"""


def test_task(libero_pro_task):
    result = libero_pro_task.evaluate()
    assert result.passed, libero_pro_task.describe(result)
    assert not libero_pro_task.gate_failed(result.perturbed), libero_pro_task.describe_gate(result.perturbed)
