"""The Kubernetes manifests (deploy/k8s) would come up on a real cluster, and only as intended.

Every overlay, and base and the overlays with each optional component, is
rendered by the real `kubectl kustomize` and validated strictly against the
Kubernetes schemas of 1.32, 1.33 and the newest kubernetes-validate knows;
KEDA and Prometheus Operator objects against those projects' published CRD
schemas (vendored in deploy/k8s/crds). The rest are checks a reviewer would
otherwise do by eye, as plain Python over the rendered objects: images,
hardening, volumes, secrets, settings, wiring between the services, network
policies, disruption budgets, autoscaling and graceful stops.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from services.common.config import PROJECT_ROOT
from tests.support.k8s_env import (
    COMPONENTS,
    K8S,
    Container,
    MissingSecret,
    Obj,
    containers,
    documents,
    environment,
    find,
    render,
    service_env,
)
from tests.support.settings import known_variables

# name -> (what to render, components added)
RENDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("cpu", ()),
    "gpu": ("gpu", ()),
    "dev": ("dev", ()),
    "base+prometheus-operator": ("base", ("prometheus-operator",)),
    "base+tls": ("base", ("tls",)),
    "cpu+keda": ("cpu", ("keda",)),
    "gpu+all": ("gpu", COMPONENTS),
}
# What a user applies (base alone has no inference nodes).
DEPLOYABLE = ["cpu", "gpu", "dev", "cpu+keda", "gpu+all"]
PRODUCTION = ["cpu", "gpu", "cpu+keda", "gpu+all"]
K8S_VERSIONS = sorted({"1.32.0", "1.33.0", latest_version()})
NAMESPACE = "cutout"
CUTOUT_IMAGES = ("cutout", "cutout-gpu")
SERVICE_OF_MODULE = {
    "services.gateway": "gateway",
    "services.scheduler": "scheduler",
    "services.scheduler.migrate": "migrate",
    "services.inference": "inference",
}
# The files each service reads its environment in.
READS = {
    "gateway": ["gateway/settings.py", "common/internal_auth.py", "common/webhook_policy.py"],
    "scheduler": ["scheduler/settings.py", "common/internal_auth.py", "common/webhook_policy.py"],
    "migrate": ["scheduler/migrate.py"],
    "inference": ["inference/settings.py", "common/internal_auth.py", "common/config.py"],
}


def objects_of(name: str) -> list[Obj]:
    target, components = RENDERS[name]
    return render(target, components)


def read_by(service: str) -> set[str]:
    names: set[str] = set()
    for rel in READS[service]:
        text = (PROJECT_ROOT / "services" / rel).read_text()
        names |= set(re.findall(r'"((?:CUTOUT|CLOUDINARY)_[A-Z0-9_]+)"', text))
    return names


def service_of(c: Container) -> str | None:
    command = c.spec.get("command", [])
    if command[:2] == ["python", "-m"] and command[2] in SERVICE_OF_MODULE:
        return SERVICE_OF_MODULE[command[2]]
    return None


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]


def by_service(objects: list[Obj]) -> dict[str, Container]:
    found = {service_of(c): c for c in containers(objects)}
    return {k: v for k, v in found.items() if k is not None}


def env_of(c: Container, objects: list[Obj]) -> dict[str, str]:
    return environment(c, objects, None)


def env_source(c: Container, name: str) -> Obj:
    return next(v for v in c.spec.get("env", []) if v["name"] == name)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def container_port(c: Container, name: str) -> int:
    return int(next(p["containerPort"] for p in c.spec["ports"] if p.get("name") == name))


def pods(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) against labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


# --- rendering and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_renders_into_namespace_cutout(name: str) -> None:
    """kubectl kustomize renders it, all in namespace cutout, which enforces PSA restricted."""
    objects = objects_of(name)
    assert objects, f"{name} renders nothing"
    for o in objects:
        if o["kind"] == "Namespace":
            assert o["metadata"]["name"] == NAMESPACE
            labels = o["metadata"]["labels"]
            assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", RENDERS)
def test_objects_validate_strictly(name: str, version: str) -> None:
    """Each built-in object is valid for that Kubernetes version, unknown fields refused."""
    crd_kinds = set(crd_schemas())
    checked = 0
    for o in objects_of(name):
        if o["kind"] in crd_kinds:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"{o['kind']} has no schema in Kubernetes {version} nor a vendored CRD")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} ({version}): {exc.message}")
        checked += 1
    assert checked


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        pattern = out.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern:
            # Go's regexp takes (?i) anywhere; Python's only at the start.
            out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> {apiVersion: strict JSON schema} from deploy/k8s/crds."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        for crd in documents(path):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # Every object has ObjectMeta; the CRDs leave it open.
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                api = f"{group}/{version['name']}"
                out.setdefault(kind, {})[api] = _strict(schema)
    return out


def validate_custom(o: Obj) -> None:
    schemas = crd_schemas()[o["kind"]]
    assert o["apiVersion"] in schemas, f"{o['kind']} {o['apiVersion']} is not served"
    jsonschema.validate(o, schemas[o["apiVersion"]])


@pytest.mark.parametrize("name", RENDERS)
def test_custom_resources_validate_against_their_crds(name: str) -> None:
    """ScaledObject, ServiceMonitor and PrometheusRule match the CRDs their operators install."""
    crd_kinds = set(crd_schemas())
    for o in objects_of(name):
        if o["kind"] in crd_kinds:
            validate_custom(o)


def test_crd_validation_refuses_mistakes() -> None:
    """The CRD check is not a formality: a misspelt or mistyped field fails it."""
    objects = objects_of("gpu+all")
    scaled = find(objects, "ScaledObject", "inference")
    wrong = copy.deepcopy(scaled)
    wrong["spec"]["minReplicas"] = 1  # the field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(wrong)
    monitor = copy.deepcopy(find(objects, "ServiceMonitor", "cutout"))
    monitor["spec"]["endpoints"][0]["interval"] = 15  # a duration string
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(monitor)
    rule = copy.deepcopy(find(objects, "PrometheusRule", "cutout"))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(rule)


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_expected_objects(name: str) -> None:
    """Every part is there, and Envoy's Service is the only one reachable from outside."""
    objects = objects_of(name)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for wanted in [
        ("StatefulSet", "redis"),
        ("Deployment", "scheduler"),
        ("Deployment", "gateway"),
        ("Deployment", "inference"),
        ("Deployment", "envoy"),
        ("Service", "envoy"),
        ("NetworkPolicy", "default-deny-ingress"),
    ]:
        assert wanted in kinds, f"{name} lacks {wanted}"
    exposed = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Service" and o["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert exposed == ["envoy"], f"Services reachable from outside: {exposed}"
    assert not [o for o in objects if o["kind"] == "Ingress"]


# --- generated files ---------------------------------------------------------------------


def test_generated_files_are_current() -> None:
    """The PrometheusRule and the TLS Envoy config match their sources (render.py --check)."""
    done = subprocess.run(
        [sys.executable, str(K8S / "render.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_prometheus_rule_is_the_alerts_file() -> None:
    """The rules Prometheus Operator loads are exactly deploy/monitoring/alerts.yaml."""
    alerts = yaml.safe_load((PROJECT_ROOT / "deploy" / "monitoring" / "alerts.yaml").read_text())
    rule = find(objects_of("base+prometheus-operator"), "PrometheusRule", "cutout")
    assert rule["spec"] == alerts


def test_tls_component_serves_the_envoy_file_with_tls_on() -> None:
    """components/tls: the same Envoy config plus its TLS listener, the cert mounted, 443 only."""
    source = (PROJECT_ROOT / "deploy" / "envoy" / "envoy.yaml").read_text()
    plain = find(objects_of("cpu"), "Deployment", "envoy")
    objects = objects_of("base+tls")
    config = next(o for o in objects if o["metadata"]["name"].startswith("envoy-config"))
    tls = yaml.safe_load(config["data"]["envoy.yaml"])
    listeners = {x["name"]: x for x in tls["static_resources"]["listeners"]}
    assert set(listeners) == {"public", "public_tls"}
    assert (
        yaml.safe_load(source)["static_resources"]["clusters"]
        == (tls["static_resources"]["clusters"])
    )
    deployment = find(objects, "Deployment", "envoy")
    envoy = next(c for c in containers([deployment]) if c.name == "envoy")
    tls_port = listeners["public_tls"]["address"]["socket_address"]["port_value"]
    assert container_port(envoy, "public-tls") == tls_port
    secret = envoy.volume("/etc/envoy/tls")
    assert secret is not None and secret["secret"]["secretName"] == "cutout-tls"
    chain = listeners["public_tls"]["filter_chains"][0]["transport_socket"]["typed_config"]
    files = chain["common_tls_context"]["tls_certificates"][0]
    assert files["certificate_chain"]["filename"].startswith("/etc/envoy/tls/")
    service = find(objects, "Service", "envoy")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["public-tls"]
    assert plain["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080


# --- images --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_images_are_pinned_and_real(name: str) -> None:
    """Tagged, never latest or a placeholder; the node and its numba seed share one image."""
    names = set()
    for c in containers(objects_of(name)):
        image = c.image
        repo, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (repo and "/" not in tag), f"{c.name}: {image} has no tag"
        assert tag != "latest", f"{c.name}: {image}"
        assert "example." not in image, f"{c.name}: placeholder image {image}"
        names.add(image_name(image))
    assert names <= {"cutout", "cutout-gpu", "cutout-models", "envoy", "redis"}, names
    node = by_service(objects_of(name))["inference"]
    seed = next(c for c in containers([node.workload]) if c.name == "numba-cache")
    assert seed.image == node.image, "the numba cache must come from the node's own image"
    expected = "cutout-gpu" if name.startswith("gpu") else "cutout"
    assert image_name(node.image) == expected
    for service in ("gateway", "scheduler", "migrate"):
        assert image_name(by_service(objects_of(name))[service].image) == "cutout"


# --- hardening -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_every_container_is_hardened_and_bounded(name: str) -> None:
    """Requests, limits, restricted securityContext everywhere; probes on declared ports."""
    for c in containers(objects_of(name)):
        where = f"{name}: {c.workload['metadata']['name']}/{c.name}"
        resources = c.spec.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), f"{where}: no {kind}.{resource}"
        sc = c.spec.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("runAsNonRoot") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("privileged"), where
        pod = c.pod
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        if c.init:
            continue
        declared = {p["containerPort"] for p in c.spec["ports"]}
        declared |= {p["name"] for p in c.spec["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c.spec, f"{where}: no {probe}"
            spec = c.spec[probe]
            port = next((spec[k]["port"] for k in ("grpc", "httpGet", "tcpSocket") if k in spec), 0)
            assert port in declared or "exec" in spec, f"{where}: {probe} on undeclared {port}"


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_writable_paths_are_volumes(name: str) -> None:
    """With a read-only root filesystem, every place the services write is a volume.

    /tmp for every Python process; the scheduler's result store; on the nodes,
    the model folder (filled by the models init container) and numba's cache
    folder (numba refuses a cache it cannot write, and rembg's import fails
    without one: seeded from the kernels the image compiled at build time).
    """
    objects = objects_of(name)
    for c in containers(objects):
        if service_of(c) is not None:  # Python: tempfile, libraries
            tmp = c.volume("/tmp")
            assert tmp is not None and "emptyDir" in tmp, f"{c.name}: /tmp is not an emptyDir"
    services = by_service(objects)
    scheduler_env = env_of(services["scheduler"], objects)
    assert services["scheduler"].volume(scheduler_env["CUTOUT_STORAGE_DIR"]) is not None
    node = services["inference"]
    node_env = env_of(node, objects)
    init = {c.name: c for c in containers([node.workload]) if c.init}
    model_dir = node_env["CUTOUT_MODEL_DIR"]
    mount = next(m for m in node.spec["volumeMounts"] if m["mountPath"] == model_dir)
    assert mount.get("readOnly") is True
    models = init["models"]
    filled = next(m for m in models.spec["volumeMounts"] if m["name"] == mount["name"])
    assert models.spec["command"] == ["cp", "-r", "/models/.", f"{filled['mountPath']}/"]
    cache_dir = node_env["NUMBA_CACHE_DIR"]
    cache = next(m for m in node.spec["volumeMounts"] if m["mountPath"] == cache_dir)
    assert not cache.get("readOnly")
    seed = init["numba-cache"]
    seeded = next(m for m in seed.spec["volumeMounts"] if m["name"] == cache["name"])
    assert seed.spec["command"] == ["cp", "-r", f"{cache_dir}/.", f"{seeded['mountPath']}/"]


# --- volumes and secrets ---------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_volumes_bind_on_any_cluster(name: str) -> None:
    """Every claim is defined, ReadWriteOnce on the default StorageClass, one writer each."""
    objects = objects_of(name)
    claims = {
        o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PersistentVolumeClaim"
    }
    for o in pods(objects):
        for template in o["spec"].get("volumeClaimTemplates", []):
            claims[template["metadata"]["name"]] = template["spec"]
    for spec in claims.values():
        assert spec["accessModes"] == ["ReadWriteOnce"], spec
        assert "storageClassName" not in spec, "use the cluster's default StorageClass"
    for o in pods(objects):
        pod = o["spec"]["template"]["spec"]
        templates = {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, f"{o['metadata']['name']}: hostPath"
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is None:
                continue
            assert claim in claims and claim not in templates, f"claim {claim} is not defined"
            # A ReadWriteOnce volume has one writer: one replica, replaced after it stops.
            assert o["kind"] == "Deployment" and o["spec"]["replicas"] == 1
            assert o["spec"]["strategy"]["type"] == "Recreate"


def secret_references(objects: list[Obj]) -> set[tuple[str, str]]:
    refs: set[tuple[str, str]] = set()
    for c in containers(objects):
        for var in c.spec.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    for o in pods(objects):
        for volume in o["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                refs.add((volume["secret"]["secretName"], "tls.crt"))
                refs.add((volume["secret"]["secretName"], "tls.key"))
    return refs


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_every_secret_is_documented(name: str) -> None:
    """docs/deploy.md has a row naming each Secret and key the manifests read."""
    rows = [line for line in (PROJECT_ROOT / "docs" / "deploy.md").read_text().splitlines()]
    refs = secret_references(objects_of(name))
    assert refs
    for secret, key in refs:
        assert any(f"`{secret}`" in row and f"`{key}`" in row for row in rows), (
            f"docs/deploy.md has no line naming Secret `{secret}` with key `{key}`"
        )


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_manifests_use_only_real_settings(name: str) -> None:
    """Each Cutout container is given only variables its own service reads.

    Besides the service's settings: NUMBA_CACHE_DIR on the nodes (read by numba,
    test above), and helpers such as REDIS_PASSWORD that exist only to be
    expanded as $(NAME) into a later variable of the same container.
    """
    objects = objects_of(name)
    used = 0
    for c in containers(objects):
        service = service_of(c)
        if service is None:
            assert image_name(c.image) not in CUTOUT_IMAGES or c.init, c.name
            continue
        known = read_by(service) | ({"NUMBA_CACHE_DIR"} if service == "inference" else set())
        values = " ".join(str(v.get("value", "")) for v in c.spec.get("env", []))
        env = env_of(c, objects)
        unknown = sorted(n for n in env if n not in known and f"$({n})" not in values)
        assert not unknown, f"{name}: {c.name} is given variables it never reads: {unknown}"
        used += len(env)
    assert used, "no settings found in the rendered manifests"


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_services_are_wired_to_each_other(name: str) -> None:
    """Addresses, ports, models and secrets agree between the services that share them."""
    objects = objects_of(name)
    s = by_service(objects)
    env = {k: env_of(c, objects) for k, c in s.items()}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}

    def service_port(svc: str, port: int, app: str) -> Obj:
        spec = services[svc]["spec"]
        assert spec["selector"] == {"app": app}, f"Service {svc} does not select {app}"
        return next(p for p in spec["ports"] if p["port"] == port)

    # Each service listens where its container, probes and Service say.
    for service, listen in [
        ("gateway", "CUTOUT_GATEWAY_LISTEN"),
        ("scheduler", "CUTOUT_SCHEDULER_LISTEN"),
        ("inference", "CUTOUT_NODE_LISTEN"),
    ]:
        c = s[service]
        assert port_of(env[service][listen]) == container_port(c, "grpc"), service
        metrics = port_of(env[service]["CUTOUT_METRICS_LISTEN"])
        assert metrics == container_port(c, "metrics"), service
        annotations = c.workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics), service
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c.spec[probe]["grpc"]["port"] == container_port(c, "grpc"), service
        assert service_port(service, container_port(c, "grpc"), service)["targetPort"] == "grpc"
    # gateway -> scheduler, scheduler -> nodes (every pod: a headless Service).
    host, port = env["gateway"]["CUTOUT_SCHEDULER_ADDR"].rsplit(":", 1)
    assert service_port(host, int(port), "scheduler")
    nodes = env["scheduler"]["CUTOUT_NODES"]
    assert nodes.startswith("dns:///"), nodes
    host, port = nodes.removeprefix("dns:///").rsplit(":", 1)
    assert service_port(host, int(port), "inference")
    assert services[host]["spec"]["clusterIP"] == "None"
    # The models the gateway accepts are the ones the nodes load.
    assert env["gateway"]["CUTOUT_MODELS"] == env["inference"]["CUTOUT_MODELS"]
    # One internal token for all three.
    for service in ("gateway", "scheduler", "inference"):
        assert env_source(s[service], "CUTOUT_INTERNAL_TOKEN")["valueFrom"] == {
            "secretKeyRef": {"name": "cutout-internal", "key": "token"}
        }
    # Redis: the password the server requires is the one in the services' URL.
    redis = next(c for c in containers(objects) if c.name == "redis")
    args = redis.spec["args"]
    password = args[args.index("--requirepass") + 1]
    assert password == "$(REDIS_PASSWORD)"
    secret = env_source(redis, "REDIS_PASSWORD")["valueFrom"]
    redis_port = container_port(redis, "redis")
    for service in ("gateway", "scheduler"):
        assert env_source(s[service], "REDIS_PASSWORD")["valueFrom"] == secret
        url = env_source(s[service], "CUTOUT_REDIS_URL")["value"]
        assert url == f"redis://:$(REDIS_PASSWORD)@redis:{redis_port}/0"
    assert service_port("redis", redis_port, "redis")
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes"
    data = next(m for m in redis.spec["volumeMounts"] if m["mountPath"] == "/data")
    templates = redis.workload["spec"]["volumeClaimTemplates"]
    assert data["name"] in {t["metadata"]["name"] for t in templates}
    assert args[args.index("--dir") + 1] == "/data"


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_envoy_reaches_the_gateways(name: str) -> None:
    """Envoy's config (from deploy/envoy/envoy.yaml) matches the gateway Service and its own pod."""
    objects = objects_of(name)
    envoy = next(c for c in containers(objects) if c.name == "envoy")
    args = envoy.spec["args"]
    config_path = Path(args[args.index("-c") + 1])
    volume = envoy.volume(str(config_path.parent))
    assert volume is not None, "the -c file is not in a mounted volume"
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_path.name])
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    assert listeners["public"]["address"]["socket_address"]["port_value"] == container_port(
        envoy, "public"
    )
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    assert admin == container_port(envoy, "admin")
    cluster = next(x for x in config["static_resources"]["clusters"] if x["name"] == "gateway")
    assert cluster["type"] == "STRICT_DNS"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    address = endpoint["address"]["socket_address"]
    gateway = find(objects, "Service", "gateway")
    assert address["address"] == f"gateway.{NAMESPACE}.svc.cluster.local"
    assert gateway["spec"]["clusterIP"] == "None", "Envoy must see every gateway pod"
    assert address["port_value"] in {p["port"] for p in gateway["spec"]["ports"]}


# --- network policies ----------------------------------------------------------------------

Source = tuple[str, dict[str, str], str | None]  # (name, pod labels, namespace or None: outside)
OUTSIDE: Source = ("<outside>", {}, None)  # not a pod of the cluster


def _peer_matches(peer: Obj, source: Source) -> bool:
    _, labels, namespace = source
    if namespace is None:  # from outside the cluster: only an ipBlock could match
        return "ipBlock" in peer
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": namespace}
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif namespace != NAMESPACE:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], labels)


def allowed(objects: list[Obj], source: Source, pod: Obj, port: int) -> bool:
    """Whether the NetworkPolicies let source connect to pod's port (Kubernetes semantics)."""
    labels = pod["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy"
        and selects(p["spec"]["podSelector"], labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in {p["port"] for p in ports}:
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_matches(peer, source) for peer in peers):
                return True
    return False


# Who must reach each port, by the port's name; everyone else must not.
REACHES = {
    ("envoy", "public"): "everyone",
    ("envoy", "public-tls"): "everyone",
    ("gateway", "grpc"): {"envoy"},
    ("scheduler", "grpc"): {"gateway"},
    ("inference", "grpc"): {"scheduler"},
    ("redis", "redis"): {"gateway", "scheduler"},
}


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_network_policies_allow_only_the_intended_paths(name: str) -> None:
    """For every declared port of every pod: exactly the intended sources may connect.

    Sources: outside the cluster, the monitoring namespace, and each workload of
    namespace cutout; evaluated with NetworkPolicy's rules (isolation by any
    selecting policy, allow if any rule's peers and ports match).
    """
    objects = objects_of(name)
    workloads = pods(objects)
    sources = [OUTSIDE, ("<monitoring>", {}, "monitoring")]
    sources += [
        (w["metadata"]["name"], w["spec"]["template"]["metadata"]["labels"], NAMESPACE)
        for w in workloads
    ]
    for w in workloads:
        app = w["metadata"]["name"]
        for c in containers([w]):
            for p in c.spec.get("ports", []):
                port_name, number = p["name"], p["containerPort"]
                if port_name in ("metrics", "admin"):
                    expected: Any = {"<monitoring>"}
                else:
                    expected = REACHES[app, port_name]
                for source in sources:
                    should = expected == "everyone" or source[0] in expected
                    got = allowed(objects, source, w, number)
                    assert got == should, (
                        f"{name}: {source[0]} -> {app}:{number} ({port_name}) "
                        f"{'allowed' if got else 'refused'}, expected the opposite"
                    )
        # Nothing is reachable on a port that no container declares.
        assert not allowed(objects, ("gateway", {"app": "gateway"}, NAMESPACE), w, 22)


# --- availability ----------------------------------------------------------------------


def autoscaled(objects: list[Obj]) -> set[str]:
    targets = {
        o["spec"]["scaleTargetRef"]["name"]
        for o in objects
        if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    return targets


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_replicated_workloads_have_disruption_budgets(name: str) -> None:
    """Each Deployment that can run several pods has one PDB that never blocks a drain."""
    objects = objects_of(name)
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    scaled = autoscaled(objects)
    for o in objects:
        if o["kind"] != "Deployment":
            continue
        deployment = o["metadata"]["name"]
        if o["spec"].get("replicas", 1) <= 1 and deployment not in scaled:
            continue
        labels = o["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(mine) == 1, f"{name}: {deployment} has {len(mine)} PodDisruptionBudgets"
        # maxUnavailable (not minAvailable = replicas) so that draining a node never blocks.
        assert mine[0]["spec"].get("maxUnavailable", 0) >= 1
        if deployment in scaled:
            assert "replicas" not in o["spec"], f"{deployment}: apply would reset the autoscaler"


def test_autoscaling_by_overlay() -> None:
    """HPAs on CPU for gateways and Envoy in production; dev runs one of everything."""
    for name in PRODUCTION:
        hpas = {
            o["spec"]["scaleTargetRef"]["name"]: o
            for o in objects_of(name)
            if o["kind"] == "HorizontalPodAutoscaler"
        }
        assert set(hpas) == {"gateway", "envoy"}, name
        for hpa in hpas.values():
            assert hpa["spec"]["minReplicas"] >= 2
            (metric,) = hpa["spec"]["metrics"]
            assert metric["resource"]["name"] == "cpu"
    dev = objects_of("dev")
    assert not [o for o in dev if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    for o in pods(dev):
        assert o["spec"]["replicas"] == 1, o["metadata"]["name"]


def node_benchmark_jobs_per_s() -> float:
    text = (PROJECT_ROOT / "docs" / "performance.md").read_text()
    match = re.search(r"\| Cutout node over gRPC \| ([0-9.]+) \|", text)
    assert match, "docs/performance.md lost the node benchmark row"
    return float(match.group(1))


@pytest.mark.parametrize("name", ["cpu+keda", "gpu+all"])
def test_keda_scales_nodes_on_backlog(name: str) -> None:
    """KEDA's threshold is the nodes' jobs per minute, the CPU one from the node benchmark."""
    objects = objects_of(name)
    scaled = find(objects, "ScaledObject", "inference")
    node = find(objects, "Deployment", "inference")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "inference"}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "cutout_jobs" in trigger["metadata"]["query"]
    per_minute = node["metadata"]["annotations"]["cutout.io/jobs-per-minute"]
    assert trigger["metadata"]["threshold"] == per_minute
    if name.startswith("cpu"):
        # One CPU node's minute of work, from the measured node benchmark.
        assert int(per_minute) == math.floor(node_benchmark_jobs_per_s() * 60)
    doc = (PROJECT_ROOT / "docs" / "deploy.md").read_text()
    assert f"`{per_minute}`" in doc, f"docs/deploy.md does not explain {per_minute}"


def stop_grace(service: str) -> float:
    """The grace the service's own stop() gives its gRPC server (server.py)."""
    text = (PROJECT_ROOT / "services" / service / "server.py").read_text()
    match = re.search(r"self\.server\.stop\(grace=([0-9.]+)\)", text)
    assert match, service
    return float(match.group(1))


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_pods_get_time_to_drain(name: str) -> None:
    """terminationGracePeriodSeconds covers preStop, the service's drain and its server's grace."""
    objects = objects_of(name)
    for service, c in by_service(objects).items():
        if service == "migrate":
            continue
        env = env_of(c, objects)
        drain = float(env.get("CUTOUT_GRACE_S", 0)) if "CUTOUT_GRACE_S" in read_by(service) else 0
        pre_stop = c.spec.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        needed = pre_stop + drain + stop_grace(service) + 5
        period = c.pod["terminationGracePeriodSeconds"]
        assert period >= needed, f"{name}: {service} gets {period} s, needs {needed}"
    # A draining node keeps a job as long as the scheduler would still wait for it.
    scheduler = (PROJECT_ROOT / "services" / "scheduler" / "settings.py").read_text()
    attempt = float(re.search(r'"CUTOUT_ATTEMPT_TIMEOUT_S", ([0-9.]+)', scheduler).group(1))  # type: ignore[union-attr]
    attempt = float(
        env_of(by_service(objects)["scheduler"], objects).get("CUTOUT_ATTEMPT_TIMEOUT_S", attempt)
    )
    node_grace = float(env_of(by_service(objects)["inference"], objects)["CUTOUT_GRACE_S"])
    assert node_grace >= attempt


# --- results, GPUs, the parity helper -------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_results_storage(name: str) -> None:
    """Production stores in Cloudinary (required secret); dev locally on its RWO volume."""
    objects = objects_of(name)
    scheduler = by_service(objects)["scheduler"]
    env = env_of(scheduler, objects)
    store = scheduler.volume(env["CUTOUT_STORAGE_DIR"])
    assert store is not None
    cloudinary = env_source(scheduler, "CLOUDINARY_URL")["valueFrom"]["secretKeyRef"]
    if name == "dev":
        assert env["CUTOUT_STORAGE"] == "local"
        assert "persistentVolumeClaim" in store
        assert cloudinary.get("optional") is True
    else:
        assert env["CUTOUT_STORAGE"] == "cloudinary"
        assert "emptyDir" in store
        assert not cloudinary.get("optional"), "production needs CLOUDINARY_URL"


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_gpu_nodes_only_in_the_gpu_overlay(name: str) -> None:
    """Only the GPU overlay asks for GPUs, tolerates their taint and requires CUDA."""
    objects = objects_of(name)
    node = by_service(objects)["inference"]
    env = env_of(node, objects)
    limits = node.spec["resources"]["limits"]
    if name.startswith("gpu"):
        assert limits["nvidia.com/gpu"] == 1
        assert node.spec["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert env["CUTOUT_REQUIRE_GPU"] == "1"
        tolerations = node.pod["tolerations"]
        assert {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoSchedule",
        } in tolerations
        assert node.workload["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    else:
        assert "nvidia.com/gpu" not in limits
        assert env.get("CUTOUT_REQUIRE_GPU", "0") == "0"
    # ONNX Runtime's threads fill the CPU limit without oversubscribing it: one
    # session run at a time on CPU cores, one per slot on a GPU.
    runs = int(env["CUTOUT_NODE_CAPACITY"]) if name.startswith("gpu") else 1
    assert int(env["CUTOUT_ORT_THREADS"]) * runs == int(limits["cpu"])
    for c in containers(objects):
        if c.name != node.name:
            assert "nvidia.com/gpu" not in c.spec["resources"]["limits"], c.name


def test_service_env_gives_what_kubernetes_would() -> None:
    """The parity helper expands $(VAR), reads secrets and resource limits, skips optionals."""
    secrets = {
        "cutout-internal": {"token": "t" * 32},
        "cutout-redis": {"password": "pw"},
    }
    env = service_env("dev", secrets)
    assert env["gateway"]["CUTOUT_REDIS_URL"] == "redis://:pw@redis:6379/0"
    assert env["scheduler"]["CUTOUT_REDIS_URL"] == "redis://:pw@redis:6379/0"
    assert env["inference"]["CUTOUT_INTERNAL_TOKEN"] == "t" * 32
    assert env["inference"]["CUTOUT_ORT_THREADS"] == "2"  # the CPU limit
    assert env["scheduler"]["CUTOUT_STORAGE"] == "local"
    assert "CLOUDINARY_URL" not in env["scheduler"]  # optional in dev, not given
    assert "CUTOUT_API_KEYS" not in env["gateway"]
    with_cloudinary = service_env("dev", {**secrets, "cutout-results": {"cloudinary-url": "c://"}})
    assert with_cloudinary["scheduler"]["CLOUDINARY_URL"] == "c://"
    assert env["redis"]["REDIS_PASSWORD"] == "pw"
    with pytest.raises(MissingSecret):
        service_env("dev", {"cutout-redis": {"password": "pw"}})
    with pytest.raises(MissingSecret):
        service_env("cpu", secrets)  # production requires the Cloudinary URL
    placeholders = service_env("cpu")
    assert placeholders["gateway"]["CUTOUT_INTERNAL_TOKEN"] == "<secret cutout-internal/token>"


def _smoke() -> Any:
    """deploy/images/smoke.py as a module (it is a script, not a package)."""
    if "cutout_smoke" not in sys.modules:
        path = PROJECT_ROOT / "deploy" / "images" / "smoke.py"
        spec = importlib.util.spec_from_file_location("cutout_smoke", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["cutout_smoke"] = module
        spec.loader.exec_module(module)
    return sys.modules["cutout_smoke"]


def test_container_smoke_runs_what_the_manifests_run() -> None:
    """Parity: the container smoke test (make smoke) starts each container with the dev
    overlay's command, environment, user and securityContext; it may change only the
    addresses named in HOST_NETWORK and SMOKE_ONLY, each a setting a service reads."""
    smoke = _smoke()
    values = smoke.secret_values()
    runs = smoke.manifest_runs(values)  # every Secret the overlay requires is given
    objects = objects_of("dev")
    for c in containers(objects):
        assert runs[c.name].env == environment(c, objects, values)
    for name in ("gateway", "scheduler", "inference", "migrate"):
        run = runs[name]
        assert run.command[:2] == ["python", "-m"], run.command  # not the image's entrypoint
        assert run.user == "10001:10001"
        assert "--read-only" in run.podman_security and "--cap-drop=ALL" in run.podman_security
        assert "/tmp" in run.emptydirs
    assert runs["redis"].args[:2] == ["--requirepass", runs["redis"].env["REDIS_PASSWORD"]]
    assert runs["inference"].grace_s >= stop_grace("inference")
    known = known_variables()
    for name in {**smoke.HOST_NETWORK, **smoke.SMOKE_ONLY}:
        assert name in known, f"the smoke test overrides {name}, which no service reads"
    manifest_env = runs["gateway"]
    with pytest.raises(smoke.SmokeError, match="CUTOUT_RATE_LIMITS"):
        smoke.service_env(manifest_env, {"CUTOUT_RATE_LIMITS": "requests=1/1"})
    assert smoke.service_env(manifest_env, {"CUTOUT_GATEWAY_LISTEN": "127.0.0.1:0"}) == {
        **manifest_env.env,
        "CUTOUT_GATEWAY_LISTEN": "127.0.0.1:0",
    }
    url = runs["scheduler"].env["CUTOUT_REDIS_URL"]
    password = runs["redis"].env["REDIS_PASSWORD"]
    assert smoke.loopback_redis_url(url, 7001) == f"redis://:{password}@127.0.0.1:7001/0"


def test_smoke_maps_every_security_setting() -> None:
    """A securityContext field the smoke test cannot reproduce fails it, never vanishes."""
    smoke = _smoke()
    c = next(c for c in containers(objects_of("dev")) if c.name == "gateway")
    c.spec["securityContext"]["privileged"] = True
    with pytest.raises(smoke.SmokeError, match="privileged"):
        smoke.security_options(c)
