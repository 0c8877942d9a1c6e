"""Baton on Kubernetes: a graph rendered as manifests (``manifests``), the
``BatonDeployment`` resource whose spec is a graph (``crd``), the operator's pure decisions
(``reconcile``) and its shell (``operator``). ``baton deploy`` is the command line;
``docs/kubernetes.md`` the guide.
"""

from baton.deploy.crd import crd, graph_of, openapi, resource
from baton.deploy.manifests import API_GROUP, API_VERSION, KIND, PLURAL, Manifest, render
from baton.deploy.reconcile import Action, Apply, Delete, describe, reconcile, status

__all__ = [
    "API_GROUP", "API_VERSION", "KIND", "PLURAL", "Action", "Apply", "Delete", "Manifest",
    "crd", "describe", "graph_of", "openapi", "reconcile", "render", "resource", "status",
]
