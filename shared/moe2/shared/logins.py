"""What a broker login binds: the MQTT client ids of its connections.

An MQTT session belongs to a client id, and whoever connects under that id takes the session
over: the one connected is dropped (its last will published when it kept no session), a kept
session is resumed (its queued messages then go to the newcomer, or are dropped when it may
not read them) or ended (session expiry 0). mosquitto 2.0.11 binds no client id to a login:
any user may connect under any id. What it offers does not fit moe2:
``use_username_as_clientid`` allows one connection per login (a gateway holds four; a
phone's ``mosquitto_sub`` and ``mosquitto_pub`` share one login), and the
dynamic-security plugin pins a login to one exact id (and does nothing for the logins it
does not pin). ACL patterns (``%c``) bind topics to ids, never ids to logins.

So moe2 makes the id a secret of the login: with a password, every connection's id is its
name followed by a tag that only that password computes (HMAC-SHA256 of the user and the
name; 96 bits)::

    moe2-agent-orin-1.4f1c...      moe2-gateway-gw-1.9b0e...

Another login cannot compute it, so cannot drop, resume or end that connection. A gateway's
kept session is the one id shared on purpose: its retained ``GatewayStatus`` (which only
gateway, controller and moe2-http's logins may read) names it, so that a live gateway can
adopt a lost one's session (``agent/gateway/adopt.py``). Without a password (a loopback
broker without logins) an id is its name: there is no login to bind it to.
"""

from __future__ import annotations

import hashlib
import hmac

_TAG_HEX = 24  # 96 bits
_LABEL = b"moe2 client id\x00"


def tag(username: str | None, password: str, name: str) -> str:
    """The part of a client id only ``password`` computes."""
    msg = _LABEL + (username or "").encode() + b"\x00" + name.encode()
    return hmac.new(password.encode(), msg, hashlib.sha256).hexdigest()[:_TAG_HEX]


def bound_client_id(username: str | None, password: str | None, name: str) -> str:
    """The client id of the connection ``name`` of this login: ``name.<tag>`` with a
    password, ``name`` without. Idempotent: an id bound already is returned as it is."""
    if not password:
        return name
    head, _, tail = name.rpartition(".")
    if head and hmac.compare_digest(tail, tag(username, password, head)):
        return name
    return f"{name}.{tag(username, password, name)}"
