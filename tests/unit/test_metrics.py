"""The alert rules cover what operators asked for. The metrics every service exports after a
known workload: tests/cluster/test_metrics.py."""

from __future__ import annotations

import yaml

from services.common.config import PROJECT_ROOT

MONITORING = PROJECT_ROOT / "deploy" / "monitoring"


def test_alert_rules_cover_what_operators_asked_for() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert "> 100" in by_name["CutoutQueueBacklog"]["expr"]
    assert by_name["CutoutQueueBacklog"]["for"] == "5m"
    assert "> 0.01" in by_name["CutoutFailureRateHigh"]["expr"]
    assert "cutout_healthy_nodes" in by_name["CutoutNoHealthyNode"]["expr"]
    assert "cutout_dead_letters_total" in by_name["CutoutDeadLettersGrowing"]["expr"]
    for rule in by_name.values():
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
