"""Client ids bound to logins (issue 20): another login cannot compute them."""

from __future__ import annotations

from moe2.shared.logins import bound_client_id
from moe2.shared.mqtt import BrokerConfig, Connection


def test_a_client_id_is_a_secret_of_its_login() -> None:
    mine = bound_client_id("gw-1", "pw-1", "moe2-gateway-gw-1")
    assert mine.startswith("moe2-gateway-gw-1.") and len(mine) == len("moe2-gateway-gw-1.") + 24
    assert bound_client_id("gw-1", "pw-1", "moe2-gateway-gw-1") == mine  # stable
    assert bound_client_id("gw-1", "pw-1", mine) == mine  # bound once only
    assert bound_client_id("gw-1", "other", "moe2-gateway-gw-1") != mine  # another password
    assert bound_client_id("gw-2", "pw-1", "moe2-gateway-gw-1") != mine  # another user
    assert bound_client_id("gw-1", "pw-1", "gw-gw-1") != mine  # another connection
    assert bound_client_id(None, None, "moe2-agent-a") == "moe2-agent-a"  # no login: as is
    # a look-alike suffix is not taken for a tag
    fake = "moe2-gateway-gw-1." + "0" * 24
    assert bound_client_id("gw-1", "pw-1", fake) != fake


def test_connections_use_the_bound_id_unless_told_it_is_anothers() -> None:
    cfg = BrokerConfig(username="gw-1", password="pw-1")
    assert Connection(cfg, "moe2-agent-gw-1").client_id == cfg.client_id("moe2-agent-gw-1")
    theirs = bound_client_id("gw-2", "pw-2", "moe2-gateway-gw-2")
    assert Connection(cfg, theirs, exact_client_id=True).client_id == theirs
    assert Connection(BrokerConfig(), "moe2-agent-a").client_id == "moe2-agent-a"
