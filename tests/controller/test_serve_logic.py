"""What the reconcile loop counts as a change that matters (pure logic, no broker)."""

from __future__ import annotations

import time

from moe2.controller.serve.policy import ServePolicy
from moe2.controller.serve.reconcile import Basis, changes, measured_delay
from moe2.shared import protocol as p
from moe2.shared.fleet import FleetState

POLICY = ServePolicy(dataset="d", apps={"qa": 0.05}, min_answers=5, delay_tolerance=0.1)


def basis(**over: object) -> Basis:
    base: dict[str, object] = dict(
        eligible=frozenset({"a", "b"}),
        token_s={"a": 0.01, "b": 0.02},
        token_j={"a": 1.0, "b": 2.0},
        rtt_s={},
        predicted={"qa": 0.03},
        at=time.time() - 100,
    )
    return Basis(**(base | over))  # type: ignore[arg-type]


def assigned(*experts: str) -> FleetState:
    s = FleetState()
    s.desired_app["qa"] = p.AppAssignment(app="qa", version=1, subset=list(experts), k=1)
    return s


def stats(delay: float, answers: int, at: float) -> p.AppStats:
    fig = p.AppFigures(answers=answers, errors=0, steps=answers * 4, delay_s_per_step=delay)
    return p.AppStats(gateway="gw", window_s=10, apps={"qa": fig}, at=at)


def test_an_assigned_expert_leaving_matters_an_unassigned_one_does_not() -> None:
    look = changes(basis(), assigned("a"), {"b"}, POLICY, 10)
    assert look.reasons == ["assigned expert a is offline or no longer eligible"]
    assert changes(basis(), assigned("a"), {"a"}, POLICY, 10).reasons == []


def test_a_new_eligible_expert_and_a_first_look_matter() -> None:
    assert changes(None, FleetState(), set(), POLICY, 10).reasons == ["first look at the fleet"]
    look = changes(basis(), assigned("a"), {"a", "b", "c"}, POLICY, 10)
    assert look.reasons == ["expert c is online and eligible"]


def test_measured_delay_above_the_limit_matters_once_the_window_is_fresh() -> None:
    b = basis(at=time.time() - 30)
    state = assigned("a", "b")
    state.stats["gw"] = stats(0.08, 10, time.time())  # published after basis.at + 10 s
    look = changes(b, state, {"a", "b"}, POLICY, 10)
    assert len(look.reasons) == 1 and "measured 0.0800" in look.reasons[0]
    assert look.factors["qa"] == 0.08 / 0.03
    # Figures still holding answers from before the last push do not count.
    stale = assigned("a", "b")
    stale.stats["gw"] = stats(0.08, 10, b.at + 5)
    assert changes(b, stale, {"a", "b"}, POLICY, 10).reasons == []
    # Nor do too few answers, nor a delay within the tolerance.
    few = assigned("a", "b")
    few.stats["gw"] = stats(0.08, 2, time.time())
    assert measured_delay(few, "qa", b.at + 10, 5) is None
    ok = assigned("a", "b")
    ok.stats["gw"] = stats(0.054, 10, time.time())
    assert changes(b, ok, {"a", "b"}, POLICY, 10).reasons == []


def test_an_assignment_the_broker_forgot_matters_and_its_experts_still_count() -> None:
    # A broker restarted without persistence loses the retained assignment; the basis
    # remembers what was pushed, so the loss is a change, and so is an assigned expert leaving.
    b = basis(assigned={"qa": ("a", "b")})
    assert changes(b, assigned("a", "b"), {"a", "b"}, POLICY, 10).reasons == []
    look = changes(b, FleetState(), {"a", "b"}, POLICY, 10)
    assert look.reasons == ["qa: its assignment is no longer on the broker"]
    look = changes(b, FleetState(), {"b"}, POLICY, 10)
    assert "assigned expert a is offline or no longer eligible" in look.reasons
