"""Writes the two manifests that are made from another file, so each fact has one source.

- components/prometheus-operator/prometheusrule.yaml: deploy/monitoring/alerts.yaml
  (the rule file plain Prometheus loads) wrapped as a PrometheusRule.
- components/tls/envoy.yaml: deploy/envoy/envoy.yaml with its commented TLS
  listener (the lines between `# BEGIN TLS` and `# END TLS`) switched on.

    python deploy/k8s/render.py          write both
    python deploy/k8s/render.py --check  exit 1 naming each file that is stale

tests/cluster/test_deploy.py runs the check, so a changed source without a re-render fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
RULE = ROOT / "deploy" / "k8s" / "components" / "prometheus-operator" / "prometheusrule.yaml"
TLS_ENVOY = ROOT / "deploy" / "k8s" / "components" / "tls" / "envoy.yaml"
TLS_BEGIN, TLS_END = "# BEGIN TLS", "# END TLS"

RULE_HEADER = """\
# GENERATED from deploy/monitoring/alerts.yaml by deploy/k8s/render.py: edit
# that file, then run `python deploy/k8s/render.py`.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: cutout
  namespace: cutout
  labels: { app.kubernetes.io/part-of: cutout }
spec:
"""

TLS_HEADER = """\
# GENERATED from deploy/envoy/envoy.yaml by deploy/k8s/render.py, with the TLS
# listener between BEGIN TLS and END TLS switched on: edit that file, then run
# `python deploy/k8s/render.py`.
"""


def prometheus_rule(alerts: str) -> str:
    """The rule file as the spec of a PrometheusRule: the same text, comments and all.

    A PrometheusRule's spec is exactly a rule file (`groups:`), so the file is
    indented under `spec:` unchanged; block scalars keep their content because
    every line moves by the same two spaces.
    """
    body = "".join(f"  {line}" if line.strip() else line for line in alerts.splitlines(True))
    return RULE_HEADER + body


def envoy_with_tls(text: str) -> str:
    """The Envoy config with its TLS listener uncommented (one `# ` removed per line)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == TLS_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == TLS_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{ENVOY} must hold one {TLS_BEGIN} ... {TLS_END} block")
    block = []
    for line in lines[starts[0] + 1 : ends[0]]:
        indent = len(line) - len(line.lstrip())
        block.append(line[:indent] + line[indent:].removeprefix("# "))
    return TLS_HEADER + "\n".join([*lines[: starts[0]], *block, *lines[ends[0] + 1 :]]) + "\n"


def rendered() -> dict[Path, str]:
    return {
        RULE: prometheus_rule(ALERTS.read_text()),
        TLS_ENVOY: envoy_with_tls(ENVOY.read_text()),
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in rendered().items():
        if path.exists() and path.read_text() == text:
            continue
        if check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale (run `python deploy/k8s/render.py`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
