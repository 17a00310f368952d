"""Read the message tables of docs/protocol.md and compare them with the generated schema.

The doc lists every message in tables (see "Message tables" in docs/protocol.md):

- a **message table** has the columns `type` and `fields`, and optionally `direction`
  (`client` or `server`), `channel` and `reply`; other columns (`behaviour`) are prose
  and are not read. Without a `direction` column, the nearest heading says it
  ("Client to server", "Server to client"); without a `channel` column, the channel is
  the first word of the `## N. Word …` section heading.
- an **object table** (`object | fields`) names a shape used inside messages, so a
  long shape is written once: `sessions: [session]`.
- an **envelope table** (`frame | fields`) lists the `success reply` and the
  `error reply`.

A `fields` or `reply` cell is a sketch of the JSON: `a, b: {c, d}, e: [{f}], g: [name]`,
with optional notes in parentheses (ignored), the words `optional`, `plus`, `and`
and `or` allowed between names, backticks anywhere, and `…` for "not compared" (a shape
described elsewhere). A `reply` cell is `{…}`, `[…]`, an object name, or `—` (`data` is
null). Values such as `"queued"` or `true` are examples and are not compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ENVELOPE_FIELDS = frozenset({"channel", "type", "requestId"})  # of a client frame
PUSH_ENVELOPE = frozenset({"channel", "type"})  # of a pushed frame
NONE_CELLS = {"", "\u2014", "-", "\u2013"}  # empty, em dash, hyphen, en dash
CONNECTORS = {"optional", "plus"}
SEPARATOR_WORDS = {"and", "or"}


class DocError(ValueError):
    """A table cell that does not follow the sketch syntax."""


@dataclass(frozen=True)
class Obj:
    fields: dict[str, Any]


@dataclass(frozen=True)
class Arr:
    item: Any


@dataclass(frozen=True)
class Ref:
    name: str


class Skip:
    """`…`: a shape the doc describes elsewhere; not compared."""

    def __repr__(self) -> str:
        return "…"


SKIP = Skip()
LEAF = None  # a name without a shape: a scalar, or a free-form value


@dataclass
class Row:
    line: int
    channel: str
    direction: str
    type: str
    fields: dict[str, Any]
    reply: Any = LEAF
    has_reply: bool = False


@dataclass
class Doc:
    rows: list[Row] = field(default_factory=list)
    objects: dict[str, Obj] = field(default_factory=dict)
    envelope: dict[str, dict[str, Any]] = field(default_factory=dict)


TOKEN = re.compile(
    r'\s*(?:(?P<punct>[{}\[\]:,])|(?P<ellipsis>…|\.\.\.)|(?P<string>"[^"]*")'
    r"|(?P<number>-?\d+(?:\.\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)


def _strip_notes(text: str) -> str:
    """Remove parenthesised notes (nested ones too) and backticks."""
    text = text.replace("`", "\0")
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"\([^()]*\)", " ", text)
    return text.replace("\0", "")


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise DocError(f"cannot read {text[pos : pos + 30]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise DocError("unexpected end")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        _kind, got = self.take()
        if got != value:
            raise DocError(f"expected {value!r}, got {got!r}")

    def fields(self, closing: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            token = self.peek()
            if token is None or token[1] == closing:
                return out
            kind, value = token
            if kind == "punct" and value == ",":
                self.take()
                continue
            if kind == "ellipsis":
                self.take()
                out["…"] = SKIP
                continue
            if kind != "name":
                raise DocError(f"expected a field name, got {value!r}")
            self.take()
            if value in CONNECTORS or value in SEPARATOR_WORDS:
                continue
            if value in out:
                raise DocError(f"field {value!r} listed twice")
            nxt = self.peek()
            if nxt is not None and nxt[1] == ":":
                self.take()
                out[value] = self.value()
            else:
                out[value] = LEAF
            nxt = self.peek()
            if nxt is not None and nxt[1] not in (",", closing) and nxt[1] not in SEPARATOR_WORDS:
                if not (nxt[0] == "name" and nxt[1] in CONNECTORS):
                    raise DocError(f"expected ',' after {value!r}, got {nxt[1]!r}")

    def value(self) -> Any:
        kind, value = self.take()
        if value == "{":
            fields = self.fields("}")
            self.expect("}")
            return SKIP if fields == {"…": SKIP} else Obj(fields)
        if value == "[":
            item = self.value()
            self.expect("]")
            return Arr(item)
        if kind == "ellipsis":
            return SKIP
        if kind == "name" and value not in ("true", "false", "null"):
            return Ref(value)
        return LEAF  # a literal example


def parse_fields(cell: str) -> dict[str, Any]:
    """`a, b: {c}` → `{"a": LEAF, "b": Obj({"c": LEAF})}`."""
    text = _strip_notes(cell).strip()
    if text in NONE_CELLS:
        return {}
    parser = _Parser(text)
    out = parser.fields(None)
    if parser.peek() is not None:
        raise DocError(f"unexpected {parser.peek()[1]!r}")  # type: ignore[index]
    return out


def parse_reply(cell: str) -> Any:
    """`—` → None (data is null); `{…}`, `[…]` or an object name → its shape."""
    text = _strip_notes(cell).strip()
    if text in NONE_CELLS:
        return None
    parser = _Parser(text)
    value = parser.value()
    if parser.peek() is not None:
        raise DocError(f"unexpected {parser.peek()[1]!r} after the reply shape")  # type: ignore[index]
    if value is LEAF:
        raise DocError("a reply is {…}, […], an object name, or —")
    return value


def _cells(line: str) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|"):
        body = body[:-1]
    # A `|` inside backticks (`private\|public`) is escaped in the doc.
    parts = re.split(r"(?<!\\)\|", body)
    return [part.strip() for part in parts]


def _header(cell: str) -> str:
    return cell.replace("`", "").strip().lower()


def _direction(word: str) -> str:
    word = word.replace("`", "").strip().lower()
    if word in ("client", "client to server"):
        return "client"
    if word in ("server", "server to client"):
        return "server"
    raise DocError(f"direction is client or server, not {word!r}")


def _names(cell: str) -> list[str]:
    names = [part.strip().strip("`").strip() for part in _strip_notes(cell).split(",")]
    if not names or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
        raise DocError(f"cannot read the names in {cell!r}")
    return names


def parse_doc(text: str) -> Doc:
    """Every message, object and envelope table of the doc."""
    doc = Doc()
    section_channel = ""
    heading = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        match = re.match(r"^## \d+\.\s+(\w+)", line)
        if match:
            section_channel = match.group(1).lower()
            heading = ""
        elif line.startswith("## "):
            section_channel = ""
            heading = ""
        elif line.startswith("### "):
            heading = line[4:].strip().lower()
        is_table = (
            line.lstrip().startswith("|")
            and index + 1 < len(lines)
            and re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", lines[index + 1]) is not None
            and "-" in lines[index + 1]
        )
        if not is_table:
            index += 1
            continue
        header = [_header(cell) for cell in _cells(line)]
        index += 2
        body: list[tuple[int, list[str]]] = []
        while index < len(lines) and lines[index].lstrip().startswith("|"):
            body.append((index + 1, _cells(lines[index])))
            index += 1
        try:
            _read_table(doc, header, body, section_channel, heading)
        except DocError as exc:
            raise DocError(f"docs/protocol.md: {exc}") from None
    return doc


def _read_table(
    doc: Doc,
    header: list[str],
    body: list[tuple[int, list[str]]],
    section_channel: str,
    heading: str,
) -> None:
    if header == ["object", "fields"]:
        for line, cells in body:
            try:
                name = cells[0].strip("`").strip()
                if name in doc.objects:
                    raise DocError(f"object {name!r} defined twice")
                doc.objects[name] = Obj(parse_fields(cells[1]))
            except DocError as exc:
                raise DocError(f"line {line}: {exc}") from None
        return
    if header == ["frame", "fields"]:
        for line, cells in body:
            try:
                doc.envelope[cells[0].strip("`").strip()] = parse_fields(cells[1])
            except DocError as exc:
                raise DocError(f"line {line}: {exc}") from None
        return
    if "type" not in header or "fields" not in header:
        return  # not a message table (settings, config keys, codes …)
    col = {name: header.index(name) for name in header}
    for line, cells in body:
        try:
            if len(cells) != len(header):
                raise DocError(f"{len(cells)} cells for {len(header)} columns")
            if "direction" in col:
                direction = _direction(cells[col["direction"]])
            elif "client to server" in heading:
                direction = "client"
            elif "server to client" in heading:
                direction = "server"
            else:
                raise DocError("no direction column and no 'Client to server' heading")
            channel = (
                cells[col["channel"]].strip("`").strip() if "channel" in col else section_channel
            )
            if not channel:
                raise DocError("no channel column and no channel section")
            fields = parse_fields(cells[col["fields"]])
            reply: Any = LEAF
            has_reply = "reply" in col and direction == "client"
            if has_reply:
                reply = parse_reply(cells[col["reply"]])
            for type_ in _names(cells[col["type"]]):
                doc.rows.append(Row(line, channel, direction, type_, fields, reply, has_reply))
        except DocError as exc:
            raise DocError(f"line {line}: {exc}") from None


# --- comparison with the generated document ---------------------------------------


class Schema:
    """The generated AsyncAPI document, read as the doc sees it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.schemas: dict[str, Any] = document["components"]["schemas"]
        self.messages: dict[str, Any] = document["components"]["messages"]

    def resolve(self, node: Any) -> Any:
        """Follow `$ref` and drop the `null` branch of an optional value."""
        for _ in range(50):
            if not isinstance(node, dict):
                return node
            ref = node.get("$ref")
            if isinstance(ref, str):
                node = self.schemas[ref.rsplit("/", 1)[1]]
                continue
            for key in ("anyOf", "oneOf"):
                branches = node.get(key)
                if isinstance(branches, list):
                    real = [b for b in branches if b != {"type": "null"}]
                    if len(real) == 1:
                        node = real[0]
                        break
                    return {"union": real}
            else:
                if isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1:
                    node = node["allOf"][0]
                    continue
                return node
        raise AssertionError("$ref loop")

    def entries(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """(channel, direction, type) → {fields, reply} from the operations."""
        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        for operation in self.document["operations"].values():
            direction = "client" if operation["x-direction"] == "client-to-server" else "server"
            key = (operation["x-channel"], direction, operation["x-type"])
            message_key = operation["messages"][0]["$ref"].rsplit("/", 1)[1]
            payload = self.resolve(self.messages[message_key]["payload"])
            entry: dict[str, Any] = {"payload": payload}
            if direction == "client":
                reply_key = operation["reply"]["messages"][0]["$ref"].rsplit("/", 1)[1]
                entry["reply"] = self.messages[reply_key]["payload"]["properties"]["data"]
            out[key] = entry
        return out


@dataclass
class Comparison:
    schema: Schema
    doc: Doc
    problems: list[str] = field(default_factory=list)
    used_objects: set[str] = field(default_factory=set)

    def fields(
        self,
        doc_fields: dict[str, Any],
        schema_node: Any,
        where: str,
        envelope: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Compare one object's fields both ways (leaving out the `envelope` names)."""
        node = self.schema.resolve(schema_node)
        properties = node.get("properties", {}) if isinstance(node, dict) else {}
        if "…" in doc_fields:
            return
        wire = {name for name in properties if name not in envelope}
        documented = {name for name in doc_fields if name not in envelope}
        for name in sorted(wire - documented):
            self.problems.append(f"{where}: field `{name}` is in the schema, not in the doc")
        for name in sorted(documented - wire):
            self.problems.append(f"{where}: field `{name}` is in the doc, not in the schema")
        for name in sorted(wire & documented):
            self.value(doc_fields[name], properties[name], f"{where}.{name}")

    def _kind(self, schema_node: Any) -> tuple[str, Any]:
        node = self.schema.resolve(schema_node)
        if not isinstance(node, dict):
            return "leaf", node
        if "union" in node:
            kinds = [self._kind(branch) for branch in node["union"]]
            if any(kind in ("object", "array", "union") for kind, _ in kinds):
                return "union", node
            return "leaf", node
        if node.get("properties"):
            return "object", node
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            return "array", node["items"]
        return "leaf", node

    def value(self, doc_value: Any, schema_node: Any, where: str) -> None:
        if isinstance(doc_value, Skip):
            return
        if isinstance(doc_value, Ref):
            obj = self.doc.objects.get(doc_value.name)
            if obj is None:
                self.problems.append(f"{where}: no object table row for `{doc_value.name}`")
                return
            self.used_objects.add(doc_value.name)
            doc_value = obj
        kind, node = self._kind(schema_node)
        if isinstance(doc_value, Obj):
            if kind != "object":
                self.problems.append(f"{where}: the doc sketches an object, the schema has {kind}")
                return
            self.fields(doc_value.fields, node, where)
        elif isinstance(doc_value, Arr):
            if kind != "array":
                self.problems.append(f"{where}: the doc sketches a list, the schema has {kind}")
                return
            self.value(doc_value.item, node, f"{where}[]")
        elif kind == "object":
            names = ", ".join(sorted(node["properties"]))
            self.problems.append(f"{where}: the schema has an object {{{names}}}; sketch it")
        elif kind == "array" and self._kind(node)[0] in ("object", "array", "union"):
            self.problems.append(f"{where}: the schema has a list of objects; sketch it ([…])")
        elif kind == "union":
            self.problems.append(
                f"{where}: the schema has a union of objects; sketch it or write …"
            )


def compare(document: dict[str, Any], doc: Doc) -> list[str]:
    """Every disagreement between the doc's tables and the generated document."""
    schema = Schema(document)
    comparison = Comparison(schema, doc)
    problems = comparison.problems
    entries = schema.entries()
    rows: dict[tuple[str, str, str], Row] = {}
    for row in doc.rows:
        key = (row.channel, row.direction, row.type)
        if key in rows:
            problems.append(f"line {row.line}: {'/'.join(key)} is listed twice")
        rows[key] = row

    for key in sorted(set(entries) - set(rows)):
        problems.append(f"{key[0]}/{key[2]} ({key[1]}): in the schema, not in the doc")
    for key in sorted(set(rows) - set(entries)):
        problems.append(
            f"line {rows[key].line}: {key[0]}/{key[2]} ({key[1]}): in the doc, not in the schema"
        )
    for key in sorted(set(rows) & set(entries)):
        row, entry = rows[key], entries[key]
        where = f"{key[0]}/{key[2]} ({key[1]}, line {row.line})"
        envelope = ENVELOPE_FIELDS if key[1] == "client" else PUSH_ENVELOPE
        comparison.fields(row.fields, entry["payload"], where, envelope)
        if key[1] != "client":
            continue
        if not row.has_reply:
            problems.append(f"{where}: no reply column for a client message")
            continue
        data = entry["reply"]
        if data == {"type": "null"}:
            if row.reply is not None:
                problems.append(f"{where}: the doc gives a reply, the schema's data is null")
        elif row.reply is None:
            problems.append(f"{where}: the doc's reply is —, the schema's data is not null")
        else:
            comparison.value(row.reply, data, f"{where} reply")
    for name, model in (("success reply", "SuccessReply"), ("error reply", "ErrorReply")):
        if name not in doc.envelope:
            problems.append(f"envelope: no `{name}` row")
            continue
        envelope = dict(doc.envelope[name])
        comparison.fields(envelope, {"$ref": f"#/components/schemas/{model}"}, name)
    for name in sorted(set(doc.objects) - comparison.used_objects):
        problems.append(f"object `{name}` is not used by any message")
    return problems
