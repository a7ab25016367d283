"""LIBERO demonstrations, open loop: the same proxy metrics on LIBERO HDF5 demos (released or collected)."""
SUITE = "libero_demos"


def test_metric(proxy_metric):
    figure = proxy_metric.evaluate()
    assert figure.passed, proxy_metric.describe(figure)
