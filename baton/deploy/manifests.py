"""A graph as Kubernetes objects: what ``baton deploy render`` prints and the operator applies.

``render`` is pure: a ``GraphConfig`` and the deployment's name in, a list of manifests
(plain dicts, in apply order) out. Every Baton process runs the command a local graph would
run (``graph/schema.py`` builds both), with listeners on fixed ports of the pod's address:

- NATS with JetStream (a StatefulSet and its Service) unless the graph names a server;
- one Deployment per worker pool (replicas = the pool's ``count``), one per router and per
  frontend (each frontend with its Service), and the planner with the permissions to change
  its ``BatonDeployment`` and a ConfigMap holding its profile;
- probes on ``/health`` (ready) and ``/live``, a grace period that covers a worker's drain,
  ``preStop`` on frontends so their Service stops sending before they stop listening;
- a PodDisruptionBudget per pool and frontend, resources and GPUs from the graph, and the
  topology of ``kubernetes.topology``: every pod of the graph in one domain (zone, rack),
  each pool spread over nodes inside it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from baton.config import OperatorConfig
from baton.graph.schema import (
    Argv,
    FrontendSpec,
    GraphConfig,
    ResourcesSpec,
    RouterSpec,
    WorkerPoolSpec,
    common_args,
    frontend_command,
    planner_command,
    router_command,
    worker_command,
)

Manifest = dict[str, Any]

API_GROUP = "baton.dev"
API_VERSION = "v1alpha1"
KIND = "BatonDeployment"
PLURAL = "batondeployments"

PART_OF = "app.kubernetes.io/part-of"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
POOL = "baton.dev/pool"
ROLE = "baton.dev/role"
MANAGED_BY = "app.kubernetes.io/managed-by"

WORKER_PORT, KV_PORT, METRICS_PORT, ROUTER_PORT, FRONTEND_PORT = 9000, 9100, 9090, 9300, 8000
NATS_PORT, NATS_MONITOR_PORT = 4222, 8222
PROFILE_DIR = "/etc/baton/planner"
PROFILE_FILE = "profile.json"
PRE_STOP_S = 5
"""A frontend waits this long after Kubernetes marks it terminating, so that its Service's
endpoints drop it before it stops taking connections."""


def render(config: GraphConfig, name: str, profile: str | None = None) -> list[Manifest]:
    """The objects of the graph deployed as ``name``; ``profile`` (the planner's profile
    JSON) adds the ConfigMap that holds it (without it, that ConfigMap must exist). A
    ValueError names a name Kubernetes would refuse."""
    check_names(config, name)
    r = _Renderer(config, name)
    objects: list[Manifest] = []
    nats_url = config.nats_spec.url
    if nats_url is None:
        objects += r.nats()
        nats_url = f"nats://{name}-nats:{NATS_PORT}"
    common = common_args(config, nats_url)
    if r.kube_discovery:
        common += ("--discovery", "kubernetes", "--kube-workers",
                   f"{INSTANCE}={name},{COMPONENT}=worker")
        objects += r.discovery_access()
    for pool in config.workers:
        objects += r.pool(pool, common)
    for i, router in enumerate(config.routers):
        objects.append(r.router(i, router, common))
    for i, frontend in enumerate(config.frontends):
        objects += r.frontend(i, frontend, common)
    if config.planner is not None:
        objects += r.planner(planner_command(
            config.planner, f"{PROFILE_DIR}/{PROFILE_FILE}",
            ("--host", "0.0.0.0", "--metrics-port", str(METRICS_PORT), "--connector",
             "kubernetes", "--deployment", name), common), profile)
    return objects


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LONGEST_SUFFIX = "-planner-profile"


def check_names(config: GraphConfig, name: str) -> None:
    """Every object's name is ``NAME-SUFFIX``, a DNS label (lowercase letters, digits, '-';
    at most 63 characters), and so must be the parts."""
    parts = [("name", name)] + [(f"workers[{i}].name", p.name)
                                for i, p in enumerate(config.workers)]
    for field, value in parts:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{field}: {value!r} is not a Kubernetes name (lowercase letters, "
                             "digits and '-', starting and ending with a letter or digit)")
    suffixes = [_LONGEST_SUFFIX] + [f"-worker-{p.name}" for p in config.workers]
    longest = max(suffixes, key=len)
    if len(name) + len(longest) > 63:
        raise ValueError(f"name: {name + longest!r} is longer than Kubernetes' 63 characters")


class _Renderer:
    def __init__(self, config: GraphConfig, name: str) -> None:
        self.config = config
        self.k8s = config.kubernetes
        self.name = name
        self.kube_discovery = config.kubernetes.discovery == "kubernetes"
        self.finder_account = f"{name}-discovery" if self.kube_discovery else None
        """The account of frontends and routers: it may read the worker endpoints."""

    def labels(self, own: dict[str, str]) -> dict[str, str]:
        return {PART_OF: "baton", INSTANCE: self.name, MANAGED_BY: "baton"} | own

    def meta(self, suffix: str, labels: dict[str, str]) -> Manifest:
        return {"name": f"{self.name}-{suffix}", "labels": self.labels(labels)}

    def selector(self, labels: dict[str, str]) -> dict[str, str]:
        """A workload's selector: immutable, so it holds nothing a graph edit may change."""
        return {INSTANCE: self.name} | labels

    # ------------------------------------------------------------------ workloads

    def pool(self, pool: WorkerPoolSpec, common: Argv) -> list[Manifest]:
        """A worker pool: its Deployment and budget (and headless Service for discovery)."""
        listen = ("--host", "0.0.0.0", "--advertise-host", "$(POD_IP)",
                  "--port", str(WORKER_PORT), "--kv-port", str(KV_PORT),
                  "--metrics-port", str(METRICS_PORT))
        labels = {COMPONENT: "worker", POOL: pool.name}
        ports = {"request": WORKER_PORT, "kv": KV_PORT, "metrics": METRICS_PORT}
        suffix = f"worker-{pool.name}"
        objects = [
            self.deployment(suffix, labels, {ROLE: pool.role}, pool.count,
                            worker_command(self.config, pool, listen, common), ports,
                            pool.resources, probe_port="metrics", startup=True),
            self.disruption_budget(suffix, labels),
        ]
        if self.kube_discovery:  # its ready endpoints are the pool
            objects.append(self.service(suffix, labels, {"request": WORKER_PORT},
                                        headless=True))
        return objects

    def router(self, i: int, router: RouterSpec, common: Argv) -> Manifest:
        port = router.port or ROUTER_PORT
        listen = ("--host", "0.0.0.0", "--advertise-host", "$(POD_IP)", "--port", str(port))
        return self.deployment(f"router-{i}", {COMPONENT: "router", POOL: f"router-{i}"}, {},
                               1, router_command(router, listen, common), {"request": port},
                               ResourcesSpec(), account=self.finder_account)

    def frontend(self, i: int, frontend: FrontendSpec, common: Argv) -> list[Manifest]:
        """A frontend: its Deployment, Service and budget."""
        port = frontend.port or FRONTEND_PORT
        listen = ("--host", "0.0.0.0", "--port", str(port))
        labels = {COMPONENT: "frontend", POOL: f"frontend-{i}"}
        suffix = f"frontend-{i}"
        return [
            self.deployment(suffix, labels, {}, 1, frontend_command(frontend, listen, common),
                            {"http": port}, frontend.resources, probe_port="http",
                            pre_stop=True, account=self.finder_account),
            self.service(suffix, labels, {"http": port}, self.k8s.service_type),
            self.disruption_budget(suffix, labels),
        ]

    def deployment(self, suffix: str, labels: dict[str, str], extra: dict[str, str],
                   replicas: int, args: Argv, ports: dict[str, int], resources: ResourcesSpec,
                   probe_port: str | None = None, startup: bool = False,
                   pre_stop: bool = False, account: str | None = None) -> Manifest:
        container: Manifest = {
            "name": "baton", "image": self.k8s.image, "imagePullPolicy": self.k8s.image_pull_policy,
            "args": list(args),
            "env": [
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "BATON_CLUSTER_TOKEN", "valueFrom": {"secretKeyRef": {
                    "name": self.k8s.cluster_token_secret or f"{self.name}-cluster-token",
                    "key": "token"}}},
                *({"name": k, "value": v} for k, v in sorted(self.k8s.env.items())),
            ],
            "ports": [{"name": n, "containerPort": p} for n, p in ports.items()],
        }
        if probe_port is not None:
            container |= self.probes(probe_port, startup)
        if pre_stop:
            container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}}
        if requests := self.resources(resources):
            container["resources"] = {"requests": requests, "limits": requests}
        pod: Manifest = {
            "containers": [container],
            "terminationGracePeriodSeconds": math.ceil(self.config.supervision.drain_grace_s)
            + (PRE_STOP_S if pre_stop else 0),
            "securityContext": {"runAsNonRoot": True},
        }
        if self.k8s.node_selector:
            pod["nodeSelector"] = dict(self.k8s.node_selector)
        if account is not None:
            pod["serviceAccountName"] = account
        pod |= self.placement(labels)
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": self.meta(suffix, labels | extra),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": self.selector(labels)},
                "template": {"metadata": {"labels": self.labels(labels | extra)}, "spec": pod},
            },
        }

    def probes(self, port: str, startup: bool) -> Manifest:
        def get(path: str, period: int, failures: int) -> Manifest:
            return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
                    "failureThreshold": failures}

        probes = {"readinessProbe": get("/health", 5, 2), "livenessProbe": get("/live", 10, 3)}
        if startup:  # a model loads before the worker listens at all
            probes["startupProbe"] = get("/live", 5, math.ceil(self.k8s.startup_timeout_s / 5))
        return probes

    def resources(self, spec: ResourcesSpec) -> dict[str, str]:
        out = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v is not None}
        if spec.gpus:
            out[self.k8s.gpu_resource] = str(spec.gpus)
        return out

    def placement(self, labels: dict[str, str]) -> Manifest:
        """All of the graph's pods in one domain of ``topology.key``; a pool's pods spread
        over ``topology.spread_key`` inside it."""
        topo = self.k8s.topology
        if topo.mode == "off":
            return {}
        term = {"labelSelector": {"matchLabels": {INSTANCE: self.name}},
                "topologyKey": topo.key}
        affinity = ({"requiredDuringSchedulingIgnoredDuringExecution": [term]}
                    if topo.mode == "required" else
                    {"preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": term}]})
        spread = {"maxSkew": 1, "topologyKey": topo.spread_key,
                  "whenUnsatisfiable": "ScheduleAnyway",
                  "labelSelector": {"matchLabels": self.selector(labels)}}
        return {"affinity": {"podAffinity": affinity}, "topologySpreadConstraints": [spread]}

    def service(self, suffix: str, labels: dict[str, str], ports: dict[str, int],
                kind: str = "ClusterIP", headless: bool = False) -> Manifest:
        spec: Manifest = {
            "type": kind, "selector": self.selector(labels),
            "ports": [{"name": n, "port": p, "targetPort": n} for n, p in ports.items()],
        }
        if headless:
            spec["clusterIP"] = "None"
        return {"apiVersion": "v1", "kind": "Service", "metadata": self.meta(suffix, labels),
                "spec": spec}

    def disruption_budget(self, suffix: str, labels: dict[str, str]) -> Manifest:
        """Voluntary evictions (node drains, upgrades) take a pool's pods one at a time."""
        return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": self.meta(suffix, labels),
                "spec": {"maxUnavailable": 1,
                         "selector": {"matchLabels": self.selector(labels)}}}

    # ------------------------------------------------------------------ discovery

    DISCOVERY_RULES = ({"apiGroups": [""], "resources": ["services"],
                        "verbs": ["get", "list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                        "verbs": ["get", "list", "watch"]})
    """What ``--discovery kubernetes`` reads: the worker Services and their endpoints."""

    def discovery_access(self) -> list[Manifest]:
        labels = {COMPONENT: "discovery"}
        return self.account("discovery", labels, list(self.DISCOVERY_RULES))

    def account(self, suffix: str, labels: dict[str, str],
                rules: list[Manifest]) -> list[Manifest]:
        """A ServiceAccount, a Role with ``rules`` and the binding of the two."""
        name = f"{self.name}-{suffix}"
        return [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": self.meta(suffix, labels)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": self.meta(suffix, labels), "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": self.meta(suffix, labels),
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": name}]},
        ]

    # ------------------------------------------------------------------ NATS

    def nats(self) -> list[Manifest]:
        labels = {COMPONENT: "nats"}
        container = {
            "name": "nats", "image": self.k8s.nats_image,
            "args": ["-js", "-sd", "/data", "-p", str(NATS_PORT), "-m", str(NATS_MONITOR_PORT)],
            "ports": [{"name": "client", "containerPort": NATS_PORT},
                      {"name": "monitor", "containerPort": NATS_MONITOR_PORT}],
            "readinessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true",
                                           "port": "monitor"}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "monitor"},
                              "periodSeconds": 10},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        }
        pod = {"containers": [container], "volumes": [{"name": "data", "emptyDir": {}}]}
        pod |= self.placement(labels)
        statefulset = {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": self.meta("nats", labels),
            "spec": {"serviceName": f"{self.name}-nats", "replicas": 1,
                     "selector": {"matchLabels": self.selector(labels)},
                     "template": {"metadata": {"labels": self.labels(labels)}, "spec": pod}},
        }
        return [statefulset, self.service("nats", labels, {"client": NATS_PORT})]

    # ------------------------------------------------------------------ planner

    def planner(self, args: Argv, profile: str | None) -> list[Manifest]:
        labels = {COMPONENT: "planner"}
        objects: list[Manifest] = []
        if profile is not None:
            objects.append(profile_config_map(self.name, profile, rendered=True))
        rules: list[Manifest] = [{"apiGroups": [API_GROUP], "resources": [PLURAL],
                                  "resourceNames": [self.name], "verbs": ["get", "patch"]}]
        if self.kube_discovery:
            rules += self.DISCOVERY_RULES
        objects += self.account("planner", labels, rules)
        deployment = self.deployment("planner", labels, {}, 1, args, {"metrics": METRICS_PORT},
                                     ResourcesSpec(), probe_port="metrics",
                                     account=f"{self.name}-planner")
        pod = deployment["spec"]["template"]["spec"]
        pod["volumes"] = [{"name": "profile",
                           "configMap": {"name": f"{self.name}-planner-profile"}}]
        pod["containers"][0]["volumeMounts"] = [{"name": "profile", "mountPath": PROFILE_DIR,
                                                 "readOnly": True}]
        objects.append(deployment)
        return objects


def profile_config_map(name: str, profile: str, rendered: bool = False) -> Manifest:
    """The planner's profile. ``rendered``: one of the graph's objects (``managed-by``
    Baton); else the user's, beside a ``BatonDeployment``, which the operator neither renders
    nor deletes."""
    labels = {PART_OF: "baton", INSTANCE: name, COMPONENT: "planner"}
    if rendered:
        labels[MANAGED_BY] = "baton"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-planner-profile", "labels": labels},
            "data": {PROFILE_FILE: profile}}


# ---------------------------------------------------------------------------- the operator

OPERATOR_NAME = "baton-operator"
_VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


def operator(image: str, namespace: str) -> list[Manifest]:
    """The operator's own objects (in ``namespace``): its account, what it may touch
    cluster-wide, and its Deployment running ``baton deploy operator``."""
    labels = {PART_OF: "baton", COMPONENT: "operator", MANAGED_BY: "baton"}
    meta = {"name": OPERATOR_NAME, "namespace": namespace, "labels": labels}
    rules = [
        {"apiGroups": [API_GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch",
                                                                     "patch", "update"]},
        {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"],
         "verbs": ["get", "patch", "update"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets"], "verbs": _VERBS},
        {"apiGroups": [""], "resources": ["services", "configmaps", "serviceaccounts"],
         "verbs": _VERBS},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _VERBS},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
         "verbs": _VERBS},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
         "verbs": ["create", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    ]
    container = {
        "name": "operator", "image": image, "args": ["deploy", "operator"],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "health"},
                           "periodSeconds": 10},
        "ports": [{"name": "health", "containerPort": OperatorConfig().health_port}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": OPERATOR_NAME, "labels": labels}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": OPERATOR_NAME, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": OPERATOR_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME,
                       "namespace": namespace}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": {COMPONENT: "operator"}},
                  "strategy": {"type": "Recreate"},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"serviceAccountName": OPERATOR_NAME,
                                        "securityContext": {"runAsNonRoot": True},
                                        "containers": [container]}}}},
    ]
