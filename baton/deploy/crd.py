"""The ``BatonDeployment`` custom resource: a graph on Kubernetes.

Its ``spec`` is a graph file's content (``graph/schema.py``), so one schema serves
``baton serve -f``, ``baton deploy render`` and the operator; the CRD's OpenAPI schema is
derived from it (``openapi``), never written by hand. Kubernetes wants a *structural* schema
(every node typed, no references, no ``additionalProperties: false``, OpenAPI 3.0's boolean
``exclusiveMinimum``), and one form per field: ``nats`` takes its long form
(``{url: ...}``) only. Defaults stay in the graph schema: the API server stores what the
user wrote and the operator fills the rest when it parses the spec.

``status`` is the operator's: per pool, the replicas asked for, running and ready.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from baton.deploy.manifests import API_GROUP, API_VERSION, KIND, PLURAL, Manifest
from baton.graph.schema import GraphConfig, parse_graph
from baton.runtime.kube_api import register_kind, resource_path

register_kind(KIND, PLURAL)

_DROP = ("title", "default", "$defs")


def openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema from ``msgspec.json.schema`` as a Kubernetes structural schema."""
    defs = schema.get("$defs", {})

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return convert(defs[node["$ref"].rsplit("/", 1)[-1]])
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            nullable = len(options) < len(node["anyOf"])
            objects = [o for o in options if "$ref" in o or o.get("type") == "object"]
            chosen = convert((objects or options)[0])  # a string-or-section is its section
            return chosen | {"nullable": True} if nullable else chosen
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP or (key == "additionalProperties" and value is False):
                continue
            if key == "properties":
                out[key] = {name: convert(sub) for name, sub in value.items()}
            elif key in ("items", "additionalProperties"):
                out[key] = convert(value)
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            else:
                out[key] = copy.deepcopy(value)
        if "enum" in out and "type" not in out:
            out["type"] = "string"
        return out

    return convert(schema)


SPEC_SCHEMA = openapi(msgspec.json.schema(GraphConfig))
"""The ``spec`` of a ``BatonDeployment``: the graph schema."""

_COUNT = {"type": "integer", "minimum": 0}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer"},
        "ready": {"type": "string", "description": "ready / asked-for workers, e.g. 3/4"},
        "pools": {
            "type": "object",
            "description": "per worker pool, by name",
            "additionalProperties": {
                "type": "object",
                "properties": {"role": {"type": "string"}, "desired": _COUNT,
                               "replicas": _COUNT, "ready": _COUNT},
            },
        },
        "message": {"type": "string"},
    },
}


def crd() -> Manifest:
    """The CustomResourceDefinition to ``kubectl apply`` once per cluster."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": ["bd"], "listKind": f"{KIND}List"},
            "versions": [{
                "name": API_VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": SPEC_SCHEMA, "status": STATUS_SCHEMA},
                    "required": ["spec"],
                }},
            }],
        },
    }


def resource(graph: dict[str, Any], name: str) -> Manifest:
    """A ``BatonDeployment`` named ``name`` whose spec is a graph file's content (its
    ``nats: URL`` short form written out long)."""
    spec = dict(graph)
    if isinstance(spec.get("nats"), str):
        spec["nats"] = {"url": spec["nats"], "start": False}
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
            "metadata": {"name": name}, "spec": spec}


def deployment_path(namespace: str, name: str | None = None) -> str:
    """Where the ``BatonDeployment`` named ``name`` lives in the API."""
    return resource_path(f"{API_GROUP}/{API_VERSION}", KIND, namespace, name)


def graph_of(resource: Manifest) -> GraphConfig:
    """The graph a ``BatonDeployment`` holds; a ValueError names the field that is wrong."""
    return parse_graph(resource.get("spec") or {})
