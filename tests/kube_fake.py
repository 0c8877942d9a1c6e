"""A stand-in for the Kubernetes API server, for the tests of Baton's operator and its
Kubernetes connector: no cluster runs on this machine (docs/kubernetes.md says what this
exercises and what it does not).

It keeps objects in memory and answers the calls ``baton.deploy.kube`` makes, the way the
API server does: GET of an object or of a collection (``labelSelector`` of ``k=v`` terms),
server-side apply (``PATCH`` ``application/apply-patch+yaml``: creates, or sets the fields
given), JSON patch (``test`` and ``replace``; a failed test is 422), merge patch of the
``/status`` subresource, DELETE. It bumps ``metadata.generation`` when a spec changes and
adds a field or two of its own to what it stores (``uid``, ``protocol: TCP`` on ports), as
the real server's defaulting does. No controllers run: ``settle`` plays the Deployment
controller by making every Deployment's pods ready.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

from aiohttp import web

Key = tuple[str, str, str]  # plural, namespace, name


class FakeKubeApi:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self._uids = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    # ------------------------------------------------------------------ test helpers

    def get(self, plural: str, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.objects[plural, namespace, name]

    def names(self, plural: str) -> list[str]:
        return sorted(name for (p, _, name) in self.objects if p == plural)

    def settle(self) -> None:
        """Every Deployment's pods run and are ready (what its controller and kubelets do)."""
        for (plural, _, _), obj in self.objects.items():
            if plural == "deployments":
                n = obj["spec"]["replicas"]
                obj["status"] = {"replicas": n, "readyReplicas": n, "availableReplicas": n}

    # ------------------------------------------------------------------ the API

    async def _handle(self, request: web.Request) -> web.Response:
        parts = request.path.strip("/").split("/")
        status_sub = parts[-1] == "status"
        if status_sub:
            parts = parts[:-1]
        # /api/v1/namespaces/NS/PLURAL[/NAME] or /apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]
        ns_at = parts.index("namespaces")
        api_version = "/".join(parts[1:ns_at])
        namespace, plural = parts[ns_at + 1], parts[ns_at + 2]
        name = parts[ns_at + 3] if len(parts) > ns_at + 3 else None
        self.calls.append((request.method, request.path))
        key = (plural, namespace, name or "")
        body = await request.text()
        if name is None:
            return self._list(api_version, plural, namespace, request.query.get("labelSelector"))
        if request.method == "GET":
            return self._object(key)
        if request.method == "DELETE":
            if self.objects.pop(key, None) is None:
                return _status(404, f"{plural} {name!r} not found")
            return web.json_response({"kind": "Status", "status": "Success"})
        kind = request.headers.get("Content-Type", "")
        if kind == "application/apply-patch+yaml":
            assert request.query.get("fieldManager"), "server-side apply needs a fieldManager"
            return self._apply(key, json.loads(body))
        if key not in self.objects:
            return _status(404, f"{plural} {name!r} not found")
        if kind == "application/json-patch+json":
            return self._json_patch(key, json.loads(body))
        if kind == "application/merge-patch+json" and status_sub:
            self.objects[key]["status"] = json.loads(body)["status"]
            return self._object(key)
        return _status(415, f"unsupported patch {kind}")

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
        self.objects[key] = stored
        return web.json_response(stored)

    def _json_patch(self, key: Key, operations: list[dict[str, Any]]) -> web.Response:
        obj = copy.deepcopy(self.objects[key])
        for op in operations:
            *path, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
            parent = obj
            for step in path:
                parent = parent[step]
            if op["op"] == "test" and parent[last] != op["value"]:
                return _status(422, f"test failed at {op['path']}")
            if op["op"] == "replace":
                parent[last] = op["value"]
        if obj.get("spec") != self.objects[key].get("spec"):
            obj["metadata"]["generation"] += 1
        self.objects[key] = obj
        return web.json_response(obj)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", []))


def _status(code: int, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "status": "Failure", "message": message,
                              "code": code}, status=code)
