"""The documents in docs/ cannot drift from the code silently.

- Every example payload of ``docs/protocol.md`` (a ```json block after an
  ``<!-- example: Model -->`` marker) parses with the protocol model it names, every model it
  names exists in ``moe2.shared.protocol``, and no JSON block goes unchecked.
- Every message of the protocol has an example, every topic of ``topics.py`` and every error
  code of ``moe2.shared.errors`` is named in it.
- Every relative link between the documents (and to the repository's files) leads somewhere.
- No file of the product cites a design document outside the repository.

The checks are plain functions of a document's text, so the tests below also show that each
one fails on a document that is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

import moe2.shared.protocol as protocol
from moe2.shared.errors import _all_codes
from moe2.shared.protocol.base import Message
from moe2.shared.protocol.topics import topics

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PROTOCOL = DOCS / "protocol.md"
DOCUMENTS = ("architecture", "protocol", "method", "operations", "contributing")

_MARKER = re.compile(r"<!--\s*example:\s*([A-Za-z_][A-Za-z0-9_]*)\s*-->")
_FENCE = re.compile(r"^```(\S*)\s*$")

# Protocol messages that need no example of their own, and why.
_NO_EXAMPLE = {
    "ProfileReply": "an AgentProfile inside an RPC reply; AgentProfile has its example",
}


@dataclass(frozen=True)
class Example:
    model: str | None  # the model its marker names; None: a JSON block without a marker
    body: str
    line: int  # where the block starts, 1-based


def json_blocks(text: str) -> list[Example]:
    """Every fenced ``json`` block of ``text``, with the model named by the marker on the
    nearest non-blank line above it (if that line is a marker)."""
    lines = text.splitlines()
    out: list[Example] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        while i < len(lines) and not _FENCE.match(lines[i]):
            i += 1
        body = "\n".join(lines[start + 1 : i])
        i += 1  # past the closing fence
        if lang != "json":
            continue
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = _MARKER.fullmatch(lines[above].strip()) if above >= 0 else None
        out.append(Example(marker.group(1) if marker else None, body, start + 1))
    return out


def example_problem(example: Example) -> str | None:
    """Why ``example`` is not a valid message of the model it names, or None."""
    if example.model is None:
        return f"line {example.line}: a JSON block with no <!-- example: Model --> marker"
    model = getattr(protocol, example.model, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return f"line {example.line}: {example.model} is not a model of moe2.shared.protocol"
    try:
        model.model_validate_json(example.body)
    except ValidationError as exc:
        return f"line {example.line}: not a valid {example.model}: {exc}"
    return None


def unnamed_topics(text: str) -> list[str]:
    """The names of ``topics`` that ``text`` never mentions as ``topics.<name>``."""
    names = [n for n in vars(topics) if not n.startswith("_")]
    return [n for n in names if not re.search(rf"\btopics\.{n}\b", text)]


def unnamed_codes(text: str) -> list[str]:
    """The error codes of the error tree that ``text`` never names as `code`."""
    return sorted(c for c in _all_codes() if f"`{c}`" not in text)


def messages_without_example(text: str) -> list[str]:
    """Protocol messages (every exported model with a schema version, and the public prompt
    API's) that no example of ``text`` shows."""
    shown = {e.model for e in json_blocks(text)}
    public = {"PromptRequest", "PromptCancel", "StreamChunk", "PromptAnswer", "ChoiceAnswer"}
    wanted = {
        name
        for name in protocol.__all__
        if isinstance(obj := getattr(protocol, name), type)
        and issubclass(obj, BaseModel)
        and ((issubclass(obj, Message) and obj is not Message) or name in public)
    }
    return sorted(wanted - shown - set(_NO_EXAMPLE))


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(path: Path) -> list[str]:
    """Relative links of the Markdown file ``path`` whose file or #anchor does not exist."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            out.append(target)
            continue
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#{1,6}\s+(.*)$", dest.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                out.append(target)
    return out


# --------------------------------------------------------------------------- the documents

_EXAMPLES = json_blocks(PROTOCOL.read_text()) if PROTOCOL.exists() else []


def test_the_documents_exist() -> None:
    for name in DOCUMENTS:
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert len(_EXAMPLES) >= 30, "docs/protocol.md lost its examples"


@pytest.mark.parametrize("example", _EXAMPLES, ids=lambda e: f"{e.model}@{e.line}")
def test_every_protocol_example_parses_with_its_model(example: Example) -> None:
    assert example_problem(example) is None, example_problem(example)


def test_every_message_has_an_example() -> None:
    assert messages_without_example(PROTOCOL.read_text()) == []


def test_the_protocol_names_every_topic() -> None:
    assert unnamed_topics(PROTOCOL.read_text()) == []


def test_the_protocol_names_every_error_code() -> None:
    assert unnamed_codes(PROTOCOL.read_text()) == []


@pytest.mark.parametrize("name", [*DOCUMENTS, "README"])
def test_links_lead_somewhere(name: str) -> None:
    path = REPO / "README.md" if name == "README" else DOCS / f"{name}.md"
    assert broken_links(path) == []


def test_the_readme_links_every_document() -> None:
    readme = (REPO / "README.md").read_text()
    for name in DOCUMENTS:
        assert f"](docs/{name}.md" in readme, f"README.md does not link docs/{name}.md"


def test_no_product_file_cites_a_document_outside_the_repository() -> None:
    # The team's design notes (a file the repository does not hold), by file or by name.
    outside = re.compile(r"\bDESIGN\b")
    roots = ("agent", "controller", "shared", "tests", "bench", "ansible", "docs", "scripts")
    files = [REPO / "README.md", REPO / "Makefile"]
    for root in roots:
        files += [f for f in (REPO / root).rglob("*") if f.is_file() and ".egg-info" not in str(f)]
    citing = []
    for f in files:
        if f == Path(__file__).resolve():
            continue
        try:
            if outside.search(f.read_text()):
                citing.append(str(f.relative_to(REPO)))
        except (UnicodeDecodeError, OSError):  # binary files, dangling links
            continue
    assert citing == []


# --------------------------------------------------------------------------- the checks fail


def test_a_wrong_example_is_found() -> None:
    doc = (
        "<!-- example: PromptRequest -->\n"
        '```json\n{"id": "1", "prompt": "hi", "reply_to": "moe2/v1/agents/x/rpc"}\n```\n\n'
        "<!-- example: NoSuchModel -->\n```json\n{}\n```\n\n"
        '```json\n{"id": "2"}\n```\n\n'
        "<!-- example: StreamChunk -->\n"
        '```json\n{"id": "1", "index": 0, "delta": "a"}\n```\n'
    )
    found = json_blocks(doc)
    assert [e.model for e in found] == ["PromptRequest", "NoSuchModel", None, "StreamChunk"]
    problems = [example_problem(e) for e in found]
    assert "not a valid PromptRequest" in (problems[0] or "")  # a reply_to inside agents/
    assert "not a model" in (problems[1] or "")
    assert "no <!-- example" in (problems[2] or "")
    assert problems[3] is None


def test_a_missing_topic_code_or_example_is_found() -> None:
    doc = "`topics.agent_info` and `topics.agent_status`, `busy`"
    missing = unnamed_topics(doc)
    assert "agent_rpc" in missing and "ALL_CANCELS" in missing
    assert "agent_info" not in missing and "agent_status" not in missing
    assert "unknown_app" in unnamed_codes(doc) and "busy" not in unnamed_codes(doc)
    assert "AppAssignment" in messages_without_example(doc)


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# A heading, here\n")
    a = tmp_path / "a.md"
    a.write_text(
        "[ok](b.md#a-heading-here) [gone](c.md) [no anchor](b.md#nowhere) [web](https://x.org)"
    )
    assert broken_links(a) == ["c.md", "b.md#nowhere"]
