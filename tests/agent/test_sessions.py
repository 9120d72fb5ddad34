from __future__ import annotations

import numpy as np
import pytest

from moe2.agent.llama import LlamaCppBackend
from moe2.agent.sessions import SessionManager
from moe2.shared.errors import Busy, SessionEvicted, UnknownSession


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_agent_refuses_instead_of_evicting_and_reclaims_idle_sessions(
    animals_backend: LlamaCppBackend,
) -> None:
    """Defects 1 and 9: at capacity a session in use is never evicted (the open is refused
    with ``busy``, which a gateway can retry); one left idle for ``idle_s`` is reclaimed, and
    using it afterwards says so. On the code before the fix the third open evicted ``b``."""
    clock = Clock()
    mgr = SessionManager(animals_backend, max_sessions=2, idle_s=30, clock=clock)
    a, _, _ = mgr.open([1, 5])
    b, _, _ = mgr.open([1, 6])
    with pytest.raises(Busy):
        mgr.open([1, 7])
    mgr.get(b)  # both still usable
    clock.now += 20
    mgr.get(a)  # a in use, b idle for 20 s
    with pytest.raises(Busy):
        mgr.open([1, 7])
    clock.now += 15  # b idle for 35 s: reclaimed when room is needed
    assert mgr.in_use(within_s=30) == 1
    c, _, _ = mgr.open([1, 7])
    assert len(mgr) == 2 and mgr.reclaimed == 1
    with pytest.raises(SessionEvicted, match="reclaimed"):
        mgr.get(b)
    mgr.get(a)
    clock.now += 31
    assert mgr.reclaim_idle() == 2  # the periodic reclaim, without anyone asking for room
    with pytest.raises(SessionEvicted):
        mgr.get(c)
    a, _, _ = mgr.open([1, 5])
    mgr.get(a)
    mgr.close(a)
    with pytest.raises(UnknownSession):
        mgr.get(a)
    with pytest.raises(UnknownSession):
        mgr.close("s-never")
    mgr.close_all()


def test_a_reused_context_starts_from_an_empty_history(animals_backend: LlamaCppBackend) -> None:
    mgr = SessionManager(animals_backend, max_sessions=1)
    sid, _, first = mgr.open([1, 5, 6])
    mgr.get(sid).extend([7, 8])
    mgr.close(sid)
    _, seq, again = mgr.open([1, 5, 6])
    assert seq.tokens == [1, 5, 6]
    np.testing.assert_allclose(again, first, atol=1e-5)
    mgr.close_all()
