"""The control plane's shells: the planner as a live component (``service.py``: it hears
the deployment's traffic and load on the event plane and decides with the pure
``planner.Planner``) and the connectors it resizes deployments through (``connectors.py``:
a local graph; Kubernetes, refused until its objects exist)."""
