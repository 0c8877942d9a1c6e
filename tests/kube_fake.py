"""A stand-in for the Kubernetes API server, for the tests of Baton's operator and its
Kubernetes connector: no cluster runs on this machine (docs/kubernetes.md says what this
exercises and what it does not).

It keeps objects in memory and answers the calls ``baton.runtime.kube_api`` and kopf make, the
way the API server does: API discovery (``/api``, ``/apis``, the ``baton.dev`` group's
resources), GET of an object or of a collection (``labelSelector`` of ``k=v`` terms), watch
streams of a collection (events from the watch's start on), server-side apply (``PATCH``
``application/apply-patch+yaml``: creates, or sets the fields given), JSON patch (``test``
and ``replace``; a failed test is 422), merge patch (RFC 7386) of an object or its
``/status``, DELETE, and POSTed Events (kept in ``events``). It bumps ``metadata.generation`` when a spec changes and
adds a field or two of its own to what it stores (``uid``, ``protocol: TCP`` on ports), as
the real server's defaulting does. No controllers run: ``settle`` plays the Deployment
controller by making every Deployment's pods ready.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from typing import Any

from aiohttp import web

from baton.deploy.manifests import API_GROUP, API_VERSION, KIND, PLURAL

GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

Key = tuple[str, str, str]  # plural, namespace, name


class FakeKubeApi:
    def __init__(self, namespaces: tuple[str, ...] = ("default", "serving")) -> None:
        self.objects: dict[Key, dict[str, Any]] = {
            ("namespaces", "", ns): {"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": ns, "resourceVersion": "1"}}
            for ns in namespaces}
        self.calls: list[tuple[str, str]] = []
        self.events: list[dict[str, Any]] = []
        self._uids = itertools.count(1)
        self._versions = itertools.count(1)
        self._watches: list[tuple[str, str, asyncio.Queue[dict[str, Any]]]] = []
        self.app = web.Application()
        self.app.router.add_get("/api", self._api_versions)
        self.app.router.add_get("/apis", self._api_groups)
        self.app.router.add_get("/api/v1", self._core_resources)
        self.app.router.add_get(f"/apis/{GROUP_VERSION}", self._baton_resources)
        self.app.router.add_get("/apis/apiextensions.k8s.io/v1", self._extension_resources)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    # ------------------------------------------------------------------ test helpers

    def get(self, plural: str, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.objects[plural, namespace, name]

    def names(self, plural: str) -> list[str]:
        return sorted(name for (p, _, name) in self.objects if p == plural)

    def settle(self) -> None:
        """Every Deployment's pods run and are ready (what its controller and kubelets do)."""
        for key, obj in list(self.objects.items()):
            if key[0] == "deployments":
                n = obj["spec"]["replicas"]
                obj["status"] = {"replicas": n, "readyReplicas": n, "availableReplicas": n}
                self._store(key, obj)

    # ------------------------------------------------------------------ discovery

    async def _api_versions(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _api_groups(self, request: web.Request) -> web.Response:
        groups = []
        for group, version in ((API_GROUP, API_VERSION), ("apiextensions.k8s.io", "v1")):
            listed = {"groupVersion": f"{group}/{version}", "version": version}
            groups.append({"name": group, "versions": [listed], "preferredVersion": listed})
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _core_resources(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
             "verbs": ["create", "get", "list", "patch"]},
            {"name": "namespaces", "singularName": "namespace", "namespaced": False,
             "kind": "Namespace", "verbs": ["get", "list", "watch"]}]})

    async def _extension_resources(self, request: web.Request) -> web.Response:
        return web.json_response({
            "kind": "APIResourceList", "groupVersion": "apiextensions.k8s.io/v1", "resources": [
                {"name": "customresourcedefinitions", "singularName": "customresourcedefinition",
                 "namespaced": False, "kind": "CustomResourceDefinition",
                 "verbs": ["get", "list", "watch"]}]})

    async def _baton_resources(self, request: web.Request) -> web.Response:
        verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
        return web.json_response({"kind": "APIResourceList", "groupVersion": GROUP_VERSION,
                                  "resources": [
            {"name": PLURAL, "singularName": "batondeployment", "namespaced": True,
             "kind": KIND, "verbs": verbs, "shortNames": ["bd"]},
            {"name": f"{PLURAL}/status", "singularName": "", "namespaced": True,
             "kind": KIND, "verbs": ["get", "patch", "update"]}]})

    # ------------------------------------------------------------------ the API

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        status_sub = parts[-1] == "status"
        if status_sub:
            parts = parts[:-1]
        # /api/v1/REST or /apis/GROUP/VERSION/REST, REST = [namespaces/NS/]PLURAL[/NAME]
        at = 2 if parts[0] == "api" else 3
        api_version, rest = "/".join(parts[1:at]), parts[at:]
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], rest[1] if len(rest) > 1 else None
        self.calls.append((request.method, request.path))
        key = (plural, namespace, name or "")
        body = await request.text()
        if name is None and request.method == "POST" and plural == "events":
            self.events.append(json.loads(body))
            return web.json_response(json.loads(body), status=201)
        if name is None and request.query.get("watch") in ("true", "1"):
            return await self._watch(request, plural, namespace)
        if name is None:
            return self._list(api_version, plural, namespace, request.query.get("labelSelector"))
        if request.method == "GET":
            return self._object(key)
        if request.method == "DELETE":
            if key not in self.objects:
                return _status(404, f"{plural} {name!r} not found")
            self._store(key, None)
            return web.json_response({"kind": "Status", "status": "Success"})
        kind = request.headers.get("Content-Type", "")
        if kind == "application/apply-patch+yaml":
            assert request.query.get("fieldManager"), "server-side apply needs a fieldManager"
            return self._apply(key, json.loads(body))
        if key not in self.objects:
            return _status(404, f"{plural} {name!r} not found")
        if kind == "application/json-patch+json":
            return self._json_patch(key, json.loads(body))
        if kind == "application/merge-patch+json":
            patch = json.loads(body)
            if status_sub:
                patch = {"status": patch.get("status")}
            else:
                patch.pop("status", None)
            self._store(key, _merge(copy.deepcopy(self.objects[key]), patch))
            return self._object(key)
        return _status(415, f"unsupported patch {kind}")

    async def _watch(self, request: web.Request, plural: str,
                     namespace: str) -> web.StreamResponse:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        entry = (plural, namespace, queue)
        self._watches.append(entry)
        response = web.StreamResponse()
        await response.prepare(request)
        timeout = float(request.query.get("timeoutSeconds", 60))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await queue.get()
                    await response.write(json.dumps(event).encode() + b"\n")
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self._watches.remove(entry)
        return response

    def _store(self, key: Key, obj: dict[str, Any] | None) -> None:
        """Writes (None: deletes) an object and tells the watches of its collection."""
        if obj is None:
            old = self.objects.pop(key, None)
            event = {"type": "DELETED", "object": old}
        else:
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            event = {"type": "MODIFIED" if key in self.objects else "ADDED", "object": obj}
            self.objects[key] = obj
        for plural, namespace, queue in self._watches:
            if (plural, namespace) == key[:2] and event["object"] is not None:
                queue.put_nowait(copy.deepcopy(event))

    def _list(self, api_version: str, plural: str, namespace: str,
              selector: str | None) -> web.Response:
        wanted = dict(term.split("=", 1) for term in selector.split(",")) if selector else {}
        items = []
        for (p, ns, _), obj in sorted(self.objects.items()):
            labels = obj["metadata"].get("labels") or {}
            if p == plural and ns == namespace and all(labels.get(k) == v
                                                       for k, v in wanted.items()):
                item = copy.deepcopy(obj)
                item.pop("kind"), item.pop("apiVersion")  # as the server lists them
                items.append(item)
        kind = next((o["kind"] for (p, _, _), o in self.objects.items() if p == plural), "")
        return web.json_response({"kind": f"{kind}List", "apiVersion": api_version,
                                  "items": items})

    def _object(self, key: Key) -> web.Response:
        if key not in self.objects:
            return _status(404, f"{key[0]} {key[2]!r} not found")
        return web.json_response(self.objects[key])

    def _apply(self, key: Key, manifest: dict[str, Any]) -> web.Response:
        current = self.objects.get(key)
        if current is None:
            current = {"metadata": {"uid": f"uid-{next(self._uids)}", "generation": 1}}
        elif manifest.get("spec") != current.get("spec"):
            current["metadata"]["generation"] += 1
        meta = current["metadata"] | manifest["metadata"]
        stored = current | manifest | {"metadata": meta}
        for container in _containers(stored):  # the server's defaulting
            for port in container.get("ports", []):
                port.setdefault("protocol", "TCP")
        self._store(key, stored)
        return web.json_response(stored)

    def _json_patch(self, key: Key, operations: list[dict[str, Any]]) -> web.Response:
        obj = copy.deepcopy(self.objects[key])
        for op in operations:
            *path, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
            parent = obj
            for step in path:
                parent = parent[step]
            exists = (0 <= last < len(parent)) if isinstance(last, int) else last in parent
            if op["op"] == "test" and (not exists or parent[last] != op["value"]):
                return _status(422, f"test failed at {op['path']}")
            if op["op"] == "replace" and exists:
                parent[last] = op["value"]
            elif op["op"] == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if last == "-" else last, op["value"])
                else:
                    parent[last] = op["value"]
            elif op["op"] == "remove" and exists:
                del parent[last]
            elif op["op"] != "test":
                return _status(422, f"cannot {op['op']} at {op['path']}")
        if obj.get("spec") != self.objects[key].get("spec"):
            obj["metadata"]["generation"] += 1
        self._store(key, obj)
        return web.json_response(obj)


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", []))


def _status(code: int, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "status": "Failure", "message": message,
                              "code": code}, status=code)
