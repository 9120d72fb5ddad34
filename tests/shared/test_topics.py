"""Every topic is built and parsed in ``moe2.shared.protocol.topics``, and nowhere else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from moe2.shared.errors import BadMessage
from moe2.shared.protocol import topics
from moe2.shared.protocol.topics import Topic

REPO = Path(__file__).resolve().parents[2]
TOPICS_PY = REPO / "shared" / "moe2" / "shared" / "protocol" / "topics.py"

SHA = "ab" * 32

# (built topic, what parse makes of it)
BUILT = [
    (topics.agent_info("orin-1"), Topic("info", agent="orin-1")),
    (topics.agent_status("orin-1"), Topic("status", agent="orin-1")),
    (topics.agent_profile("orin-1"), Topic("profile", agent="orin-1")),
    (topics.agent_rpc("orin-1"), Topic("rpc", agent="orin-1")),
    (topics.gateway_status("gw"), Topic("gateway", agent="gw")),
    (topics.gateway_stats("gw"), Topic("stats", agent="gw")),
    (topics.gateway_links("gw"), Topic("links", agent="gw")),
    (topics.assignment_ack("gw", "qa"), Topic("assignment_ack", agent="gw", app="qa")),
    (topics.gate_ack("gw", "g3"), Topic("gate_ack", agent="gw", version="g3")),
    (topics.desired_app("qa"), Topic("desired_app", app="qa")),
    (topics.gate_manifest("g3"), Topic("gate_manifest", version="g3")),
    (topics.blob_chunk(SHA, 7), Topic("blob_chunk", sha256=SHA, index=7)),
    (topics.prompts("qa"), Topic("prompt", app="qa")),
    (topics.prompts("qa", "phone-7"), Topic("prompt", app="qa", client="phone-7")),
    (topics.cancel("qa"), Topic("cancel", app="qa")),
    (topics.cancel("qa", "phone-7"), Topic("cancel", app="qa", client="phone-7")),
    (topics.replies("u"), Topic("reply", client="u")),
    (topics.rpc_reply("u", "orin-1"), Topic("reply", client="u", rest=("rpc", "orin-1"))),
    (topics.client_answers("u", "c1"), Topic("reply", client="u", rest=("answers", "c1"))),
    (topics.prompt_errors("u"), Topic("reply", client="u", rest=("errors",))),
    (topics.sync_marker("u", "c1"), Topic("reply", client="u", rest=("sync", "c1"))),
]


@pytest.mark.parametrize(("topic", "meaning"), BUILT, ids=[t for t, _ in BUILT])
def test_every_built_topic_parses_back(topic: str, meaning: Topic) -> None:
    assert topic.startswith("moe2/v1/")
    assert topics.parse(topic) == meaning


@pytest.mark.parametrize(
    "topic",
    [
        "moe2/v2/agents/a/info",  # another major version
        "moe2/v1/agents/a/unknown",
        "moe2/v1/agents/a+b/info",  # not a name
        "moe2/v1/blobs/nothex/1x",
        "moe2/v1/prompts/qa/u/extra",
        "moe2/v1/replies",
        "phone/7/answers",
        topics.reply_probe("gw"),
    ],
)
def test_what_is_not_a_moe2_topic_parses_to_nothing(topic: str) -> None:
    assert topics.parse(topic) is None


def test_wildcards_match_what_the_builders_make() -> None:
    def matches(pattern: str, topic: str) -> bool:
        regex = re.escape(pattern).replace(r"\+", "[^/]+").replace("/\\#", "(/.*)?")
        return re.fullmatch(regex, topic) is not None

    assert matches(topics.ALL_AGENT_INFO, topics.agent_info("a"))
    assert matches(topics.ALL_AGENT_STATUS, topics.agent_status("a"))
    assert matches(topics.ALL_AGENT_PROFILES, topics.agent_profile("a"))
    assert matches(topics.ALL_GATEWAY_LINKS, topics.gateway_links("a"))
    assert matches(topics.ALL_GATEWAY_STATUS, topics.gateway_status("a"))
    assert matches(topics.ALL_GATEWAY_STATS, topics.gateway_stats("a"))
    assert matches(topics.ALL_DESIRED_APPS, topics.desired_app("qa"))
    assert matches(topics.ALL_ASSIGNMENT_ACKS, topics.assignment_ack("a", "qa"))
    assert matches(topics.ALL_GATE_ACKS, topics.gate_ack("a", "g1"))
    assert matches(topics.ALL_CANCELS, topics.cancel("qa", "u"))
    assert matches(topics.blob_chunks(SHA), topics.blob_chunk(SHA, 0))
    assert matches(topics.rpc_replies("u"), topics.rpc_reply("u", "a"))
    assert not matches(topics.rpc_replies("u"), topics.rpc_reply("v", "a"))
    assert topics.replies("u").startswith(topics.REPLIES_ROOT + "/")


def test_shared_subscriptions_of_a_gateway() -> None:
    assert topics.prompts_shared("g", "qa") == (
        "$share/g/moe2/v1/prompts/qa",
        "$share/g/moe2/v1/prompts/qa/+",
    )
    assert topics.prompts_unrouted("g") == "$share/g.unrouted/moe2/v1/prompts/#"


@pytest.mark.parametrize(
    ("topic", "user"),
    [
        ("moe2/v1/replies/phone-7", "phone-7"),
        ("moe2/v1/replies/phone-7/answers", "phone-7"),
        ("moe2/v1/replies/phone-7/answers/c1/deep", "phone-7"),
        ("moe2/v1/replies/phone-7/errors", "phone-7"),
        ("moe2/v1/replies/phone-7/rpc/orin-1", None),  # RPC replies: never a prompt's
        ("moe2/v1/replies/phone-7/rpc", None),
        ("moe2/v1/replies/phone-7//x", None),  # an empty level
        ("moe2/v1/replies/phone-7/", None),
        ("moe2/v1/replies/bad+name/x", None),
        ("moe2/v1/replies", None),
        ("moe2/v1/agents/orin-1/rpc", None),
        ("moe2/v2/replies/phone-7/x", None),
        ("phone/7/answers", None),
    ],
)
def test_reply_owner(topic: str, user: str | None) -> None:
    assert topics.reply_owner(topic) == user


def test_prompt_owner_names_the_publisher_even_of_an_invalid_topic() -> None:
    assert topics.prompt_owner(topics.prompts("qa", "u")) == "u"
    assert topics.prompt_owner("moe2/v1/prompts/-bad-/u") == "u"
    assert topics.prompt_owner(topics.prompts("qa")) is None
    with pytest.raises(BadMessage):
        topics.prompt_owner("moe2/v1/prompts/qa/bad+name")


def test_the_reply_probe_is_outside_moe2_and_names_its_gateway() -> None:
    probe = topics.reply_probe("gw-1")
    assert not probe.startswith("moe2/") and probe.endswith("/gw-1")
    assert topics.reply_probe("gw-2") != probe
    with pytest.raises(BadMessage):
        topics.reply_probe("gw/1")


def _topic_literals(path: Path) -> list[str]:
    """String constants (docstrings left out) and f-strings of ``path`` that spell a moe2 topic:
    ``moe2/v1/...``, a shared subscription to one, ``{TOPIC_ROOT}/...``, the reply probe."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    fstrings = [node for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)]
    in_fstrings = {id(part) for node in fstrings for part in node.values}
    spelled = re.compile(r"^(\$share/[^/]*/)?moe2/v1/|^moe2-reply-check")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for part in node.values:
                value = part.value if isinstance(part, ast.FormattedValue) else None
                name = getattr(value, "id", None) or getattr(value, "attr", None)
                if name == "TOPIC_ROOT":
                    out.append(f"{path.name}:{node.lineno} f-string on TOPIC_ROOT")
                    break
            first = node.values[0] if node.values else None
            if isinstance(first, ast.Constant) and spelled.match(str(first.value)):
                out.append(f"{path.name}:{node.lineno} {first.value!r}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings | in_fstrings
            and spelled.match(node.value)
        ):
            out.append(f"{path.name}:{node.lineno} {node.value!r}")
    return out


def test_no_product_module_spells_a_topic() -> None:
    modules = [
        f
        for root in ("agent", "controller", "shared")
        for f in (REPO / root / "moe2").rglob("*.py")
        if f != TOPICS_PY
    ]
    assert len(modules) > 50
    found = [hit for f in modules for hit in _topic_literals(f)]
    assert found == []


def test_the_scan_finds_a_spelled_topic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""moe2/v1/agents/x/info in a docstring is prose."""\n'
        "from moe2.shared.protocol import TOPIC_ROOT\n"
        'A = "moe2/v1/agents/x/info"\n'
        'B = f"{TOPIC_ROOT}/replies/{A}"\n'
        'C = f"moe2-reply-check/{A}"\n'
        'D = "moe2/v1"\n'
    )
    found = _topic_literals(bad)
    assert [hit.split()[0] for hit in found] == ["bad.py:3", "bad.py:4", "bad.py:5"]
