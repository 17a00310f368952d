"""A connection queues models (encoded once) or encoded text; a hand-built dict is a bug."""

from __future__ import annotations

import pytest

from aetherd.metrics import Metrics
from aetherd.protocol.ports import PortsClose
from aetherd.transport.connection import Connection


def test_send_encodes_models_and_refuses_dicts(make_settings):
    conn = Connection(None, make_settings(), "c-test", Metrics())  # type: ignore[arg-type]
    conn.send(PortsClose(port=8080))
    conn.send('{"already":"encoded"}')
    assert conn._next_frame() == '{"channel":"ports","type":"close","port":8080}'
    assert conn._next_frame() == '{"already":"encoded"}'
    with pytest.raises(TypeError, match="Frame model"):
        conn.send({"channel": "ports", "type": "close", "port": 8080})  # type: ignore[arg-type]
    assert conn._next_frame() is None
