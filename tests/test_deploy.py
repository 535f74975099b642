"""Checks that the recipes under deploy/ parse and agree with each other and with the product.

Names, ports, flags, env and metric names are cross-checked between the Kubernetes manifests,
the systemd unit, the Dynamo launch script, the MEMKV_CONFIG examples and the Grafana dashboard,
and against what `memkv node --help` and the node's metrics registry really offer.
"""

from __future__ import annotations

import ast
import collections
import functools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
LAUNCH = DEPLOY / "dynamo" / "launch_worker.sh"
DASHBOARD = DEPLOY / "grafana" / "memkv-dashboard.json"
CONFIG_EXAMPLE = DEPLOY / "config" / "memkv.yaml"

NODE_METRICS = {
    "memkv_node_ops_total",
    "memkv_node_items_total",
    "memkv_node_received_bytes_total",
    "memkv_node_sent_bytes_total",
    "memkv_node_request_seconds",
    "memkv_node_connections",
    "memkv_node_transfers_waiting",
    "memkv_node_connections_accepted_total",
    "memkv_node_auth_failures_total",
    "memkv_node_protocol_errors_total",
    "memkv_node_arena_capacity_bytes",
    "memkv_node_arena_used_bytes",
    "memkv_node_value_bytes",
    "memkv_node_keys",
    "memkv_node_leases",
    "memkv_node_hits_total",
    "memkv_node_misses_total",
    "memkv_node_evictions_total",
    "memkv_node_evicted_bytes_total",
    "memkv_node_no_space_total",
}
SIDECAR_METRICS = {
    "memkv_l2_ops_total",
    "memkv_l2_keys_total",
    "memkv_l2_bytes_total",
    "memkv_l2_op_seconds",
    "memkv_l2_node_errors_total",
    "memkv_l2_view_epoch",
    "memkv_l2_members",
    "memkv_l2_leases_held",
}
HISTOGRAMS = {"memkv_node_request_seconds", "memkv_l2_op_seconds"}
GAUGES = {
    "memkv_node_connections",
    "memkv_node_transfers_waiting",
    "memkv_node_arena_capacity_bytes",
    "memkv_node_arena_used_bytes",
    "memkv_node_value_bytes",
    "memkv_node_keys",
    "memkv_node_leases",
    "memkv_l2_view_epoch",
    "memkv_l2_members",
    "memkv_l2_leases_held",
}

ADAPTER_FIELDS = {"servers", "prefix", "replicas", "transport", "num_workers", "timeout_s", "lease_ttl_s"}
CONFIG_FILE_FIELDS = ADAPTER_FIELDS | {"auth_key", "auth_key_file"}
SIDECAR_ENV = {
    "MEMKV_CONFIG",
    "MEMKV_SERVERS",
    "MEMKV_PREFIX",
    "MEMKV_REPLICAS",
    "MEMKV_TRANSPORT",
    "MEMKV_NUM_WORKERS",
    "MEMKV_TIMEOUT_S",
    "MEMKV_LEASE_TTL_S",
    "MEMKV_AUTH_KEY_FILE",
    "MEMKV_TLS_CA",
    "MEMKV_RDMA_DEVICES",
}
DEFAULT_DRAIN_TIMEOUT_S = 30.0
SECRET = ("memkv-auth", "auth-key")  # the Secret and its key that every pod mounts as a file
ADVERTISE_FLAG = "--advertise-host"


# ----------------------------------------------------------------------------- helpers


def parse_flags(args: list[str]) -> dict[str, list[str | None]]:
    """``--a=b``, ``--a b`` and bare ``--flag`` into {flag: [values]} (None for a bare flag)."""
    out: dict[str, list[str | None]] = collections.defaultdict(list)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if eq:
                out[name].append(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[name].append(args[i + 1])
                i += 1
            else:
                out[name].append(None)
        i += 1
    return dict(out)


def one(flags: dict[str, list[str | None]], name: str) -> str:
    values = flags.get(name)
    assert values and len(values) == 1 and values[0] is not None, f"expected one {name} VALUE, got {values}"
    return values[0]


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def k8s_quantity(text: str | int) -> int:
    units = {
        "Ki": 1 << 10,
        "Mi": 1 << 20,
        "Gi": 1 << 30,
        "Ti": 1 << 40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text))
    assert m, f"bad quantity {text!r}"
    return int(float(m.group(1)) * units.get(m.group(2), 1))


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", text.strip())
    assert m, f"bad size {text!r}"
    unit = m.group(2) or "B"
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 1 << 10, "MiB": 1 << 20}
    mult |= {"GiB": 1 << 30, "TiB": 1 << 40}
    return int(float(m.group(1)) * mult[unit])


def duration_s(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)?", text.strip()):
        total += float(value) * {"ms": 0.001, "s": 1, "": 1, "min": 60, "m": 60, "h": 3600}[unit]
    return total


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@functools.cache
def kustomization() -> dict[str, Any]:
    return load_docs(K8S / "kustomization.yaml")[0]


@functools.cache
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for name in kustomization()["resources"]:
        for doc in load_docs(K8S / name):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for (k, _), doc in resources().items() if k == kind]


def statefulset() -> dict[str, Any]:
    (sts,) = of_kind("StatefulSet")
    return sts


def headless_service() -> dict[str, Any]:
    return resources()[("Service", statefulset()["spec"]["serviceName"])]


def node_container() -> dict[str, Any]:
    (c,) = statefulset()["spec"]["template"]["spec"]["containers"]
    return c


def node_args() -> list[str]:
    c = node_container()
    argv = list(c.get("command", [])) + list(c.get("args", []))
    assert argv[:2] == ["memkv", "node"], argv
    return argv[2:]


def worker_pod() -> dict[str, Any]:
    (dep,) = of_kind("Deployment")
    return dep["spec"]["template"]


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def sidecar() -> dict[str, Any]:
    (c,) = [c for c in all_containers(worker_pod()["spec"]) if c.get("command", [])[:2] == ["lmcache", "server"]]
    return c


def sidecar_flags() -> dict[str, list[str | None]]:
    return parse_flags(sidecar().get("args", []))


def vllm() -> dict[str, Any]:
    (c,) = [c for c in worker_pod()["spec"]["containers"] if c["name"] == "vllm"]
    return c


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def ports_of(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def pod_specs() -> list[dict[str, Any]]:
    return [
        doc["spec"]["template"]["spec"] for doc in resources().values() if doc["kind"] in ("StatefulSet", "Deployment")
    ]


def memkv_help() -> str:
    script = Path(sys.executable).with_name("memkv")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lmcache_memkv.cli.main"]
    env = dict(os.environ, COLUMNS="240", TERM="dumb", NO_COLOR="1")
    proc = subprocess.run([*cmd, "node", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@functools.cache
def node_help() -> str:
    return memkv_help()


def real_node_flags() -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node_help()))


def node_env_vars() -> set[str]:
    """MEMKV_* names `memkv node` reads itself: the ones --help lists, plus the auth key."""
    return set(re.findall(r"env var:\s*(MEMKV_[A-Z_]+)", node_help())) | {"MEMKV_AUTH_KEY", "MEMKV_AUTH_KEY_FILE"}


def check_flags_are_real(flags: set[str], where: str) -> None:
    real = real_node_flags()
    unknown = sorted(flags - real - {ADVERTISE_FLAG})
    assert not unknown, f"{where}: not `memkv node` flags: {unknown}"
    if ADVERTISE_FLAG in flags and ADVERTISE_FLAG not in real:
        pytest.xfail(f"{where} uses {ADVERTISE_FLAG}, which `memkv node --help` does not list yet")


# ----------------------------------------------------------------------------- all files


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        if path.parent == K8S and path.name != "kustomization.yaml":
            for doc in docs:
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
                assert doc["metadata"].get("name"), path


def test_readme_mentions_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    missing = [
        str(p.relative_to(DEPLOY))
        for p in sorted(DEPLOY.rglob("*"))
        if p.is_file() and p.name != "README.md" and str(p.relative_to(DEPLOY)) not in readme
    ]
    assert not missing, f"deploy/README.md does not mention: {missing}"


def test_readme_sidecar_commands_name_an_eviction_policy() -> None:
    """LMCache 0.5.6 refuses `lmcache server` without --eviction-policy."""
    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if "lmcache server" in c]
    assert commands
    for command in commands:
        assert "--eviction-policy" in command, command
        assert "MEMKV_AUTH_KEY=" not in command, f"pass the key as a file: {command}"


def test_readme_warns_about_the_admin_port() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "GET /env" in readme and "MEMKV_AUTH_KEY_FILE" in readme and "127.0.0.1" in readme


def test_dockerfile_installs_the_project_from_its_own_source() -> None:
    """Built from the repository root: COPY the source, `pip install` it; no index lookup of lmcache-memkv."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    instructions = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    copies = [line.split()[1:-1] for line in instructions.splitlines() if line.startswith("COPY ")]
    copied = {src for srcs in copies for src in srcs}
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository (the build context) lacks"
    pyproject = (ROOT / "pyproject.toml").read_text()
    needed = {"pyproject.toml", "lmcache_memkv"} | set(re.findall(r'^readme = "([^"]+)"', pyproject, re.M))
    needed |= {f for f in re.findall(r'"([^"]+)"', (re.findall(r"^license-files = \[(.*)\]", pyproject, re.M) or [""])[0])}
    assert needed <= copied, f"the build needs {sorted(needed - copied)}"
    installs = [seg for line in instructions.splitlines() if line.startswith("RUN ") for seg in line.split("&&") if "pip install" in seg]
    assert any(re.search(r"pip install [^&]*\"?/src(\$\{EXTRAS\})?\"?", seg) for seg in installs), installs
    assert not any(re.search(r"lmcache-memkv|lmcache_memkv", seg) for seg in installs), "no index lookup of our package"
    assert 'EXTRAS="[sidecar]"' in text, "the default image runs `lmcache server` and `memkv demo`"
    assert "docker build -f deploy/docker/Dockerfile" in (DEPLOY / "README.md").read_text()


# ----------------------------------------------------------------------------- kubernetes


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == present


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == set(resources())
    images = {
        c["image"] for d in built if d["kind"] == "StatefulSet" for c in d["spec"]["template"]["spec"]["containers"]
    }
    (override,) = [i for i in kustomization()["images"] if i["name"] == "lmcache-memkv"]
    assert images == {f"{override['newName']}:{override['newTag']}"}


# Native sidecars (restartPolicy: Always on an init container) need 1.29; 1.37 is the newest bundled.
K8S_VERSIONS = ("1.29.0", "1.37.0")


def test_manifests_validate_against_kubernetes_schemas() -> None:
    """Every manifest (NetworkPolicy included) against the bundled, strict Kubernetes JSON schemas, offline."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -r requirements-dev.txt")
    from kubernetes_validate.utils import ValidationError

    docs = [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_docs(path)]
    assert {doc["kind"] for _, doc in docs} >= {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "Secret"}
    for version in K8S_VERSIONS:
        for name, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except ValidationError as exc:
                raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}") from None
    # The validator is really checking: a misspelt field fails in strict mode.
    broken = json.loads(json.dumps(resources()[("NetworkPolicy", "memkv-nodes")]))
    broken["spec"]["ingres"] = broken["spec"].pop("ingress")
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def network_policies() -> list[dict[str, Any]]:
    return of_kind("NetworkPolicy")


def policy_for(pod_labels: dict[str, str]) -> dict[str, Any]:
    (policy,) = [p for p in network_policies() if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
    assert "Ingress" in policy["spec"]["policyTypes"]
    return policy


def test_network_policy_admits_only_memkv_pods_and_workers_to_node_ports() -> None:
    node_labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    worker_labels = worker_pod()["metadata"]["labels"]
    node_ports = ports_of(node_container())
    rules = policy_for(node_labels)["spec"]["ingress"]
    open_ports: dict[str, list[list[dict[str, Any]] | None]] = collections.defaultdict(list)
    for rule in rules:
        for port in rule["ports"]:
            assert port["port"] in node_ports, f"NetworkPolicy names {port['port']}, not a node container port"
            open_ports[port["port"]].append(rule.get("from"))
    for name in ("data", "control"):
        (peers,) = open_ports[name]
        assert peers, f"{name}: a rule without `from` admits everyone"
        selectors = [p["podSelector"]["matchLabels"] for p in peers]
        assert all(set(p) == {"podSelector"} for p in peers), "no namespace- or IP-wide peers on the data plane"
        assert any(sel.items() <= node_labels.items() for sel in selectors), f"{name}: peers (other nodes) shut out"
        assert any(sel.items() <= worker_labels.items() for sel in selectors), f"{name}: workers shut out"
        for sel in selectors:
            assert sel.items() <= node_labels.items() or sel.items() <= worker_labels.items(), sel
    assert set(open_ports) == {"data", "control", "metrics"}


def test_network_policy_keeps_the_sidecars_admin_port_private() -> None:
    worker_labels = worker_pod()["metadata"]["labels"]
    rules = policy_for(worker_labels)["spec"]["ingress"]
    admitted = {port["port"] for rule in rules for port in rule["ports"]}
    assert admitted == {"http"} and ports_of(vllm())["http"] == 8000, admitted
    assert "admin" not in admitted and ports_of(sidecar())["admin"] not in admitted


def test_service_is_headless_and_selects_the_statefulset_pods() -> None:
    sts = statefulset()
    svc = headless_service()
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["metadata"]["name"] == "memkv" == sts["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for pdb in of_kind("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    terms = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = terms["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_service_ports_match_container_ports() -> None:
    ports = ports_of(node_container())
    assert ports == {"data": 9900, "control": 9901, "metrics": 9910}
    for sp in headless_service()["spec"]["ports"]:
        target = sp["targetPort"]
        assert target in ports if isinstance(target, str) else target in ports.values()
        assert sp["name"] == target and sp["port"] == ports[target]


def test_node_flags_match_container_ports() -> None:
    flags = parse_flags(node_args())
    ports = ports_of(node_container())
    for flag, port_name in (("--listen", "data"), ("--control-listen", "control"), ("--metrics-listen", "metrics")):
        host, port = endpoint(one(flags, flag))
        assert host == "0.0.0.0", f"{flag} must listen on all interfaces in a pod"
        assert port == ports[port_name], flag


def test_node_flags_and_env_are_real() -> None:
    unknown_env = {n for n in env_of(node_container()) if n.startswith("MEMKV_")} - node_env_vars()
    assert not unknown_env, f"`memkv node` does not read {sorted(unknown_env)}"
    check_flags_are_real(set(parse_flags(node_args())), "statefulset.yaml")


def test_seeds_are_the_statefulset_pods_control_endpoints() -> None:
    sts = statefulset()
    name, svc, replicas = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    control = ports_of(node_container())["control"]
    seeds = parse_flags(node_args())["--seed"]
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.{re.escape(svc)}(\.\$\(POD_NAMESPACE\)\.svc(\.cluster\.local)?)?")
    ordinals = set()
    for seed in seeds:
        assert seed is not None
        host, port = endpoint(seed)
        m = pattern.fullmatch(host)
        assert m, f"seed {seed} is not a pod DNS name of StatefulSet {name} behind Service {svc}"
        assert port == control, f"seed {seed} must use the control port {control}"
        ordinals.add(int(m.group(1)))
    assert ordinals == set(range(replicas)), "seed every pod of the StatefulSet"


def test_advertise_host_is_the_pods_dns_name() -> None:
    sts = statefulset()
    adv = one(parse_flags(node_args()), ADVERTISE_FLAG)
    assert re.fullmatch(rf"\$\(POD_NAME\)\.{sts['spec']['serviceName']}(\.\$\(POD_NAMESPACE\)\.svc)?", adv), adv
    env = env_of(node_container())
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    if "$(POD_NAMESPACE)" in adv:
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_dependent_env_references_are_defined_first() -> None:
    for spec in pod_specs():
        for c in all_containers(spec):
            defined: set[str] = set()
            for e in c.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", str(e.get("value", ""))):
                    assert ref in defined, f"{c['name']}: env {e['name']} uses $({ref}) before it is defined"
                defined.add(e["name"])
            for arg in list(c.get("command", [])) + list(c.get("args", [])):
                for ref in re.findall(r"\$\((\w+)\)", arg):
                    assert ref in defined, f"{c['name']}: {arg!r} uses undefined $({ref})"


def test_probes_use_declared_ports() -> None:
    for spec in pod_specs():
        for c in all_containers(spec):
            ports = ports_of(c)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                if "exec" in probe:  # a loopback-only port, probed from inside the container
                    (url,) = re.findall(r"http://127\.0\.0\.1:(\d+)/", " ".join(probe["exec"]["command"]))
                    assert int(url) in ports.values(), f"{c['name']} {kind}: {url} is not a declared port"
                    continue
                action = probe.get("tcpSocket") or probe.get("httpGet")
                assert action, f"{c['name']} {kind}"
                port = action["port"]
                assert port in ports if isinstance(port, str) else port in ports.values(), f"{c['name']} {kind}"
    # The node's probes use its health endpoints on the metrics port (the node serves them there).
    node = node_container()
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert node["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert any(a.startswith("--metrics-listen=0.0.0.0:") for a in node["args"])


def test_node_memory_covers_the_arena() -> None:
    c = node_container()
    capacity = size_bytes(env_of(c)["MEMKV_CAPACITY"]["value"])
    res = c["resources"]
    limit = k8s_quantity(res["limits"]["memory"])
    assert k8s_quantity(res["requests"]["memory"]) == limit, "requests == limits keeps the node Guaranteed"
    assert limit >= capacity + (1 << 30), "leave at least 1 GiB over the arena"


def test_termination_grace_exceeds_drain_timeout() -> None:
    drain = parse_flags(node_args()).get("--drain-timeout", [str(DEFAULT_DRAIN_TIMEOUT_S)])[0]
    assert drain is not None
    grace = statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(drain)


def test_prometheus_annotations_point_at_metrics_ports() -> None:
    sts_ann = statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert sts_ann["prometheus.io/scrape"] == "true"
    assert int(sts_ann["prometheus.io/port"]) == endpoint(one(parse_flags(node_args()), "--metrics-listen"))[1]
    worker_ann = worker_pod()["metadata"]["annotations"]
    flags = sidecar_flags()
    assert int(one(flags, "--http-port")) == ports_of(sidecar())["admin"]
    # The admin API is unauthenticated and `GET /env` returns the environment: loopback only,
    # so the pod's scrape target is vLLM's own port.
    assert one(flags, "--http-host") == "127.0.0.1"
    assert worker_ann["prometheus.io/scrape"] == "true"
    assert int(worker_ann["prometheus.io/port"]) == ports_of(vllm())["http"]


def test_secret_and_configmap_references_resolve() -> None:
    res = resources()

    def keys(kind: str, name: str) -> set[str]:
        assert (kind, name) in res, f"{kind} {name} is not among the kustomization's resources"
        doc = res[(kind, name)]
        return set(doc.get("data") or {}) | set(doc.get("stringData") or {})

    seen = 0
    for spec in pod_specs():
        for c in all_containers(spec):
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if ref_kind in src:
                        ref = src[ref_kind]
                        assert ref["key"] in keys(kind, ref["name"]), f"{c['name']}: {ref}"
                        seen += 1
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    keys("Secret", src["secretRef"]["name"])
                if "configMapRef" in src:
                    keys("ConfigMap", src["configMapRef"]["name"])
        for vol in spec.get("volumes", []):
            for field, kind, name_key in (("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")):
                if field in vol:
                    have = keys(kind, vol[field][name_key])
                    for item in vol[field].get("items", []):
                        assert item["key"] in have, f"volume {vol['name']}: no key {item['key']}"
                    seen += 1
    assert seen >= 3
    for spec, c in ((statefulset()["spec"]["template"]["spec"], node_container()), (worker_pod()["spec"], sidecar())):
        assert key_file_path(spec, c) == mounted_secret_path(spec, c)
    secret_text = (K8S / "secret.yaml").read_text()
    assert "memkv keygen" in secret_text
    placeholder = res[("Secret", "memkv-auth")]["stringData"]["auth-key"]
    assert not re.fullmatch(r"[0-9a-fA-F]{64}", placeholder), "ship a placeholder that fails closed, not a key"


def key_file_path(spec: dict[str, Any], c: dict[str, Any]) -> Path:
    """Where the container is told the key file is (MEMKV_AUTH_KEY_FILE or --auth-key-file)."""
    env = env_of(c)
    flags = parse_flags(list(c.get("command", [])) + list(c.get("args", [])))
    named = [env[n]["value"] for n in ("MEMKV_AUTH_KEY_FILE",) if n in env] + list(flags.get("--auth-key-file", []))
    assert len(named) == 1, f"{c['name']}: name the key file once (MEMKV_AUTH_KEY_FILE or --auth-key-file): {named}"
    assert named[0] is not None
    return Path(named[0])


def mounted_secret_path(spec: dict[str, Any], c: dict[str, Any]) -> Path:
    """The file of the memkv-auth Secret's key as mounted (read-only, not world-readable) in ``c``."""
    (vol,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == SECRET[0]]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount.get("readOnly") is True
    mode = vol["secret"].get("defaultMode", 0o644)
    assert mode & 0o007 == 0, f"volume {vol['name']}: the key file must not be world-readable ({mode:o})"
    items = {i["key"]: i.get("path", i["key"]) for i in vol["secret"].get("items", [])} or {SECRET[1]: SECRET[1]}
    return Path(mount["mountPath"]) / items[SECRET[1]]


def test_no_auth_key_in_any_environment() -> None:
    """The key reaches pods only as a mounted file: LMCache's admin port serves `GET /env` unauthenticated."""
    for spec in pod_specs():
        for c in all_containers(spec):
            assert "MEMKV_AUTH_KEY" not in env_of(c), f"{c['name']}: pass the key as a file, not MEMKV_AUTH_KEY"
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}), f"{c['name']}: env {e['name']} holds a secret"
            assert not any("secretRef" in src for src in c.get("envFrom", [])), c["name"]


def test_sidecar_uses_the_memkv_adapter_and_the_control_ports() -> None:
    c = sidecar()
    spec = json.loads(one(sidecar_flags(), "--l2-adapter"))
    assert spec["type"] == "memkv"
    assert set(spec) - {"type"} <= ADAPTER_FIELDS
    env = env_of(c)
    assert {n for n in env if n.startswith("MEMKV_")} <= SIDECAR_ENV
    servers = spec.get("servers") or env["MEMKV_SERVERS"]["value"]
    sts, svc = statefulset(), headless_service()
    control = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["control"]
    pattern = re.compile(
        rf"{sts['metadata']['name']}-(\d+)\.{svc['metadata']['name']}(\.[\w$().-]+\.svc(\.cluster\.local)?)?"
    )
    for server in servers.split(","):
        host, port = endpoint(server.strip())
        m = pattern.fullmatch(host)
        assert m and int(m.group(1)) < sts["spec"]["replicas"], f"{server} is not a MemKV pod of Service {svc}"
        assert port == control, f"{server}: sidecars reach nodes on the control port {control}"


def test_sidecar_memkv_config_is_the_mounted_configmap() -> None:
    c = sidecar()
    path = Path(env_of(c)["MEMKV_CONFIG"]["value"])
    volumes = {v["name"]: v for v in worker_pod()["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if path.parent == Path(m["mountPath"])]
    cm_ref = volumes[mount["name"]]["configMap"]
    items = {i["path"]: i["key"] for i in cm_ref.get("items", [])}
    key = items.get(path.name, path.name)
    cm = resources()[("ConfigMap", cm_ref["name"])]
    check_memkv_config(yaml.safe_load(cm["data"][key]), f"ConfigMap {cm_ref['name']}")


def test_worker_reaches_the_sidecar() -> None:
    flags = sidecar_flags()
    args = vllm()["args"]
    cfg = json.loads(one(parse_flags(args), "--kv-transfer-config"))
    assert cfg["kv_connector"] == "LMCacheMPConnector"
    assert cfg["kv_role"] in ("kv_both", "kv_producer", "kv_consumer")
    extra = cfg["kv_connector_extra_config"]
    assert int(extra["lmcache.mp.port"]) == int(one(flags, "--port")) == ports_of(sidecar())["lmcache"]
    host = extra["lmcache.mp.host"].removeprefix("tcp://")
    assert host in ("127.0.0.1", "localhost") and one(flags, "--host") in ("127.0.0.1", "localhost")
    if extra.get("lmcache.mp.mp_transfer_mode") == "engine_driven":
        assert one(flags, "--supported-transfer-mode") in ("auto", "engine_driven")
        assert one(flags, "--shm-name")
        assert "--no-l1-use-lazy" in flags, "the SHM pool cannot be lazily allocated"
        shm = {m["name"] for c in (vllm(), sidecar()) for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        assert len(shm) == 1, "vLLM and the sidecar must share one /dev/shm"
        (vol,) = [v for v in worker_pod()["spec"]["volumes"] if v["name"] in shm]
        assert vol["emptyDir"]["medium"] == "Memory"
        assert k8s_quantity(vol["emptyDir"]["sizeLimit"]) > float(one(flags, "--l1-size-gb")) * (1 << 30)


def test_sidecar_starts_before_and_stops_after_the_worker() -> None:
    spec = worker_pod()["spec"]
    (c,) = [c for c in spec.get("initContainers", []) if c["name"] == sidecar()["name"]]
    assert c["restartPolicy"] == "Always", "a native sidecar"
    assert f"127.0.0.1:{ports_of(c)['admin']}/" in " ".join(c["startupProbe"]["exec"]["command"])
    assert spec["terminationGracePeriodSeconds"] >= 30


@pytest.mark.slow  # building LMCache's argument parser imports torch (several seconds)
def test_sidecar_flags_are_real_lmcache_server_flags() -> None:
    import argparse

    pytest.importorskip("lmcache")
    from lmcache.cli.commands.server import ServerCommand

    parser = argparse.ArgumentParser()
    ServerCommand().add_arguments(parser)
    real = {o for a in parser._actions for o in a.option_strings}
    unknown = set(sidecar_flags()) - real
    assert not unknown, f"worker.yaml: not `lmcache server` flags: {sorted(unknown)}"
    script_flags = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*) ", LAUNCH.read_text(), re.M))
    assert script_flags and not script_flags - real, f"launch_worker.sh: {sorted(script_flags - real)}"


# ----------------------------------------------------------------------------- MEMKV_CONFIG


def check_memkv_config(cfg: dict[str, Any], where: str) -> None:
    assert isinstance(cfg, dict), where
    assert set(cfg) <= CONFIG_FILE_FIELDS, f"{where}: unknown fields {sorted(set(cfg) - CONFIG_FILE_FIELDS)}"
    if "replicas" in cfg:
        assert isinstance(cfg["replicas"], int) and cfg["replicas"] >= 1, where
    if "transport" in cfg:
        assert cfg["transport"] in ("auto", "tcp", "rdma"), where
    if "num_workers" in cfg:
        assert isinstance(cfg["num_workers"], int) and 0 <= cfg["num_workers"] <= 64, where
    for name in ("timeout_s", "lease_ttl_s"):
        if name in cfg:
            assert isinstance(cfg[name], (int, float)) and cfg[name] > 0, f"{where}: {name}"
    if "servers" in cfg:
        for server in str(cfg["servers"]).split(","):
            assert endpoint(server.strip())[1] == 9901, f"{where}: servers are control endpoints (:9901)"
    assert "auth_key" not in cfg, f"{where}: keep the auth key in a file (auth_key_file / a Secret), not in the example"


def test_memkv_config_example() -> None:
    cfg = yaml.safe_load(CONFIG_EXAMPLE.read_text())
    check_memkv_config(cfg, str(CONFIG_EXAMPLE))
    assert set(cfg) == ADAPTER_FIELDS, "the example shows every field"
    assert "MEMKV_CONFIG" in CONFIG_EXAMPLE.read_text()
    cm = resources()[("ConfigMap", "memkv-client-config")]
    in_cluster = yaml.safe_load(cm["data"]["memkv.yaml"])
    assert {k: cfg[k] for k in in_cluster} == in_cluster, "the ConfigMap should agree with deploy/config/memkv.yaml"


def test_adapter_accepts_the_examples(tmp_path: Path) -> None:
    """The adapter's own resolution chain takes the example file and the sidecar's JSON + env + ConfigMap."""
    settings = pytest.importorskip("lmcache_memkv.adapter.settings")
    key = "ab" * 32
    key_file = tmp_path / "auth-key"
    key_file.write_text(key + "\n")
    example = settings.resolve(
        {"type": "memkv"}, env={"MEMKV_CONFIG": str(CONFIG_EXAMPLE), "MEMKV_AUTH_KEY_FILE": str(key_file)}
    )
    assert example.auth_key == bytes.fromhex(key)
    cfg = yaml.safe_load(CONFIG_EXAMPLE.read_text())
    assert list(example.servers) == cfg["servers"].split(",")
    assert (example.replicas, example.transport, example.prefix) == (cfg["replicas"], cfg["transport"], cfg["prefix"])

    cm = resources()[("ConfigMap", "memkv-client-config")]
    mounted = tmp_path / "memkv.yaml"
    mounted.write_text(cm["data"]["memkv.yaml"])
    env = {n: e["value"] for n, e in env_of(sidecar()).items() if "value" in e}
    assert "MEMKV_AUTH_KEY_FILE" in env  # the pod's path; here the same key in a local file
    env |= {"MEMKV_CONFIG": str(mounted), "MEMKV_AUTH_KEY_FILE": str(key_file)}
    resolved = settings.resolve(json.loads(one(sidecar_flags(), "--l2-adapter")), env=env)
    assert list(resolved.servers) == env["MEMKV_SERVERS"].split(",")
    assert resolved.replicas == yaml.safe_load(mounted.read_text())["replicas"]
    assert resolved.auth_key == bytes.fromhex(key)


# ----------------------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out[key] = value
    return out


def unit_and_env() -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    unit = parse_unit(SYSTEMD / "memkv-node.service")
    service = unit["Service"]
    env = parse_env_file(SYSTEMD / "memkv-node.env")
    (exec_start,) = service["ExecStart"]
    argv = exec_start.split()
    expanded: list[str] = []
    for word in argv:
        m = re.fullmatch(r"\$(\w+)", word)  # unbraced: split into words
        if m:
            expanded.extend(env[m.group(1)].split())
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda mm: env[mm.group(1)], word))
    return service, env, expanded


def test_systemd_unit_runs_memkv_node_with_real_flags() -> None:
    service, env, argv = unit_and_env()
    assert Path(argv[0]).name == "memkv" and argv[1] == "node"
    assert [Path(p).name for p in service["EnvironmentFile"]] == ["memkv-node.env"]
    used = set(re.findall(r"\$\{?(\w+)\}?", service["ExecStart"][0]))
    assert used <= set(env), f"ExecStart uses {sorted(used - set(env))}, which memkv-node.env does not set"
    unread = {k for k in env if k not in used} - node_env_vars()
    assert not unread, f"memkv-node.env sets {sorted(unread)}, which nothing reads"
    flags = parse_flags(argv[2:])
    for flag in ("--control-listen", "--metrics-listen", "--listen"):
        if flag in flags:
            endpoint(one(flags, flag))
    for seed in flags.get("--seed", []):
        assert seed is not None and endpoint(seed)[1] == 9901
    check_flags_are_real(set(flags), "memkv-node.service")


def test_systemd_unit_stops_gracefully_and_restarts() -> None:
    service, _, argv = unit_and_env()
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    drain = parse_flags(argv[2:]).get("--drain-timeout", [str(DEFAULT_DRAIN_TIMEOUT_S)])[0]
    assert drain is not None
    assert duration_s(service["TimeoutStopSec"][-1]) > float(drain)


def test_systemd_unit_is_hardened_but_allows_a_large_arena() -> None:
    service, _, _ = unit_and_env()
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")):
        assert service.get(key) == [value], key
    assert service.get("LimitMEMLOCK") == ["infinity"]
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert "MemoryMax" not in service or service["MemoryMax"] == ["infinity"], "size MemoryMax per host, not here"
    assert any("@system-service" in v for v in service["SystemCallFilter"])


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    memkv = Path(sys.executable).with_name("memkv")
    if analyze is None or not memkv.exists():
        pytest.skip("systemd-analyze or the memkv script is missing")
    text = (SYSTEMD / "memkv-node.service").read_text()
    unit = tmp_path / "memkv-node.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={memkv}", text))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- Dynamo launch script


def test_launch_script_is_valid_bash() -> None:
    assert LAUNCH.stat().st_mode & stat.S_IXUSR, "launch_worker.sh should be executable"
    proc = subprocess.run(["bash", "-n", str(LAUNCH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, str(LAUNCH)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout


FAKE_LMCACHE = """\
#!{python}
import http.server, os, signal, sys, time
args = sys.argv[1:]
port = int(args[args.index("--http-port") + 1])
log = os.environ["FAKE_LOG"]
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
note("sidecar start " + " ".join(args) + " servers=" + os.environ.get("MEMKV_SERVERS", ""))
key_file = os.environ.get("MEMKV_AUTH_KEY_FILE", "")
with open(log + ".key", "w") as f:
    f.write(repr((os.environ.get("MEMKV_AUTH_KEY"), key_file, open(key_file).read() if key_file else None)))
with open(log + ".pid", "w") as f:
    f.write(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
if os.environ.get("FAKE_EXIT_BEFORE_READY"):
    sys.exit(int(os.environ["FAKE_EXIT_BEFORE_READY"]))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/status" else 404)
        self.end_headers()
        self.wfile.write(b"{{}}")
    def log_message(self, *args):
        pass
def on_term(*_):
    note("sidecar TERM")
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

FAKE_WORKER = textwrap.dedent(
    """\
    import os, signal, sys, time
    def note(text):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(text + "\\n")
    def on_term(*_):
        note("worker TERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    note("worker start")
    if sys.argv[1] == "exit":
        sys.exit(int(sys.argv[2]))
    time.sleep(60)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launch:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        fake = bindir / "lmcache"
        fake.write_text(FAKE_LMCACHE.format(python=sys.executable))
        fake.chmod(0o755)
        self.log = tmp_path / "log"
        self.log.touch()
        self.env = {
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
            "FAKE_LOG": str(self.log),
            "MEMKV_SERVERS": "memkv-0.memkv:9901",
            "LMCACHE_HTTP_PORT": str(free_port()),
            "STOP_TIMEOUT_S": "5",
            **env,
        }

    def start(self, *worker: str) -> subprocess.Popen[str]:
        cmd = ["bash", str(LAUNCH)]
        if worker:
            cmd += ["--", sys.executable, "-c", FAKE_WORKER, *worker]
        return subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines()):
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged; log: {self.lines()}")


def finish(proc: subprocess.Popen[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def test_launch_script_runs_worker_after_sidecar_and_returns_its_status(tmp_path: Path) -> None:
    launch = Launch(tmp_path, FAKE_DELAY="0.5")
    rc, out = finish(launch.start("exit", "7"))
    assert rc == 7, out
    lines = launch.lines()
    assert [line.split()[0:2] for line in lines] == [["sidecar", "start"], ["worker", "start"], ["sidecar", "TERM"]]
    assert '--l2-adapter {"type":"memkv"}' in lines[0] and "servers=memkv-0.memkv:9901" in lines[0]


def test_launch_script_forwards_sigterm_to_worker_then_sidecar(tmp_path: Path) -> None:
    launch = Launch(tmp_path)
    proc = launch.start("sleep")
    launch.wait_for("worker start")
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out
    assert launch.lines()[1:] == ["worker start", "worker TERM", "sidecar TERM"], out


def test_launch_script_fails_when_the_sidecar_does_not_start(tmp_path: Path) -> None:
    launch = Launch(tmp_path, FAKE_EXIT_BEFORE_READY="3")
    rc, out = finish(launch.start("exit", "0"))
    assert rc == 3, out
    assert not any(line.startswith("worker") for line in launch.lines())


def test_launch_script_stops_the_worker_when_the_sidecar_dies(tmp_path: Path) -> None:
    launch = Launch(tmp_path)
    proc = launch.start("sleep")
    launch.wait_for("worker start")
    sidecar_pid = int(Path(f"{launch.log}.pid").read_text())
    os.kill(sidecar_pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc != 0, out
    assert "worker TERM" in launch.lines(), out


def test_launch_script_keeps_the_key_out_of_the_sidecars_environment(tmp_path: Path) -> None:
    key = "cd" * 32
    launch = Launch(tmp_path, MEMKV_AUTH_KEY=key)
    rc, out = finish(launch.start("exit", "0"))
    assert rc == 0, out
    env_key, key_file, content = ast.literal_eval(Path(f"{launch.log}.key").read_text())
    assert env_key is None, "the sidecar's /env would show MEMKV_AUTH_KEY"
    assert content.strip() == key
    assert not Path(key_file).exists(), "the private key file is removed on exit"
    assert "prefer MEMKV_AUTH_KEY_FILE" in out


def test_launch_script_passes_a_key_file_through(tmp_path: Path) -> None:
    key_file = tmp_path / "auth-key"
    key_file.write_text("ef" * 32)
    launch = Launch(tmp_path, MEMKV_AUTH_KEY_FILE=str(key_file))
    rc, out = finish(launch.start("exit", "0"))
    assert rc == 0, out
    assert ast.literal_eval(Path(f"{launch.log}.key").read_text()) == (None, str(key_file), "ef" * 32)
    assert key_file.exists()
    missing = tmp_path / "missing"
    missing.mkdir()
    launch = Launch(missing, MEMKV_AUTH_KEY_FILE=str(tmp_path / "nope"))
    rc, out = finish(launch.start("exit", "0"))
    assert rc == 2 and "MEMKV_AUTH_KEY_FILE" in out


def test_launch_script_needs_servers(tmp_path: Path) -> None:
    launch = Launch(tmp_path)
    del launch.env["MEMKV_SERVERS"]
    rc, out = finish(launch.start("exit", "0"))
    assert rc == 2 and "MEMKV_SERVERS" in out
    assert launch.lines() == []


# ----------------------------------------------------------------------------- Grafana


METRIC_RE = re.compile(r"\b((?:memkv|lmcache)_[a-zA-Z0-9_:]+)")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels_of(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(d: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels_of(d) for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def test_dashboard_structure() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in panels_of(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels_of(d):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: unknown variable ${var}"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]


def test_dashboard_uses_only_real_metrics_and_all_of_them() -> None:
    used = set()
    for expr in expressions(dashboard()):
        names = METRIC_RE.findall(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            if name.startswith("lmcache_"):
                assert name.startswith("lmcache_mp_"), name
                continue
            base = base_metric(name)
            assert base in NODE_METRICS | SIDECAR_METRICS, f"unknown metric {name} in {expr!r}"
            used.add(base)
    assert used == NODE_METRICS | SIDECAR_METRICS, f"no panel shows {sorted(NODE_METRICS | SIDECAR_METRICS - used)}"


def test_dashboard_rates_counters_and_quantiles_histograms() -> None:
    for expr in expressions(dashboard()):
        for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", expr):
            assert name.endswith(("_total", "_bucket", "_sum", "_count")), f"{fn}() over a gauge: {expr!r}"
            assert base_metric(name) not in GAUGES, expr
        for m in re.finditer(r"histogram_quantile\(\s*([0-9.]+)\s*,(.*)", expr):
            assert 0 < float(m.group(1)) < 1
            inner = m.group(2)
            assert re.search(r"by \([^)]*\ble\b", inner), f"histogram_quantile must keep `le`: {expr!r}"
            (name,) = {n for n in METRIC_RE.findall(inner)}
            assert name.endswith("_bucket") and base_metric(name) in HISTOGRAMS, expr
        for name in METRIC_RE.findall(expr):
            if base_metric(name) in HISTOGRAMS:
                assert name != base_metric(name), f"a histogram is queried through _bucket/_sum/_count: {expr!r}"


def test_dashboard_covers_the_asked_for_views() -> None:
    exprs = "\n".join(expressions(dashboard()))
    titles = " ".join(p["title"].lower() for p in panels_of(dashboard()))
    assert exprs.count("histogram_quantile(") >= 6
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, op) (rate(memkv_node_request_seconds_bucket" in exprs
        assert f"histogram_quantile({q}, sum by (le, op) (rate(memkv_l2_op_seconds_bucket" in exprs
    for word in (
        "throughput",
        "hit ratio",
        "latency",
        "error",
        "arena",
        "keys",
        "leases",
        "connections",
        "members",
        "epoch",
    ):
        assert word in titles, word


def test_node_exports_the_metrics_the_dashboard_uses() -> None:
    from prometheus_client import generate_latest

    from lmcache_memkv.node.metrics import NodeMetrics

    metrics = NodeMetrics("test-node", lambda: collections.defaultdict(int))
    exported = set(re.findall(r"^# TYPE (\S+) ", generate_latest(metrics.registry).decode(), re.M))
    missing = NODE_METRICS - exported
    assert not missing, f"the node does not export {sorted(missing)}"
