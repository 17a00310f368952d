"""The console's Agent view in a real browser, against a fake Anthropic server
(tests/fake_providers.py): a prompt, streamed text, a tool call that needs approval, the
Approve button, the tool's result, the transcript replayed after a reload; an ask_user
question answered in the page; a stalled task aborted."""

from __future__ import annotations

import asyncio
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


async def test_ask_user_answered_and_a_stalled_task_aborted_from_the_page(
    start_daemon, console_assets, browser, screenshot, anthropic
):
    ask = ToolUse("ask_user", json.dumps({"question": "Which colour?"}))
    anthropic.add(Turn(tools=[ask]), Turn(text=["Blue it is."]))
    running = await start_daemon(
        anthropic_api_key="sk-ant-test",
        anthropic_base_url=anthropic.base_url,
        agent_retry_base_delay=0.01,
        agent_retry_max_delay=0.05,
    )
    page, problems = await open_console(browser, running.url("").rstrip("/"), TOKEN, "agent")
    await page.fill("textarea[aria-label=Prompt]", "pick a colour")
    await page.get_by_role("button", name="Send").click()
    tool = page.locator(f'details.tool[data-tool="{ask.id}"]')
    answer = tool.get_by_role("textbox", name="Your answer")
    await answer.wait_for(timeout=WAIT * 1000)
    assert await tool.locator(".question").inner_text() == "Which colour?"
    await screenshot(page, "question")
    await answer.fill("blue")
    await answer.press("Enter")
    await until(
        page, "() => document.querySelector('.task .done')?.textContent.startsWith('completed')"
    )
    assert await page.locator(".msg.assistant").last.inner_text() == "Blue it is."
    # The model got the answer as the tool's result.
    sent = json.dumps(anthropic.requests[-1]["messages"])
    assert "blue" in sent

    # Abort: a task whose model stream stalls half-way is stopped from the page.
    stall = asyncio.Event()
    anthropic.add(Turn(text=["Thinking about ", "it"], pause_after=4, gate=stall))
    await page.fill("textarea[aria-label=Prompt]", "take your time")
    await page.keyboard.press("Control+Enter")
    abort = page.get_by_role("button", name="Abort")
    await abort.wait_for(timeout=WAIT * 1000)
    await abort.click()
    await until(
        page,
        "() => [...document.querySelectorAll('.task .done')].some(d => d.textContent.startsWith('aborted'))",
    )
    assert await abort.is_hidden()
    stall.set()
    await screenshot(page)
    assert problems.errors == [], problems.errors
