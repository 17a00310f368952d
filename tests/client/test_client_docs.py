"""The examples of docs/client.md run, against a real daemon, so they cannot rot.

Each ```python block is run with `url` and `token` defined: an async block inside an
async function on the test's loop, a `SyncClient` block in a thread (its own loop)."""

from __future__ import annotations

import asyncio
import re
import textwrap

from tests.conftest import TOKEN
from tests.support import REPO

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> list[str]:
    return BLOCK.findall((REPO / "docs" / "client.md").read_text())


def test_the_guide_has_examples() -> None:
    assert len(examples()) >= 4


async def test_every_example_in_the_guide_runs(start_daemon) -> None:
    running = await start_daemon()
    for index, code in enumerate(examples()):
        scope = {"url": running.ws_url, "token": TOKEN}
        if "SyncClient(" in code:
            await asyncio.to_thread(exec, compile(code, f"example-{index}", "exec"), scope)
            continue
        body = "async def _example():\n" + textwrap.indent(code, "    ")
        exec(compile(body, f"example-{index}", "exec"), scope)
        await asyncio.wait_for(scope["_example"](), 30)
