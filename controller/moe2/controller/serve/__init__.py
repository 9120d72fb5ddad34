"""``moe2ctl serve``: a controller that keeps the fleet's assignments right as it changes.

A reconcile loop (``reconcile.py``) watches the fleet view, decides when something that
matters changed (an assigned expert offline or back, an agent that joins, a profile or link
that moves, a measured delay above a promise), re-optimises and pushes, recording every
decision in the registry. A lease in the registry (``Registry.acquire_lease``) lets only one
``serve`` process act at a time.
"""
