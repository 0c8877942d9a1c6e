"""Baton on Kubernetes, without a cluster: rendered manifests checked against Kubernetes'
own schemas, the CRD's schema against the graph files, the operator's reconcile as worked
examples, and the operator's shell and the planner's connector against a stand-in API server
(``tests/kube_fake.py``)."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp.test_utils import TestServer

from baton.config import KubeApiConfig, OperatorConfig
from baton.control.connectors import PoolCounts
from baton.deploy import crd, describe, reconcile, render, resource, status
from baton.deploy.connector import KubernetesConnector
from baton.deploy.manifests import operator
from baton.deploy.observability import dashboard, monitors, queried_metrics, scrape_config
from baton.deploy.operator import run_operator, sync
from baton.graph import load_graph, parse_graph
from baton.runtime.kube_api import KubeApi, KubeError
from baton.runtime.kube_discovery import ready_addresses
from tests.conftest import baton_process
from tests.kube_fake import FakeKubeApi

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("graph-*.yaml"))
K8S = kubernetes_validate.latest_version()


def raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


def by_name(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    pod: dict[str, Any] = by_name(objects)[f"Deployment/{name}"]["spec"]["template"]["spec"]
    return pod | {"container": pod["containers"][0]}


# ---------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_graph_renders_manifests_kubernetes_accepts(path):
    objects = render(load_graph(path), "demo", profile="{}")
    for obj in objects:
        validate(obj)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    config = load_graph(path)
    for pool in config.workers:
        deployment = by_name(objects)[f"Deployment/demo-worker-{pool.name}"]
        assert deployment["spec"]["replicas"] == pool.count
        assert f"PodDisruptionBudget/demo-worker-{pool.name}" in by_name(objects)


def test_the_schema_check_can_fail():
    objects = render(load_graph(EXAMPLES[0]), "demo")
    bad = copy.deepcopy(by_name(objects)["Deployment/demo-worker-agg"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = copy.deepcopy(by_name(objects)["Deployment/demo-worker-agg"])
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_a_worker_pod_runs_the_local_graphs_command_on_its_pod_address():
    config = load_graph(ROOT / "examples/graph-disagg.yaml")
    objects = render(config, "demo")
    pod = container(objects, "demo-worker-prefill")
    args = pod["container"]["args"]
    assert args[:3] == ["worker", "--host", "0.0.0.0"]
    assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"
    assert args[args.index("--role") + 1] == "prefill"
    assert args[args.index("--kv-transfer") + 1] == "tcp"
    assert args[args.index("--nats") + 1] == "nats://demo-nats:4222"
    assert args[args.index("--namespace") + 1] == "baton-disagg"
    env = {e["name"]: e["valueFrom"] for e in pod["container"]["env"]}
    assert env["BATON_CLUSTER_TOKEN"]["secretKeyRef"] == {"name": "demo-cluster-token",
                                                          "key": "token"}
    # ready only once registered (503 while draining); restarted only when it stops answering
    assert pod["container"]["readinessProbe"]["httpGet"] == {"path": "/health",
                                                             "port": "metrics"}
    assert pod["container"]["livenessProbe"]["httpGet"]["path"] == "/live"
    assert pod["container"]["startupProbe"]["failureThreshold"] * 5 >= 600
    # the grace period covers the worker's drain (--drain-timeout-s, 30 s)
    assert pod["terminationGracePeriodSeconds"] == 45
    frontend = container(objects, "demo-frontend-0")
    assert frontend["container"]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert frontend["terminationGracePeriodSeconds"] == 50
    assert frontend["container"]["args"][frontend["container"]["args"].index("--router") + 1] \
        == "kv"


def test_topology_keeps_a_graph_in_one_domain_and_spreads_each_pool():
    graph = raw(ROOT / "examples/graph-disagg.yaml")
    graph["kubernetes"] = {"topology": {"key": "example.com/rack", "mode": "required"}}
    pod = container(render(parse_graph(graph), "demo"), "demo-worker-decode")
    term = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term == {"labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "demo"}},
                    "topologyKey": "example.com/rack"}
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"]["baton.dev/pool"] == "decode"
    graph["kubernetes"] = {"topology": {"mode": "preferred"}}
    pod = container(render(parse_graph(graph), "demo"), "demo-worker-decode")
    preferred = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"
    graph["kubernetes"] = {"topology": {"mode": "off"}}
    assert "affinity" not in container(render(parse_graph(graph), "demo"), "demo-worker-decode")


def test_resources_and_gpus_are_requested_and_limited():
    graph = raw(ROOT / "examples/graph-disagg.yaml")
    graph["workers"][1]["resources"] = {"cpu": "8", "memory": "64Gi", "gpus": 2}
    graph["kubernetes"] = {"gpu_resource": "amd.com/gpu", "node_selector": {"pool": "gpu"},
                           "env": {"BATON_TRACE_EXPORTER": "otlp"}}
    objects = render(parse_graph(graph), "demo")
    for obj in objects:
        validate(obj)
    decode = container(objects, "demo-worker-decode")
    want = {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "2"}
    assert decode["container"]["resources"] == {"requests": want, "limits": want}
    assert decode["nodeSelector"] == {"pool": "gpu"}
    assert {"name": "BATON_TRACE_EXPORTER", "value": "otlp"} in decode["container"]["env"]
    assert "resources" not in container(objects, "demo-worker-prefill")["container"]


def test_the_planner_runs_with_its_profile_and_may_change_only_its_own_deployment():
    config = load_graph(ROOT / "examples/graph-planner.yaml")
    objects = by_name(render(config, "demo", profile='{"x": 1}'))
    assert objects["ConfigMap/demo-planner-profile"]["data"] == {"profile.json": '{"x": 1}'}
    rule = objects["Role/demo-planner"]["rules"][0]
    assert rule == {"apiGroups": ["baton.dev"], "resources": ["batondeployments"],
                    "resourceNames": ["demo"], "verbs": ["get", "patch"]}
    pod = objects["Deployment/demo-planner"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:3] == ["planner", "--profile", "/etc/baton/planner/profile.json"]
    assert args[args.index("--connector") + 1] == "kubernetes"
    assert args[args.index("--deployment") + 1] == "demo"
    assert args[-2:] == ["--max-workers", "4"]  # the graph's own planner args come last
    assert pod["serviceAccountName"] == "demo-planner"
    assert "ConfigMap/demo-planner-profile" not in by_name(render(config, "demo"))


@pytest.mark.parametrize(("name", "change", "message"), [
    ("Demo", {}, "name: 'Demo' is not a Kubernetes name"),
    ("demo", {"workers": [{"name": "pre_fill"}]}, "workers[0].name: 'pre_fill'"),
    ("d" * 50, {}, "longer than Kubernetes' 63 characters"),
])
def test_names_kubernetes_would_refuse_are_refused_with_the_field(name, change, message):
    graph = raw(EXAMPLES[0]) | change
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render(parse_graph(graph), name)


# ---------------------------------------------------------------------------- the CRD


def structural_problems(node: dict[str, Any], path: str = "") -> list[str]:
    """What Kubernetes' structural-schema rules refuse (every node typed, no references,
    properties and additionalProperties not together, no additionalProperties: false)."""
    problems = []
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "$defs"):
        if forbidden in node:
            problems.append(f"{path}: {forbidden}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties false")
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(
            node.get("exclusiveMinimum"), bool):
        problems.append(f"{path}: numeric exclusiveMinimum")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_problems(node[key], f"{path}[{key}]")
    return problems


def cr_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def validate_cr(cr: dict[str, Any]) -> None:
    """As the API server checks a custom resource (OpenAPI 3.0: JSON Schema draft 4's
    keywords, ``nullable`` aside)."""
    jsonschema.Draft4Validator(cr_schema()).validate(cr)


def test_the_crd_is_valid_and_its_schema_structural():
    validate(crd())
    assert structural_problems(cr_schema()) == []
    spec = cr_schema()["properties"]["spec"]["properties"]
    assert spec["workers"]["items"]["properties"]["role"] == {
        "type": "string", "enum": ["agg", "decode", "prefill"]}
    assert spec["planner"]["nullable"] is True
    seconds = spec["supervision"]["properties"]["grace_s"]
    assert seconds == {"type": "number", "minimum": 0, "exclusiveMinimum": True}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_graph_is_a_valid_baton_deployment(path):
    cr = resource(raw(path), "demo")
    validate_cr(cr)
    assert parse_graph(cr["spec"]) == load_graph(path)


@pytest.mark.parametrize(("change", "where"), [
    ({"workers": [{"name": "a", "count": 0}]}, "minimum"),
    ({"workers": [{"name": "a", "role": "both"}]}, "is not one of"),
    ({"workers": []}, "should be non-empty"),
])
def test_the_crd_refuses_what_the_graph_schema_refuses(change, where):
    cr = resource(raw(EXAMPLES[0]) | change, "demo")
    with pytest.raises(jsonschema.ValidationError, match=where):
        validate_cr(cr)
    with pytest.raises(ValueError):
        parse_graph(cr["spec"])


def test_the_short_nats_url_is_written_out_long_for_the_crd():
    cr = resource({"workers": [{"name": "a"}], "nats": "nats://nats.example:4222"}, "demo")
    assert cr["spec"]["nats"] == {"url": "nats://nats.example:4222", "start": False}
    validate_cr(cr)
    objects = by_name(render(parse_graph(cr["spec"]), "demo"))
    assert "StatefulSet/demo-nats" not in objects
    args = objects["Deployment/demo-worker-a"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--nats") + 1] == "nats://nats.example:4222"


def test_the_operators_objects_are_valid():
    for obj in operator("baton:0.1.0", "baton-system"):
        validate(obj)


# ---------------------------------------------------------------------------- reconcile


def cluster_copy(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects as the API server returns them: with fields of its own added."""
    out = copy.deepcopy(objects)
    for obj in out:
        obj["metadata"] |= {"uid": "u", "resourceVersion": "7", "creationTimestamp": "t"}
        if obj["kind"] == "Deployment":
            obj["spec"]["strategy"] = {"type": "RollingUpdate"}
            obj["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/x"
            obj["status"] = {"replicas": obj["spec"]["replicas"],
                             "readyReplicas": obj["spec"]["replicas"]}
    return out


def disagg(name: str = "demo", **pools: int) -> dict[str, Any]:
    graph = raw(ROOT / "examples/graph-disagg.yaml")
    for pool in graph["workers"]:
        pool["count"] = pools.get(pool["name"], pool["count"])
    cr = resource(graph, name)
    cr["metadata"] |= {"namespace": "serving", "uid": "cr-uid", "generation": 3}
    return cr


def test_reconcile_creates_every_object_in_order_owned_by_the_resource():
    actions = reconcile(disagg(), [])
    assert describe(actions) == [
        "apply StatefulSet/demo-nats (missing)", "apply Service/demo-nats (missing)",
        "apply Deployment/demo-worker-prefill (missing)",
        "apply PodDisruptionBudget/demo-worker-prefill (missing)",
        "apply Deployment/demo-worker-decode (missing)",
        "apply PodDisruptionBudget/demo-worker-decode (missing)",
        "apply Deployment/demo-frontend-0 (missing)", "apply Service/demo-frontend-0 (missing)",
        "apply PodDisruptionBudget/demo-frontend-0 (missing)",
    ]
    for action in actions:
        meta = action.manifest["metadata"]
        assert meta["namespace"] == "serving"
        assert meta["ownerReferences"] == [{
            "apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment", "name": "demo",
            "uid": "cr-uid", "controller": True, "blockOwnerDeletion": True}]


def applied(cr: dict[str, Any]) -> list[dict[str, Any]]:
    return cluster_copy([a.manifest for a in reconcile(cr, [])])


def test_reconcile_leaves_a_cluster_that_matches_alone():
    assert reconcile(disagg(), applied(disagg())) == []


def test_reconcile_scales_a_pool_by_its_replicas_alone():
    actions = reconcile(disagg(decode=3), applied(disagg()))
    assert describe(actions) == ["apply Deployment/demo-worker-decode (spec.replicas)"]
    assert actions[0].manifest["spec"]["replicas"] == 3


def test_reconcile_deletes_a_removed_pool_and_leaves_other_deployments_alone():
    cr = disagg()
    cr["spec"]["workers"] = [{"name": "agg", "role": "agg", "count": 2}]
    stranger = {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "someone-else", "labels": {"app": "x"}}, "spec": {}}
    other = cluster_copy([a.manifest for a in reconcile(disagg("other"), [])])
    actions = reconcile(cr, [*applied(disagg()), stranger, *other])
    assert describe(actions) == [
        "apply Deployment/demo-worker-agg (missing)",
        "apply PodDisruptionBudget/demo-worker-agg (missing)",
        "delete Deployment/demo-worker-prefill (no longer rendered)",
        "delete PodDisruptionBudget/demo-worker-prefill (no longer rendered)",
        "delete Deployment/demo-worker-decode (no longer rendered)",
        "delete PodDisruptionBudget/demo-worker-decode (no longer rendered)",
    ]


def test_reconcile_changes_a_pools_role_in_place():
    cr = disagg()
    cr["spec"]["workers"][0]["role"] = "agg"
    actions = reconcile(cr, applied(disagg()))
    assert describe(actions) == [
        "apply Deployment/demo-worker-prefill (metadata.labels.baton.dev/role)"]
    args = actions[0].manifest["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--role") + 1] == "agg"


def test_reconcile_replaces_a_workload_whose_selector_changed():
    observed = applied(disagg())
    deployment = next(o for o in observed if o["metadata"]["name"] == "demo-worker-decode")
    deployment["spec"]["selector"]["matchLabels"]["tier"] = "old"
    assert describe(reconcile(disagg(), observed)) == [
        "delete Deployment/demo-worker-decode (selector changed)",
        "apply Deployment/demo-worker-decode (replaced)"]


def test_status_counts_each_pools_replicas():
    observed = applied(disagg())
    decode = next(o for o in observed if o["metadata"]["name"] == "demo-worker-decode")
    decode["status"] = {"replicas": 2, "readyReplicas": 1}
    assert status(disagg(decode=3), observed) == {
        "observedGeneration": 3, "ready": "3/5",
        "pools": {"prefill": {"role": "prefill", "desired": 2, "replicas": 2, "ready": 2},
                  "decode": {"role": "decode", "desired": 3, "replicas": 2, "ready": 1}}}


# ---------------------------------------------------------------------------- the shell


@pytest.fixture
async def kube():
    fake = FakeKubeApi()
    server = TestServer(fake.app)
    await server.start_server()
    api = KubeApi(str(server.make_url("")), "serving")
    yield fake, api
    await api.close()
    await server.close()


async def create(api: KubeApi, cr: dict[str, Any]) -> dict[str, Any]:
    cr = copy.deepcopy(cr)
    for key in ("uid", "generation"):
        cr["metadata"].pop(key)
    return await api.apply(cr)


async def test_the_operator_creates_scales_and_reports_a_deployment(kube):
    fake, api = kube
    cr = await create(api, disagg())
    await sync(api, cr)
    assert fake.names("deployments") == ["demo-frontend-0", "demo-worker-decode",
                                         "demo-worker-prefill"]
    owner = fake.get("deployments", "demo-worker-decode", "serving")["metadata"]
    assert owner["ownerReferences"][0]["uid"] == cr["metadata"]["uid"]
    assert fake.get("batondeployments", "demo", "serving")["status"]["ready"] == "0/4"
    fake.settle()
    cr = fake.get("batondeployments", "demo", "serving")
    assert (await sync(api, cr))["ready"] == "4/4"
    calls = len(fake.calls)
    await sync(api, cr)  # nothing changed: lists and a status write, no apply
    assert [m for m, _ in fake.calls[calls:]].count("PATCH") == 1
    # the planner's connector asks for one more decode worker
    connector = KubernetesConnector(api, "demo")
    assert await connector.pools() == {"prefill": PoolCounts(ready=2),
                                       "decode": PoolCounts(ready=2)}
    counts = await connector.scale({"decode": 3})
    assert counts["decode"] == PoolCounts(ready=2, starting=1)
    cr = fake.get("batondeployments", "demo", "serving")
    assert cr["metadata"]["generation"] == 2
    await sync(api, cr)
    assert fake.get("deployments", "demo-worker-decode", "serving")["spec"]["replicas"] == 3
    fake.settle()
    await sync(api, fake.get("batondeployments", "demo", "serving"))
    assert await connector.pools() == {"prefill": PoolCounts(ready=2),
                                       "decode": PoolCounts(ready=3)}
    # and one fewer: ready pods above the count are on their way out
    assert (await connector.scale({"decode": 2}))["decode"] == PoolCounts(ready=2, draining=1)


async def test_a_scale_against_pools_edited_meanwhile_is_refused(kube):
    fake, api = kube
    await create(api, disagg())
    connector = KubernetesConnector(api, "demo")
    await connector.pools()
    cr = copy.deepcopy(fake.get("batondeployments", "demo", "serving"))
    cr["spec"]["workers"].reverse()  # someone reorders the pools between read and patch
    original = KubeApi.get

    async def read_then_edit(self, path):
        got = await original(self, path)
        fake.objects["batondeployments", "serving", "demo"] = cr
        return got

    KubeApi.get = read_then_edit  # type: ignore[method-assign]
    try:
        with pytest.raises(KubeError, match="422"):
            await connector.scale({"decode": 3})
    finally:
        KubeApi.get = original  # type: ignore[method-assign]
    assert fake.get("batondeployments", "demo", "serving")["spec"]["workers"][1]["count"] == 2


async def test_an_invalid_spec_changes_nothing_and_says_why(kube):
    fake, api = kube
    cr = disagg()
    cr["spec"]["workers"][0]["name"] = "Pre_Fill"
    cr = await create(api, cr)
    new = await sync(api, cr)
    assert new["message"].startswith("invalid spec: workers[0].name: 'Pre_Fill'")
    assert fake.names("deployments") == []


async def eventually(check, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_the_operator_under_kopf_follows_creates_and_spec_changes(kube):
    """The kopf loop itself (``baton deploy operator``): discovery, the watch, the create,
    update and timer handlers, against the stand-in API server."""
    fake, api = kube
    await create(api, disagg())
    stop = asyncio.Event()
    config = OperatorConfig(kube=KubeApiConfig(kube_namespace="serving"), interval_s=0.5,
                            health_port=0)
    task = asyncio.create_task(run_operator(KubeApi(api.server, "serving"), config, stop))
    try:
        def status_ready() -> str | None:
            return fake.get("batondeployments", "demo", "serving").get("status", {}).get("ready")

        await eventually(lambda: status_ready() == "0/4")
        assert fake.names("deployments") == ["demo-frontend-0", "demo-worker-decode",
                                             "demo-worker-prefill"]
        fake.settle()
        await eventually(lambda: status_ready() == "4/4")  # the timer saw the pods ready
        await KubernetesConnector(api, "demo").scale({"prefill": 1})  # the planner
        await eventually(lambda: fake.get("deployments", "demo-worker-prefill",
                                          "serving")["spec"]["replicas"] == 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_the_connector_reaches_no_api_with_a_clear_error():
    api = KubeApi("http://127.0.0.1:1", "serving")
    try:
        with pytest.raises(Exception, match="kubernetes API at http://127.0.0.1:1"):
            await KubernetesConnector(api, "demo").pools()
    finally:
        await api.close()


# ---------------------------------------------------------------------------- the CLI


def baton(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_baton_deploy_render_prints_what_kubectl_applies():
    out = baton("deploy", "render", "-f", "examples/graph-planner.yaml", "--name", "demo")
    assert out.returncode == 0, out.stderr
    objects = list(yaml.safe_load_all(out.stdout))
    for obj in objects:
        validate(obj)
    profile = by_name(objects)["ConfigMap/demo-planner-profile"]["data"]["profile.json"]
    assert json.loads(profile) == json.loads((ROOT / "examples/worker-profile.json").read_text())


def test_baton_deploy_resource_and_install():
    out = baton("deploy", "resource", "-f", "examples/graph-planner.yaml", "--name", "demo")
    assert out.returncode == 0, out.stderr
    cr, profile = yaml.safe_load_all(out.stdout)
    validate_cr(cr)
    assert "app.kubernetes.io/managed-by" not in profile["metadata"]["labels"]
    out = baton("deploy", "install", "--image", "registry.example/baton:1")
    objects = list(yaml.safe_load_all(out.stdout))
    assert [o["kind"] for o in objects] == ["CustomResourceDefinition", "ServiceAccount",
                                           "ClusterRole", "ClusterRoleBinding", "Deployment"]


@pytest.mark.parametrize(("args", "message"), [
    (["deploy", "render", "-f", "examples/graph-agg.yaml", "--name", "Bad"],
     "baton deploy render: name: 'Bad' is not a Kubernetes name"),
    (["deploy", "operator"], "not in a Kubernetes pod"),
    (["planner", "--profile", "p.json", "--connector", "kubernetes"],
     "--connector kubernetes needs the BatonDeployment's name"),
    (["planner", "--profile", "p.json", "--connector", "kubernetes", "--deployment", "demo"],
     "not in a Kubernetes pod"),
])
def test_what_cannot_run_here_says_why_in_one_line(args, message):
    out = baton(*args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- the image


def test_the_dockerfile_passes_its_linter():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_image_builds_where_a_docker_engine_runs(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True,
                                        timeout=30).returncode != 0:
        pytest.skip("no Docker engine on this machine (docs/kubernetes.md says so)")
    out = subprocess.run([docker, "build", "--build-arg", "EXTRAS=kubernetes", "-t", "baton:test",
                          str(ROOT)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run([docker, "run", "--rm", "baton:test", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert "deploy" in out.stdout


# ---------------------------------------------------------------------------- observability


def exported(text: str) -> set[str]:
    """The sample names an exposition can carry: each family's name with its type's
    suffixes (a family with no samples yet still declares its TYPE)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("_sum", "_count", "")}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            name = name.removesuffix("_total") if kind == "counter" else name
            names |= {name + s for s in suffixes.get(kind, ("",))}
    return names


def test_the_dashboard_file_is_the_one_baton_prints():
    board = json.loads((ROOT / "deploy/grafana/baton.json").read_text())
    assert board == dashboard()
    out = baton("deploy", "dashboard")
    assert json.loads(out.stdout) == board
    titles = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert titles == ["Frontend", "Router", "Workers", "Planner"]
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)


def test_every_dashboard_query_names_a_metric_a_live_server_exports(make_server):
    """A frontend's /metrics (with its router's and, under ``baton serve``, its workers');
    the planner's are checked against a live planner in test_planner_service.py."""
    import openai

    srv = make_server(workers=2, router="kv", host_kv_blocks=32)
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="baton-tiny", max_tokens=4,
                                   messages=[{"role": "user", "content": "hello"}])
    with urllib.request.urlopen(f"{srv.base_url}/metrics", timeout=10) as resp:
        names = exported(resp.read().decode())
    wanted = {m for m in queried_metrics(dashboard()) if not m.startswith("baton_planner_")}
    assert wanted, "the dashboard queries nothing"
    assert wanted - names == set()


def test_prometheus_finds_every_baton_process_on_its_metrics_port():
    """Frontends through their Services, workers and the planner as pods; every Baton
    Deployment is matched by exactly one of the two, on a port it has."""
    services, pods = monitors("serving")
    assert (services["kind"], pods["kind"]) == ("ServiceMonitor", "PodMonitor")
    objects = render(load_graph(ROOT / "examples/graph-planner.yaml"), "demo", profile="{}")
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        named = {p["name"] for p in obj["spec"]["template"]["spec"]["containers"][0]["ports"]}
        by_service = labels["app.kubernetes.io/component"] == "frontend"
        by_pod = labels["app.kubernetes.io/component"] in \
            pods["spec"]["selector"]["matchExpressions"][0]["values"]
        assert by_service != by_pod, obj["metadata"]["name"]
        port = (services["spec"]["endpoints"] if by_service
                else pods["spec"]["podMetricsEndpoints"])[0]["port"]
        assert port in named
    frontend_service = by_name(objects)["Service/demo-frontend-0"]
    assert all(frontend_service["metadata"]["labels"][k] == v
               for k, v in services["spec"]["selector"]["matchLabels"].items())
    assert {p["name"] for p in frontend_service["spec"]["ports"]} == {"http"}
    job = scrape_config()["scrape_configs"][0]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep[0]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_part_of"]
    assert set(keep[1]["regex"].split("|")) == {"metrics", "http"}


# ---------------------------------------------------------------------------- discovery


def test_ready_addresses_are_the_request_ports_of_ready_endpoints():
    slices = [
        {"ports": [{"name": "request", "port": 9000}, {"name": "kv", "port": 9100}],
         "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                       {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                       {"addresses": ["10.0.0.3"]},  # unknown readiness counts as ready
                       {"addresses": ["fd00::4"], "conditions": {"ready": True}}]},
        {"ports": [{"name": "metrics", "port": 9090}],
         "endpoints": [{"addresses": ["10.0.0.9"]}]},
        {"ports": [{"name": "request", "port": 9000}], "endpoints": None},
    ]
    assert ready_addresses(slices) == ["tcp://10.0.0.1:9000", "tcp://10.0.0.3:9000",
                                       "tcp://[fd00::4]:9000"]


def test_kubernetes_discovery_renders_a_headless_service_per_pool_and_the_rights_to_read_it():
    graph = raw(ROOT / "examples/graph-planner.yaml")
    graph["kubernetes"] = {"discovery": "kubernetes"}
    objects = by_name(render(parse_graph(graph), "demo", profile="{}"))
    for obj in objects.values():
        validate(obj)
    service = objects["Service/demo-worker-agg"]["spec"]
    assert service["clusterIP"] == "None" and service["ports"][0]["name"] == "request"
    selector = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=worker"
    for name in ("demo-frontend-0", "demo-planner", "demo-worker-agg"):
        args = container(list(objects.values()), name)["container"]["args"]
        assert args[args.index("--discovery") + 1] == "kubernetes"
        assert args[args.index("--kube-workers") + 1] == selector
    assert container(list(objects.values()), "demo-frontend-0")["serviceAccountName"] == \
        "demo-discovery"
    reads = {r["apiGroups"][0]: r["resources"] for r in objects["Role/demo-discovery"]["rules"]}
    assert reads == {"": ["services"], "discovery.k8s.io": ["endpointslices"]}
    planner_rules = objects["Role/demo-planner"]["rules"]
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"]} in planner_rules


def endpoint_slice(port: int, ready: bool) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "demo-worker-agg-x1",
                         "labels": {"kubernetes.io/service-name": "demo-worker-agg"}},
            "addressType": "IPv4", "ports": [{"name": "request", "port": port}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]}


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_frontend_finds_its_workers_through_the_kubernetes_api(kube):
    """``--discovery kubernetes``: a real frontend process follows the worker endpoints the
    (stand-in) API lists: serves through a real worker process while its endpoint is ready,
    drops it when Kubernetes marks it unready."""
    import openai

    fake, api = kube
    worker, wmatch = await asyncio.to_thread(
        baton_process, "worker", "--port", "0", ready=r"listening on tcp://127\.0\.0\.1:(\d+)")
    procs = [worker]
    try:
        await api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "demo-worker-agg", "labels": {"app.kubernetes.io/instance": "demo",
                                                  "app.kubernetes.io/component": "worker"}},
            "spec": {"clusterIP": "None", "ports": [{"name": "request", "port": 9000}]}})
        await api.apply(endpoint_slice(int(wmatch.group(1)), ready=True))
        frontend, fmatch = await asyncio.to_thread(
            baton_process, "frontend", "--port", "0", "--discovery", "kubernetes",
            "--kube-api", api.server, "--kube-namespace", "serving", "--probe-interval-s",
            "0.2", "--kube-workers",
            "app.kubernetes.io/instance=demo,app.kubernetes.io/component=worker",
            ready=r"baton frontend on http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        port = int(fmatch.group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0)
        reply = await asyncio.to_thread(
            client.chat.completions.create, model="baton-tiny", max_tokens=3,
            messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].finish_reason == "length"
        await api.apply(endpoint_slice(int(wmatch.group(1)), ready=False))
        deadline = asyncio.get_running_loop().time() + 10
        while await asyncio.to_thread(health, port) != 503:
            assert asyncio.get_running_loop().time() < deadline, "the worker was not dropped"
            await asyncio.sleep(0.1)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
