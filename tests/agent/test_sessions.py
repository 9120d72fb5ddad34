from __future__ import annotations

import numpy as np
import pytest

from moe2.agent.llama import LlamaCppBackend
from moe2.agent.sessions import SessionManager
from moe2.shared.errors import SessionEvicted, UnknownSession


def test_least_recently_used_session_is_evicted(animals_backend: LlamaCppBackend) -> None:
    mgr = SessionManager(animals_backend, max_sessions=2)
    a, _, _ = mgr.open([1, 5])
    b, _, _ = mgr.open([1, 6])
    mgr.get(a)  # a is now the most recently used
    c, _, _ = mgr.open([1, 7])
    assert len(mgr) == 2
    with pytest.raises(SessionEvicted):
        mgr.get(b)
    mgr.get(a)
    mgr.get(c)
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
