"""Property-based fuzzing of every client message, over a real socket to a real daemon.

The registry is enumerated (`aetherd.channels.CHANNELS`), so a new channel or type is
fuzzed without touching this file. For each `(channel, type)` hypothesis generates:

- valid bodies, from the handler model's own JSON schema (hypothesis-jsonschema);
- invalid ones: a field replaced by a hostile value (lone surrogates, NUL, `..`, /proc
  paths, 2^63 and beyond, -1, a 5000-digit number, NaN/Infinity, deep nesting, wrong
  types), fields dropped, unknown fields added, and a hostile `requestId`.

The property, for every frame:
- with a usable `requestId`: exactly the reply or failed reply for it arrives;
- without one: an error frame, an agent `error` event, or nothing (PROTOCOL.md section 1);
- never `INTERNAL_ERROR`, never an ERROR record in the daemon's log;
- the socket stays usable: a `terminal/list` probe after every frame is answered.

Bounds: `AETHERD_FUZZ_EXAMPLES` examples per `(channel, type)` (default 30, which keeps
this module well under a minute on two cores); `AETHERD_FUZZ_SEED` fixes the seed (default
0, so CI is repeatable; set `AETHERD_FUZZ_SEED=random` for a fresh exploration), e.g.

    AETHERD_FUZZ_EXAMPLES=2000 AETHERD_FUZZ_SEED=random python -m pytest tests/reliability/test_fuzz.py

Nothing destructive escapes the temporary root: frames that would validate are defused
before they are sent (`terminal/create` runs `cat`, never a generated command;
`ports/kill` targets only the daemon's own port, which it refuses; `config/set` never
carries terminals or setup commands), and terminal sessions are closed after each example.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import uuid
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from aetherd.channels import CHANNELS
from aetherd.protocol.dispatch import MAX_REQUEST_ID
from tests.support import WsClient, wait_for

EXAMPLES = int(os.environ.get("AETHERD_FUZZ_EXAMPLES", "30"))
_SEED = os.environ.get("AETHERD_FUZZ_SEED", "0")
REPLY_TIMEOUT = 10.0

HANDLERS = [(ch.name, type_) for ch in CHANNELS for type_ in sorted(ch.handlers)]


class Raw:
    """A JSON fragment spliced into the frame text as is (json.dumps cannot write it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'…' if len(self.text) > 40 else ''})"


BIG_DIGITS = Raw("1" + "0" * 5000)  # beyond Python's int-parsing limit: INVALID_JSON
DEEP_LIST = Raw("[" * 20_000 + "]" * 20_000)  # RecursionError in a naive parser

HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**300,
    1.5,
    -0.0,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    " ",
    "\ud800",
    "/\ud800",
    "a\udfffb",
    "\x00",
    "a\x00b",
    "/etc/passwd",
    "..",
    "../../../../etc/passwd",
    "/../..",
    "/proc/self/environ",
    "/proc/1/root",
    "/dev/zero",
    "~",
    "\u202e\u0000\ufeff",
    "\U0001f4a9" * 300,
    "x" * 70_000,
    "-1",
    "9" * 40,
    "NaN",
    [],
    [1, "a", None],
    {},
    {"a": {"b": {"c": [1]}}},
    BIG_DIGITS,
    DEEP_LIST,
]

hostile_values = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=4),
    st.lists(st.integers(), max_size=3),
)

# requestId: usable ids, and hostile ones (wrong types, empty, too long, surrogates).
good_request_ids = st.one_of(
    st.just(None),
    st.builds(lambda: uuid.uuid4().hex),
    st.text(min_size=1, max_size=MAX_REQUEST_ID).filter(lambda s: s.isprintable()),
)
bad_request_ids = st.sampled_from(
    ["", "x" * (MAX_REQUEST_ID + 1), 0, -1, 2**63, 1.5, math.nan, [], {}, True, "\ud800", "a\udc00"]
)


def encode(frame: Any) -> str:
    """JSON text of `frame`, with Raw fragments spliced in and NaN/Infinity written bare."""
    raws: dict[str, str] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            marker = f"__raw_{len(raws)}_{uuid.uuid4().hex}__"
            raws[marker] = value.text
            return marker
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(frame))  # ensure_ascii: lone surrogates travel as \ud800 escapes
    for marker, raw in raws.items():
        text = text.replace(json.dumps(marker), raw)
    return text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy:
    """Values valid against the JSON Schema subset pydantic emits for message models.

    (hypothesis-jsonschema 0.23 cannot draw objects under hypothesis 6.170, so this small
    converter covers what the models use: refs, anyOf, enum/const, strings with length and
    pattern, bounded integers, numbers, booleans, null, arrays and objects.)
    """
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].split("/")[-1]], defs))
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, defs) for k in kind])
    if kind == "string":
        if "pattern" in schema:
            lo, hi = schema.get("minLength", 0), schema.get("maxLength", 64)
            return st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda s: lo <= len(s) <= hi
            )
        return st.text(
            min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 200), 200)
        )
    if kind == "integer":
        lo = schema.get(
            "minimum",
            schema.get("exclusiveMinimum", -(2**40) - 1) + 1
            if "exclusiveMinimum" in schema
            else None,
        )
        hi = schema.get(
            "maximum",
            schema.get("exclusiveMaximum", 2**40 + 1) - 1 if "exclusiveMaximum" in schema else None,
        )
        return st.integers(min_value=lo, max_value=hi)
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum"), max_value=schema.get("maximum"), allow_nan=False
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema["items"], defs) if "items" in schema else json_values
        return st.lists(
            items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4)
        )
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties", False)
        extra_values = (
            json_values
            if extra is True
            else from_schema(extra, defs)
            if isinstance(extra, dict)
            else None
        )

        @st.composite
        def build(draw: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, sub in props.items():
                if name in required or draw(st.booleans()):
                    out[name] = draw(from_schema(sub, defs))
            if extra_values is not None:
                out.update(draw(st.dictionaries(st.text(max_size=10), extra_values, max_size=3)))
            return out

        return build()
    return json_values


def model_strategy(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Valid bodies of `model`, from its JSON schema (camelCase aliases, as on the wire)."""
    return from_schema(model.model_json_schema(by_alias=True))


def mutate(body: dict[str, Any], data: st.DataObject, fields: list[str]) -> dict[str, Any]:
    """Break a valid body: hostile values, dropped fields, extra fields."""
    body = dict(body)
    ops = data.draw(
        st.lists(st.sampled_from(["replace", "drop", "extra", "none"]), min_size=1, max_size=3)
    )
    for op in ops:
        if op == "replace" and fields:
            body[data.draw(st.sampled_from(fields))] = data.draw(hostile_values)
        elif op == "drop" and body:
            body.pop(data.draw(st.sampled_from(sorted(body))))
        elif op == "extra":
            body[data.draw(st.text(min_size=1, max_size=12))] = data.draw(hostile_values)
    return body


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _ints(v)]
    if isinstance(value, list):
        return [i for v in value for i in _ints(v)]
    return []


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# Defects the fuzzer found that another helper is fixing (issue 11); examples that hit
# them are set aside (hypothesis `assume`) so that main stays green meanwhile. Remove an
# entry as soon as its fix is on main: the fuzzer then guards it for good.
# None is open now. Found by this fuzzer and fixed on main since: a path, prompt, taskId
# or config `raw` with a lone surrogate, and agent/history beforeSeq >= 2^63 (both now
# refused at the frame level); config `raw` with a character YAML refuses, such as
# "\x1f" (now INVALID_CONFIG); a surrogate requestId echoed as "?".
# AETHERD_FUZZ_ALL=1 ignores this list (to check whether a fix has landed).
KNOWN_OPEN: dict[str, Any] = {}


def _malformed(value: Any) -> bool:
    """Whether `value` holds a fragment no JSON parser reads (INVALID_JSON: no reply).
    A number out of range (BIG_DIGITS) still parses, so its frame can be answered."""
    if isinstance(value, Raw):
        return value is not BIG_DIGITS
    if isinstance(value, dict):
        return any(_malformed(v) for v in value.values())
    if isinstance(value, list):
        return any(_malformed(v) for v in value)
    return False


def replyable(frame: Any) -> bool:
    """Whether a frame refused at the frame level still gets a reply to its requestId."""
    if not isinstance(frame, dict) or _malformed(frame):
        return False
    request_id, channel, type_ = (frame.get(k) for k in ("requestId", "channel", "type"))
    return (
        all(isinstance(v, str) and v and not _unencodable(v) for v in (request_id, channel, type_))
        and len(request_id) <= MAX_REQUEST_ID
    )


def refused_at_the_frame(frame: Any) -> bool:
    """Whether the daemon refuses the whole frame before any channel sees it.

    docs/protocol.md, Framing: malformed JSON, an integer outside 64 bits, NaN/Infinity,
    or a lone surrogate in any string (key or value, requestId included) get a failed
    reply when `requestId`, `channel` and `type` are clean text (`replyable`), else an
    error frame; the bad text is never echoed.
    """
    if isinstance(frame, Raw):
        return True
    if isinstance(frame, bool):
        return False
    if isinstance(frame, int):
        return not -(2**63) <= frame < 2**63
    if isinstance(frame, float):
        return not math.isfinite(frame)
    if isinstance(frame, str):
        return _unencodable(frame)
    if isinstance(frame, dict):
        return any(_unencodable(k) or refused_at_the_frame(v) for k, v in frame.items())
    if isinstance(frame, list):
        return any(refused_at_the_frame(v) for v in frame)
    return False


def known_open(channel: str, type_: str, frame: dict[str, Any]) -> str | None:
    """The name of the open defect this frame would hit, if any."""
    if os.environ.get("AETHERD_FUZZ_ALL"):
        return None
    for name, hits in KNOWN_OPEN.items():
        if hits(channel, type_, frame):
            return name
    return None


class Defuse:
    """Make frames that would validate harmless before they reach the daemon."""

    def __init__(self, own_port: int) -> None:
        self.own_port = own_port

    def __call__(self, channel: str, type_: str, frame: dict[str, Any], model: Any) -> None:
        try:
            model.model_validate(frame)
        except ValidationError:
            return
        if (channel, type_) == ("terminal", "create"):
            frame["command"] = "cat"  # never a generated command line
            frame.pop("env", None)  # nor PROMPT_COMMAND, BASH_ENV and friends
        elif (channel, type_) == ("ports", "kill"):
            frame["port"] = self.own_port  # the daemon refuses its own port
        elif (channel, type_) == ("config", "set"):
            config = frame.get("config")
            if isinstance(config, dict):
                for key in ("terminals", "setup", "setupOnBoot", "setup_on_boot"):
                    config.pop(key, None)
            raw = frame.get("raw")
            if isinstance(raw, str):
                lowered = raw.lower()
                if "terminal" in lowered or "setup" in lowered or "command" in lowered:
                    frame["raw"] = "env: {}\n"
                else:
                    try:
                        loaded = yaml.safe_load(raw)
                    except yaml.YAMLError:
                        loaded = None
                    if isinstance(loaded, dict) and any(
                        "terminal" in str(k).lower() or "setup" in str(k).lower() for k in loaded
                    ):
                        frame["raw"] = "env: {}\n"


class ErrorRecords(logging.Handler):
    """Collects ERROR records of the daemon's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("aetherd") or record.name.startswith("aiohttp"):
            self.records.append(record)


@pytest.fixture
def error_records():
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def _describe(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text += f": {type(exc).__name__}: {exc}"
    return text


def _internal(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("code") == "INTERNAL_ERROR"]


class Fuzzer:
    """One connection, reopened if it ever dies (the example that killed it fails)."""

    def __init__(self, running: Any, loop: asyncio.AbstractEventLoop, errors: ErrorRecords):
        self.running = running
        self.loop = loop
        self.errors = errors
        self.client: WsClient | None = None
        self.sent = 0

    async def _client(self) -> WsClient:
        if self.client is None or self.client.ws.closed:
            if self.client is not None:
                await self.client.close()
            self.client = await self.running.connect()
        return self.client

    async def probe(self, client: WsClient) -> None:
        reply = await client.request("terminal", "list", timeout=REPLY_TIMEOUT)
        assert reply["success"] is True, reply

    def _count(self, metric: Any, **labels: str) -> float:
        total = 0.0
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith(("_count", "_total")) and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def _reaches_handler(self, channel: str, type_: str, text: str) -> bool:
        """Whether the daemon will run the handler for this frame (same checks, same model)."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError):
            return False
        request_id = raw.get("requestId")
        if request_id is not None and not (
            isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID
        ):
            return False
        ch = self.running.daemon.registry.channel(channel)
        if ch.require_request_id and request_id is None:
            return False
        try:
            ch.handlers[type_].model.model_validate(raw)
        except ValidationError:
            return False
        return True

    async def check(self, channel: str, type_: str, frame: dict[str, Any]) -> None:
        client = await self._client()
        client.backlog.clear()
        self.errors.records.clear()
        metrics = self.running.daemon.services.metrics
        internal_before = self._count(metrics.errors, code="INTERNAL_ERROR")
        handled_before = self._count(metrics.request_seconds, channel=channel)
        text = encode(frame)
        request_id = frame.get("requestId")
        reaches = self._reaches_handler(channel, type_, text)
        await client.send(text)
        self.sent += 1
        if refused_at_the_frame(frame) and replyable(frame):
            reply = await client.expect(
                lambda f: f.get("requestId") == request_id and "success" in f, REPLY_TIMEOUT
            )
            assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE", reply
            reaches = False
        elif refused_at_the_frame(frame):
            err = await client.expect(
                lambda f: (
                    f.get("channel") == "error"
                    and f.get("code") in ("INVALID_JSON", "INVALID_MESSAGE")
                ),
                REPLY_TIMEOUT,
            )
            reaches = False
        elif isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID:
            reply = await client.expect(
                lambda f: f.get("requestId") == request_id and "success" in f, REPLY_TIMEOUT
            )
            assert reply["channel"] == channel and reply["type"] == type_, reply
            if not reply["success"]:
                assert reply["code"] != "INTERNAL_ERROR", reply
                assert isinstance(reply["error"], str) and reply["error"], reply
        elif request_id is not None:
            err = await client.expect(
                lambda f: f.get("channel") == "error" and f.get("field") == "requestId",
                REPLY_TIMEOUT,
            )
            assert err["code"] == "INVALID_MESSAGE", err
        if reaches:
            # Wait for the handler to finish (concurrent ones may outlive the probe).
            await wait_for(
                lambda: self._count(metrics.request_seconds, channel=channel) > handled_before,
                REPLY_TIMEOUT,
            )
        await self.probe(client)
        assert not _internal(client.backlog), _internal(client.backlog)
        assert not self.errors.records, [_describe(r) for r in self.errors.records]
        assert self._count(metrics.errors, code="INTERNAL_ERROR") == internal_before
        if channel == "terminal":
            await self.close_sessions(client)

    async def close_sessions(self, client: WsClient) -> None:
        reply = await client.request("terminal", "list", timeout=REPLY_TIMEOUT)
        for session in reply["data"]["sessions"]:
            if not session["exited"]:
                await client.request(
                    "terminal", "close", timeout=REPLY_TIMEOUT, sessionId=session["sessionId"]
                )

    def run(self, channel: str, type_: str, frame: dict[str, Any]) -> None:
        future = asyncio.run_coroutine_threadsafe(self.check(channel, type_, frame), self.loop)
        future.result(timeout=4 * REPLY_TIMEOUT)


def _settings() -> Any:
    return settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def _seeded(func: Any) -> Any:
    return func if _SEED == "random" else seed(int(_SEED))(func)


@pytest.fixture
def no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent must never reach a real provider from the fuzzer."""
    for name in (
        "ANTHROPIC_API_KEY",
        "OPENAI_API_KEY",
        "OPENROUTER_API_KEY",
        "ANTHROPIC_BASE_URL",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


async def _start(start_daemon: Any) -> Any:
    return await start_daemon(
        terminal_max_sessions=8,
        anthropic_base_url="http://127.0.0.1:9",
        openai_base_url="http://127.0.0.1:9/v1",
        openrouter_base_url="http://127.0.0.1:9/v1",
        port_scan_interval=60.0,
    )


@pytest.mark.timeout(max(180, EXAMPLES * 3))  # long local runs scale their own bound
@pytest.mark.parametrize(("channel", "type_"), HANDLERS, ids=[f"{c}/{t}" for c, t in HANDLERS])
async def test_every_message_gets_an_answer_and_the_socket_survives(
    start_daemon, error_records, no_provider_keys, channel, type_
):
    running = await _start(start_daemon)
    handler = running.daemon.registry.channel(channel).handlers[type_]
    model = handler.model
    fields = [(info.alias or name) for name, info in model.model_fields.items()]
    defuse = Defuse(running.server.port)
    fuzzer = Fuzzer(running, asyncio.get_running_loop(), error_records)
    bodies = model_strategy(model)

    @_seeded
    @_settings()
    @given(data=st.data())
    def property_(data: st.DataObject) -> None:
        body = data.draw(bodies, label="valid body")
        if data.draw(st.booleans(), label="break it"):
            body = mutate(body, data, fields)
        frame: dict[str, Any] = {**body, "channel": channel, "type": type_}
        request_id = data.draw(
            st.one_of(good_request_ids, bad_request_ids)
            if data.draw(st.integers(0, 9)) == 0
            else good_request_ids,
            label="requestId",
        )
        if request_id is not None:
            frame["requestId"] = request_id
        else:
            frame.pop("requestId", None)
        defuse(channel, type_, frame, model)
        assume(known_open(channel, type_, frame) is None)
        fuzzer.run(channel, type_, frame)

    await asyncio.to_thread(property_)
    assert fuzzer.sent >= EXAMPLES
    client = await fuzzer._client()
    await fuzzer.probe(client)  # the final ping
    assert not error_records.records, [r.getMessage() for r in error_records.records]


@pytest.mark.timeout(max(180, EXAMPLES * 6))
async def test_pipelined_mixes_of_every_channel(start_daemon, error_records, no_provider_keys):
    """Batches of up to 12 frames from any channel, sent without waiting: every usable
    requestId gets its own reply, nothing is INTERNAL_ERROR, the socket survives."""
    running = await _start(start_daemon)
    registry = running.daemon.registry
    defuse = Defuse(running.server.port)
    fuzzer = Fuzzer(running, asyncio.get_running_loop(), error_records)
    models = {(c, t): registry.channel(c).handlers[t].model for c, t in HANDLERS}
    bodies = {key: model_strategy(model) for key, model in models.items()}
    metrics = running.daemon.services.metrics

    async def check(frames: list[dict[str, Any]]) -> None:
        client = await fuzzer._client()
        client.backlog.clear()
        error_records.records.clear()
        internal_before = fuzzer._count(metrics.errors, code="INTERNAL_ERROR")
        handled_before = fuzzer._count(metrics.request_seconds)
        texts = [encode(frame) for frame in frames]
        reaching = sum(
            1
            for frame, text in zip(frames, texts, strict=True)
            if not refused_at_the_frame(frame)
            and fuzzer._reaches_handler(frame["channel"], frame["type"], text)
        )
        for text in texts:
            await client.send(text)
        for frame in frames:
            request_id = frame.get("requestId")
            if refused_at_the_frame(frame) or not isinstance(request_id, str):
                continue
            reply = await client.expect(
                lambda f, r=request_id: f.get("requestId") == r and "success" in f,
                REPLY_TIMEOUT,
            )
            assert reply.get("code") != "INTERNAL_ERROR", reply
        await wait_for(
            lambda: fuzzer._count(metrics.request_seconds) >= handled_before + reaching,
            REPLY_TIMEOUT,
        )
        await fuzzer.probe(client)
        assert not _internal(client.backlog), _internal(client.backlog)
        assert not error_records.records, [_describe(r) for r in error_records.records]
        assert fuzzer._count(metrics.errors, code="INTERNAL_ERROR") == internal_before
        if any(frame["channel"] == "terminal" for frame in frames):
            await fuzzer.close_sessions(client)

    @_seeded
    @_settings()
    @given(data=st.data())
    def property_(data: st.DataObject) -> None:
        count = data.draw(st.integers(1, 12), label="frames")
        frames = []
        for _ in range(count):
            channel, type_ = data.draw(st.sampled_from(HANDLERS), label="handler")
            model = models[(channel, type_)]
            body = data.draw(bodies[(channel, type_)])
            if data.draw(st.integers(0, 3)) == 0:
                fields = [(i.alias or n) for n, i in model.model_fields.items()]
                body = mutate(body, data, fields)
            frame: dict[str, Any] = {**body, "channel": channel, "type": type_}
            if data.draw(st.integers(0, 4)) == 0:
                frame.pop("requestId", None)
            else:
                frame["requestId"] = uuid.uuid4().hex  # unique within the batch
            defuse(channel, type_, frame, model)
            assume(known_open(channel, type_, frame) is None)
            frames.append(frame)
        fuzzer.sent += len(frames)
        future = asyncio.run_coroutine_threadsafe(check(frames), fuzzer.loop)
        future.result(timeout=6 * REPLY_TIMEOUT)

    await asyncio.to_thread(property_)
    client = await fuzzer._client()
    await fuzzer.probe(client)
    assert not error_records.records, [r.getMessage() for r in error_records.records]


async def test_the_registry_is_fuzzed_whole(daemon):
    """Every registered (channel, type) of a running daemon is in the fuzzed list."""
    live = {(name, t) for name, ch in daemon.daemon.registry.channels.items() for t in ch.handlers}
    assert live == set(HANDLERS)
    assert len(HANDLERS) >= 20
