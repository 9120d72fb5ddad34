"""How many requests the front holds at once: within what the gateways announce they take.

Every online gateway announces ``max_concurrent`` (prompts it generates at once) and
``max_pending`` (more it lets wait); beyond their sum it answers ``busy``. The front keeps
its requests for an application within the sum over the gateways serving it, all its
requests within the sum over every online gateway, and within ``max_in_flight`` (its own
bound), and answers 429 with ``Retry-After`` beyond: the client comes back later instead of
queueing at a broker or a gateway that will refuse it anyway. Gateways that announce no
capacity (older versions) bound nothing but ``max_in_flight``. Several fronts in front of
the same gateways each count their own requests; the gateways' ``busy`` still stands.

Runs on the event loop only (no locks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from moe2.shared import protocol as p


def capacities(gateways: Mapping[str, p.GatewayStatus], app: str) -> tuple[int | None, int | None]:
    """(capacity of the gateways serving ``app``, of every online gateway); None where a
    gateway in the sum announces none (unbounded by the fleet)."""

    def total(statuses: list[p.GatewayStatus]) -> int | None:
        caps = [g.capacity for g in statuses]
        if not caps or any(c is None for c in caps):
            return None
        return sum(c for c in caps if c is not None)

    online = list(gateways.values())
    return total([g for g in online if app in g.apps]), total(online)


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.by_app: Counter[str] = Counter()
        self.total = 0

    def enter(self, app: str, app_capacity: int | None, fleet_capacity: int | None) -> str | None:
        """Take a place for a request to ``app``; None when taken, else why not."""
        if self.total >= self.max_in_flight:
            return f"this front holds {self.total} requests, its limit (max_in_flight)"
        if fleet_capacity is not None and self.total >= fleet_capacity:
            return f"the online gateways take {fleet_capacity} prompts at once; all are in use"
        if app_capacity is not None and self.by_app[app] >= app_capacity:
            return (
                f"the gateways serving {app!r} take {app_capacity} prompts at once; all are in use"
            )
        self.by_app[app] += 1
        self.total += 1
        return None

    def leave(self, app: str) -> None:
        self.by_app[app] -= 1
        if self.by_app[app] <= 0:
            del self.by_app[app]
        self.total -= 1
