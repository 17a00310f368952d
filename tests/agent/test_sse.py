"""The SSE parser against splits at every byte offset."""

from __future__ import annotations

from aetherd.agent.sse import SSEParser

STREAM = (
    'event: message_start\r\ndata: {"a": "héllo ✓"}\r\n\r\n'
    ": a comment\n"
    "event: ping\ndata: {}\n\n"
    "data: line one\ndata: line two\n\n"
    "data:no-space\r\r"
    "event: tail\ndata: [DONE]"
).encode()


def parse(chunks):
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.finish())
    return [(e.event, e.data) for e in events]


EXPECTED = [
    ("message_start", '{"a": "héllo ✓"}'),
    ("ping", "{}"),
    ("message", "line one\nline two"),
    ("message", "no-space"),
    ("tail", "[DONE]"),
]


def test_whole_stream():
    assert parse([STREAM]) == EXPECTED


def test_every_split_point_and_byte_by_byte():
    for cut in range(1, len(STREAM)):
        assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED
