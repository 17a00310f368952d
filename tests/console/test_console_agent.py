"""The console's Agent view in a real browser, against a fake Anthropic server
(tests/fake_providers.py): a prompt, streamed text, a tool call that needs approval, the
Approve button, the tool's result, and the transcript replayed after a reload."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TOKEN
from tests.console.conftest import WAIT, open_console, until
from tests.fake_providers import FakeProvider, ToolUse, Turn
from tests.support import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
async def anthropic():
    provider = await FakeProvider("anthropic").start()
    yield provider
    await provider.close()


async def test_prompt_approve_a_tool_call_and_replay(
    start_daemon, console_assets, browser, screenshot, workspace, anthropic
):
    write = ToolUse("bash", json.dumps({"command": "echo approved > ran.txt"}))
    anthropic.add(
        Turn(text=["Let me ", "write the file."], tools=[write]),
        Turn(text=["The file ", "is written."]),
    )
    running = await start_daemon(
        anthropic_api_key="sk-ant-test",
        anthropic_base_url=anthropic.base_url,
        agent_permission_mode="ask",
        agent_retry_base_delay=0.01,
        agent_retry_max_delay=0.05,
    )
    page, problems = await open_console(browser, running.url("").rstrip("/"), TOKEN, "agent")
    await page.fill("textarea[aria-label=Prompt]", "write ran.txt please")
    await page.keyboard.press("Control+Enter")

    tool = page.locator(f'details.tool[data-tool="{write.id}"]')
    approve = tool.get_by_role("button", name="Approve")
    await approve.wait_for(timeout=WAIT * 1000)
    assert await tool.get_attribute("open") is not None  # opened to ask
    assert "echo approved > ran.txt" in await tool.locator("pre.input").inner_text()
    assert await page.locator(".msg.user").inner_text() == "write ran.txt please"
    assert await page.locator(".msg.assistant").first.inner_text() == "Let me write the file."
    assert not (workspace / "ran.txt").exists()  # nothing runs before approval
    assert await page.get_by_role("button", name="Abort").is_visible()
    await screenshot(page, "approval")

    await approve.click()
    await wait_for(lambda: (workspace / "ran.txt").is_file(), WAIT)
    await until(
        page, "() => document.querySelector('.task .done')?.textContent.startsWith('completed')"
    )
    assert await page.locator(".msg.assistant").nth(1).inner_text() == "The file is written."
    assert await tool.get_attribute("data-status") == "done"
    await tool.locator("summary").click()  # tool calls collapse
    assert await tool.get_attribute("open") is None
    assert await page.get_by_role("button", name="Abort").is_hidden()
    await screenshot(page)

    # Reload: the transcript comes back from the daemon's history, text merged per message.
    await page.reload()
    await until(page, "() => window.aetherdConsole && window.aetherdConsole.state() === 'open'")
    await page.click("#tab-agent")
    await until(page, "() => document.querySelectorAll('.msg.assistant').length === 2")
    texts = await page.locator(".msg.assistant").all_inner_texts()
    assert texts == ["Let me write the file.", "The file is written."]
    assert await page.locator(".msg.user").inner_text() == "write ran.txt please"
    assert await page.get_by_role("button", name="Approve").count() == 0  # answered already
    assert problems.errors == [], problems.errors
