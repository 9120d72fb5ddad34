"""How many sessions this gateway holds on each expert, never more than the expert announced.

Every agent announces ``max_sessions`` (``AgentInfo``): the sessions it keeps at once. A
generation takes one slot on each expert it asks, all at once or none (so two prompts that
share experts can never each hold half of what the other needs), and waits in line while an
expert is full; when the wait would pass the prompt's deadline (or ``queue_s``) the prompt
gets ``busy``.

    slots = ExpertSlots()
    with slots.hold({"orin-1": 4, "rtx-1": 8}, wait_until=deadline):
        ...  # at most 4 generations of this gateway are on orin-1 now

Other gateways may share the expert: the agent itself refuses a session beyond its capacity
(``busy``) instead of evicting one in use, and the generation retries that open (see
``generation.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from moe2.shared.errors import Busy, Cancelled


class ExpertSlots:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[str, int] = {}  # expert -> sessions this gateway holds there

    def held(self, expert: str) -> int:
        with self._cond:
            return self._held.get(expert, 0)

    def total(self) -> int:
        with self._cond:
            return sum(self._held.values())

    def wake(self) -> None:
        """Have every waiter look at its ``give_up`` now (a prompt was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    @contextmanager
    def hold(
        self,
        capacity: Mapping[str, int],
        wait_until: float,
        give_up: Callable[[], bool] = lambda: False,
    ) -> Iterator[None]:
        """One slot on every expert of ``capacity`` (expert -> its max_sessions) for the
        duration; ``Busy`` if they are not all free by ``wait_until`` (time.monotonic()),
        ``Cancelled`` as soon as ``give_up()`` says so (checked on ``wake``)."""

        def free() -> bool:
            return all(self._held.get(n, 0) < max(1, c) for n, c in capacity.items())

        with self._cond:
            while not free():
                if give_up():
                    raise Cancelled("the prompt was cancelled while it waited for experts")
                left = wait_until - time.monotonic()
                if left <= 0:
                    full = sorted(n for n, c in capacity.items() if self._held.get(n, 0) >= c)
                    raise Busy(
                        f"experts {', '.join(full)} are serving as many prompts as they hold "
                        "sessions, and none freed up in time; retry later"
                    )
                self._cond.wait(min(left, 1.0))
            for n in capacity:
                self._held[n] = self._held.get(n, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                for n in capacity:
                    self._held[n] -= 1
                    if not self._held[n]:
                        del self._held[n]
                self._cond.notify_all()
