"""docs/protocol.md and the generated schema agree on every channel, type and field.

The doc's message tables are read by `tests/protocol/docspec.py` (the notation is
explained in docs/protocol.md, "Message tables and the generated schema") and compared
both ways with `aetherd.protocol.schema.build_document`: a type or a field in one and
not in the other fails, with the doc's line number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from aetherd.channels import CHANNELS
from aetherd.errors import ErrorCode
from aetherd.protocol import Channel, Context, Frame, Message, Model, Registry, omitted
from aetherd.protocol.schema import build_document
from tests.protocol.docspec import DocError, compare, parse_doc, parse_fields, parse_reply

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def check(text: str, registry: Registry) -> list[str]:
    return compare(build_document(registry), parse_doc(text))


def test_the_doc_and_the_schema_agree() -> None:
    problems = check(DOC.read_text(encoding="utf-8"), Registry(CHANNELS))
    assert problems == [], "docs/protocol.md and the schema disagree:\n" + "\n".join(problems)


def test_every_channel_has_a_message_table() -> None:
    doc = parse_doc(DOC.read_text(encoding="utf-8"))
    channels = {row.channel for row in doc.rows}
    assert channels == {channel.name for channel in CHANNELS} | {"error"}


# --- the comparison catches what it should (doc edits against the real schema) ------


def _edit(old: str, new: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_a_field_missing_from_the_doc_is_reported() -> None:
    text = _edit("`command` (string), `resumeFrom` (integer ≥ 0)", "`command` (string)")
    problems = check(text, Registry(CHANNELS))
    assert any("terminal/create" in p and "`resumeFrom` is in the schema" in p for p in problems)


def test_a_field_only_in_the_doc_is_reported() -> None:
    text = _edit(
        "| `resize` | `sessionId`, `cols`, `rows`",
        "| `resize` | `sessionId`, `cols`, `rows`, `depth`",
    )
    problems = check(text, Registry(CHANNELS))
    assert any("terminal/resize" in p and "`depth` is in the doc" in p for p in problems)


def test_a_missing_and_an_invented_type_are_reported() -> None:
    text = _edit("| `detach` | `sessionId` |", "| `unplug` | `sessionId` |")
    problems = check(text, Registry(CHANNELS))
    assert "terminal/detach (client): in the schema, not in the doc" in problems
    assert any("terminal/unplug (client): in the doc, not in the schema" in p for p in problems)


def test_a_wrong_nested_field_of_a_reply_is_reported() -> None:
    text = _edit(
        "| `session` | `sessionId, pid, command,", "| `session` | `sessionId, pgid, command,"
    )
    problems = check(text, Registry(CHANNELS))
    assert any(
        "terminal/list" in p and "reply.sessions[]: field `pid` is in the schema" in p
        for p in problems
    ), problems
    assert any("terminal/sessions" in p and "`pgid` is in the doc" in p for p in problems), problems


# --- the comparison on a channel made for the test -----------------------------------


class Item(Model):
    name: str
    size: int
    note: str | None = omitted()


class State(Model):
    items: list[Item]
    total: int


class Get(Message):
    """`get`: the state, filtered."""

    prefix: Annotated[str, Field(max_length=8)] | None = None


class Tick(Frame):
    channel: Literal["demo"] = "demo"
    type: Literal["tick"] = "tick"
    count: int
    last: Item | None


def demo_registry() -> Registry:
    channel = Channel("demo", pushes=(Tick,))

    @channel.handler("get", Get, reply=State, errors=(ErrorCode.NOT_FOUND,))
    async def get(ctx: Context, msg: Get) -> State:
        raise AssertionError("not run")

    @channel.handler("poke", Get)
    async def poke(ctx: Context, msg: Get) -> None:
        raise AssertionError("not run")

    return Registry([channel])


DEMO_DOC = """\
## 1. Connection

| frame | fields |
|---|---|
| success reply | `channel, type, requestId, success, data` |
| error reply | `channel, type, requestId, success, error, code` (notes are ignored, `x`) |

| channel | direction | type | fields |
|---|---|---|---|
| `error` | server | `error` | `code, error, ref` |

## 2. Demo channel

### Client to server

| type | fields | reply | behaviour |
|---|---|---|---|
| `get` | optional `prefix` (at most 8) | `{items: [item], total}` | prose |
| `poke` | `prefix` | — | more prose |

### Server to client

| type | fields |
|---|---|
| `tick` | `count, last: item` |

| object | fields |
|---|---|
| `item` | `name, size, note` |
"""


def test_a_matching_doc_has_no_problems() -> None:
    assert check(DEMO_DOC, demo_registry()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "`name, size, note`",
            "`name, size`",
            "reply.items[]: field `note` is in the schema",
        ),
        (
            "`name, size, note`",
            "`name, size, note, colour`",
            "last: field `colour` is in the doc",
        ),
        ("`{items: [item], total}`", "`{items: [item]}`", "reply: field `total` is in the schema"),
        (
            "`{items: [item], total}`",
            "`{items, total}`",
            "reply.items: the schema has a list of objects",
        ),
        (
            "`{items: [item], total}`",
            "`{items: item, total}`",
            "reply.items: the doc sketches an object, the schema has array",
        ),
        ("`{items: [item], total}`", "—", "the doc's reply is —, the schema's data is not null"),
        (
            "| — | more prose",
            "| `{done}` | more prose",
            "demo/poke (client, line 19): the doc gives a reply",
        ),
        ("`count, last: item`", "`count, last`", "last: the schema has an object"),
        ("`count, last: item`", "`count, last: thing`", "no object table row for `thing`"),
        ("| `tick` |", "| `tock` |", "demo/tick (server): in the schema, not in the doc"),
        (
            "success, error, code` (notes",
            "success, error` (notes",
            "error reply: field `code` is in the schema",
        ),
        (
            "`code, error, ref`",
            "`code, error`",
            "error/error (server, line 10): field `ref` is in the schema",
        ),
    ],
)
def test_each_disagreement_is_reported(old: str, new: str, expected: str) -> None:
    assert DEMO_DOC.count(old) == 1, old
    problems = check(DEMO_DOC.replace(old, new), demo_registry())
    assert any(expected in p for p in problems), problems


def test_an_unused_object_is_reported() -> None:
    text = DEMO_DOC + "| `spare` | `a, b` |\n"
    assert check(text, demo_registry()) == ["object `spare` is not used by any message"]


# --- the sketch syntax --------------------------------------------------------------


def test_sketches_read_names_nesting_and_notes() -> None:
    fields = parse_fields(
        "`sessionId` (1\u2013128 of `[A-Za-z0-9._:-]`), optional `cols`, `rows` (1\u20131000), "
        "`usage: {inputTokens, outputTokens}`, `events: […]`, and `result` (success) or `error`"
    )
    assert list(fields) == ["sessionId", "cols", "rows", "usage", "events", "result", "error"]
    assert list(fields["usage"].fields) == ["inputTokens", "outputTokens"]
    assert parse_reply("—") is None
    assert list(parse_reply('`{taskId, status: "queued", approved: true}`').fields) == [
        "taskId",
        "status",
        "approved",
    ]


@pytest.mark.parametrize(
    "cell",
    ["`a` = the id", "`a` `b`", "`a`; `b`", "`{a, b`", "`a, a`"],
)
def test_a_cell_that_is_not_a_sketch_is_refused(cell: str) -> None:
    with pytest.raises(DocError):
        parse_fields(cell)


def test_a_bad_cell_names_its_line() -> None:
    text = DEMO_DOC.replace("`count, last: item`", "`count` = how many")
    with pytest.raises(DocError, match="line 25: cannot read ' = how many'"):
        parse_doc(text)


@pytest.mark.parametrize("cell", ["`sessions, total`", "`true`", "`{sessions}` and more"])
def test_a_reply_must_be_one_shape(cell: str) -> None:
    with pytest.raises(DocError):
        parse_reply(cell)
