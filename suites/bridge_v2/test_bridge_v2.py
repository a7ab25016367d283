"""Bridge V2 open-loop proxy checks: predicted actions against recorded ones, one test per metric and checkpoint."""
SUITE = "bridge_v2"


def test_metric(proxy_metric):
    figure = proxy_metric.evaluate()
    assert figure.passed, proxy_metric.describe(figure)
