"""A small client of the Kubernetes API: the few calls Baton makes (get, list by label,
server-side apply, JSON and merge patches, delete): Kubernetes discovery, the operator and
the planner's Kubernetes connector.

It speaks plain HTTP(S) with aiohttp. ``KubeApi.locate`` finds the API the way a pod
does (its service account's token and CA, and ``KUBERNETES_SERVICE_HOST``, which Kubernetes
sets in every pod: the one environment variable read outside the command line), or takes a
URL given (``kubectl proxy`` serves one on loopback that carries your own credentials).
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from baton.errors import TransportError

Manifest = dict[str, Any]

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELD_MANAGER = "baton"

PLURALS = {
    "StatefulSet": "statefulsets", "Deployment": "deployments", "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets", "ServiceAccount": "serviceaccounts",
    "Role": "roles", "RoleBinding": "rolebindings", "ConfigMap": "configmaps",
    "Pod": "pods", "EndpointSlice": "endpointslices",
}
"""The plural of each kind Baton reads or writes; ``register_kind`` adds a custom one."""


def register_kind(kind: str, plural: str) -> None:
    PLURALS[kind] = plural


class KubeError(TransportError):
    """The API answered with an error status (``status``: 404, 409, 422, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"kubernetes API {status}: {message}")
        self.status = status


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """``/apis/apps/v1/namespaces/NS/deployments/NAME`` (core kinds under ``/api/v1``)."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


class KubeApi:
    def __init__(self, server: str, namespace: str, token: str | None = None,
                 ca_file: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.namespace = namespace
        self.token = token
        self.ca_file = ca_file
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca_file)
                                            if ca_file else True)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def locate(cls, server: str | None, namespace: str | None) -> KubeApi:
        """The API at ``server`` (no credentials: ``kubectl proxy``), else the one this pod
        runs in; a ValueError says why neither is there."""
        account_ns = SERVICE_ACCOUNT / "namespace"
        if server is not None:
            return cls(server, namespace or "default")
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if host is None or not (SERVICE_ACCOUNT / "token").is_file():
            raise ValueError("not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or service "
                             "account token): give the API's URL, e.g. from kubectl proxy")
        return cls(f"https://{host}:{port}",
                   namespace or account_ns.read_text().strip(),
                   token=(SERVICE_ACCOUNT / "token").read_text().strip(),
                   ca_file=str(SERVICE_ACCOUNT / "ca.crt"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ calls

    async def get(self, path: str) -> Manifest:
        return await self._call("GET", path)

    async def list_of(self, path: str, selector: str | None = None) -> list[Manifest]:
        reply = await self._call("GET", path, params={"labelSelector": selector}
                                 if selector else None)
        items: list[Manifest] = reply.get("items", [])
        kind = reply.get("kind", "").removesuffix("List")
        for item in items:  # a list's items carry no kind or apiVersion of their own
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", reply.get("apiVersion", ""))
        return items

    async def apply(self, manifest: Manifest) -> Manifest:
        """Server-side apply: creates the object or sets the fields Baton owns."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"],
                             meta.get("namespace", self.namespace), meta["name"])
        return await self._call("PATCH", path, body=manifest,
                                params={"fieldManager": FIELD_MANAGER, "force": "true"},
                                content_type="application/apply-patch+yaml")

    async def json_patch(self, path: str, operations: list[dict[str, Any]]) -> Manifest:
        return await self._call("PATCH", path, body=operations,
                                content_type="application/json-patch+json")

    async def merge_patch(self, path: str, body: Manifest) -> Manifest:
        return await self._call("PATCH", path, body=body,
                                content_type="application/merge-patch+json")

    async def delete(self, path: str) -> None:
        try:
            await self._call("DELETE", path, body={"propagationPolicy": "Foreground"})
        except KubeError as exc:
            if exc.status != 404:  # already gone is what was asked for
                raise

    async def _call(self, method: str, path: str, body: Any = None,
                    params: dict[str, str] | None = None,
                    content_type: str = "application/json") -> Manifest:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        headers = self._headers | {"Content-Type": content_type, "Accept": "application/json"}
        data = None if body is None else json.dumps(body)
        try:
            async with self._session.request(method, self.server + path, data=data,
                                              params=params, headers=headers,
                                              ssl=self._ssl) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"kubernetes API at {self.server}: {exc}") from exc
        if response.status >= 400:
            raise KubeError(response.status, _message(text))
        reply: Manifest = json.loads(text) if text else {}
        return reply


def _message(text: str) -> str:
    """The ``message`` of the API's Status object, else the body."""
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or text[:200])
