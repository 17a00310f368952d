"""The agent's parts, each alone, with real objects: the queue, the pending book, the
defaults, the event log and the tool executor (real tools, real jail, real SQLite)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from aetherd.agent.defaults import Defaults, provider_config
from aetherd.agent.events import (
    ContentPiece,
    EventLog,
    PermissionRequest,
    Recorded,
    TaskDone,
    TaskStatus,
    ToolInvocation,
    ToolResult,
)
from aetherd.agent.executor import Progress, ToolExecutor
from aetherd.agent.pending import Decision, PendingBook
from aetherd.agent.queue import Job, TaskQueue
from aetherd.agent.runner import AgentRunner
from aetherd.agent.tools import ToolLimits, Tools
from aetherd.errors import AetherError
from aetherd.services.jail import Jail
from aetherd.services.transcript import TranscriptStore


@pytest.fixture
async def store(tmp_path):
    store = TranscriptStore(tmp_path / "agent.sqlite3")
    await store.start()
    yield store
    await store.stop()


def job(task_id: str) -> Job:
    return Job(task_id, "p", "openai", "m", "full")


# -- the queue ---------------------------------------------------------------------------


async def test_queue_runs_jobs_one_at_a_time_in_order():
    log: list[str] = []
    gates = {name: asyncio.Event() for name in "abc"}

    async def run(j: Job) -> None:
        log.append(f"start {j.task_id}")
        await gates[j.task_id].wait()
        log.append(f"end {j.task_id}")

    queue = TaskQueue(run, max_queued=5)
    queue.start()
    try:
        for name in "abc":
            queue.put(job(name))
        for _ in range(100):
            if log:
                break
            await asyncio.sleep(0.01)
        assert log == ["start a"] and queue.running_count() == 1 and queue.queued_count() == 2
        assert "b" in queue and queue.get("b") is not None
        for name in "abc":
            gates[name].set()
            await asyncio.wait_for(queue.get(name).finished.wait(), 5)  # type: ignore[union-attr]
        assert log == ["start a", "end a", "start b", "end b", "start c", "end c"]
        assert queue.running_count() == 0 and queue.queued_count() == 0 and "a" not in queue
    finally:
        await queue.stop()


async def test_queue_refuses_a_taken_id_and_a_full_queue_and_removes_queued_jobs():
    started = asyncio.Event()
    hold = asyncio.Event()

    async def run(j: Job) -> None:
        started.set()
        await hold.wait()

    queue = TaskQueue(run, max_queued=1)
    queue.start()
    try:
        queue.put(job("a"))
        await asyncio.wait_for(started.wait(), 5)
        queue.check_room("b")
        queue.put(job("b"))
        with pytest.raises(AetherError) as info:
            queue.check_room("a")
        assert info.value.code.value == "CONFLICT"
        with pytest.raises(AetherError) as info:
            queue.check_room("c")
        assert info.value.code.value == "LIMIT_EXCEEDED"
        b = queue.get("b")
        assert b is not None and queue.remove_queued(b) and "b" not in queue
        a = queue.get("a")
        assert a is not None and not queue.remove_queued(a)  # running: not in the queue
        await queue.cancel_running(a, 5)
        assert a.finished.is_set() and a.runner is not None and a.runner.cancelled()
    finally:
        await queue.stop()


async def test_queue_stop_cancels_the_running_job_and_the_worker():
    cancelled = asyncio.Event()

    async def run(j: Job) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    queue = TaskQueue(run, max_queued=3)
    queue.start()
    running = job("a")
    queue.put(running)
    for _ in range(100):
        if queue.current is not None:
            break
        await asyncio.sleep(0.01)
    await queue.stop(timeout=5)
    assert cancelled.is_set() and running.finished.is_set()
    assert queue._worker is not None and queue._worker.done()


# -- the pending book ---------------------------------------------------------------------


def asked(seq: int, task_id: str = "t") -> Recorded:
    return Recorded(task_id, seq, "now", TaskStatus("awaiting_input"))


async def test_pending_approvals_and_questions_are_answerable_once():
    book = PendingBook()
    approval = book.approval("r1", "c1", asked(5))
    question = book.question("c2", asked(3, "t2"))
    assert [r.seq for r in book.events()] == [3, 5]  # oldest first
    waiter = asyncio.ensure_future(book.wait(approval))
    assert book.decide("r1", False, "no").task_id == "t"
    assert await asyncio.wait_for(waiter, 5) == Decision(False, "no")
    with pytest.raises(AetherError) as info:
        book.decide("r1", True)
    assert info.value.code.value == "NOT_FOUND"
    with pytest.raises(AetherError):
        book.answer("r1", "x")  # a request id is not a question id
    assert book.answer("c2", "yes").task_id == "t2"
    assert await book.wait(question) == "yes"
    assert book.events() == [] and book.approvals == {} and book.questions == {}


async def test_a_cancelled_wait_forgets_the_request():
    book = PendingBook()
    waiting = book.approval("r1", "c1", asked(1))
    waiter = asyncio.ensure_future(book.wait(waiting))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert book.events() == []
    with pytest.raises(AetherError):
        book.decide("r1", True)


# -- the defaults ---------------------------------------------------------------------


async def test_defaults_client_over_config_over_daemon_persisted(make_settings, store):
    settings = make_settings(agent_provider="anthropic")
    defaults = Defaults(settings, store)
    await defaults.load()
    base = defaults.in_force()
    assert base.provider == "anthropic" and base.permission_mode == settings.agent_permission_mode
    defaults.apply_config({"provider": "openai", "model": "cfg-m", "permission_mode": "bogus"})
    now = defaults.in_force()
    assert (now.provider, now.model, now.permission_mode) == (
        "openai",
        "cfg-m",
        settings.agent_permission_mode,  # an invalid config value is ignored
    )
    now = await defaults.update("openrouter", None, "full")
    assert now.provider == "openrouter" and now.model != "cfg-m" and now.permission_mode == "full"
    for args, field in (
        (("nope", None, None), "provider"),
        ((None, "", None), "model"),
        ((None, None, "never"), "permissionMode"),
    ):
        with pytest.raises(AetherError) as info:
            await defaults.update(*args)
        assert info.value.code.value == "INVALID_MESSAGE" and info.value.extra["field"] == field
    again = Defaults(settings, store)
    await again.load()
    assert again.in_force().provider == "openrouter"  # persisted


def test_provider_config_names_the_missing_variable(make_settings):
    settings = make_settings()
    with pytest.raises(AetherError) as info:
        provider_config(settings, {}, "anthropic", "m")
    assert info.value.code.value == "PROVIDER_NOT_CONFIGURED"
    assert info.value.extra["variable"] == "ANTHROPIC_API_KEY"
    config = provider_config(
        settings, {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://x"}, "openai", "m"
    )
    assert (config.api_key, config.base_url, config.thinking_budget) == ("k", "http://x", 0)


# -- the event log ---------------------------------------------------------------------


async def test_event_log_stores_the_payload_and_fans_out(store):
    events = EventLog(store)
    seen: list[Recorded] = []
    remove = events.subscribe(seen.append)
    first = events.emit("t", TaskStatus("queued", "hi"))
    events.emit("t", ContentPiece("thinking", "m1", "hmm"))
    remove()
    events.emit("t", ToolResult("c", "bash", "boom", True))
    assert [r.seq for r in seen] == [1, 2] and seen[0] is first
    await events.finish("t", "failed", "bad", "PROVIDER_ERROR", {"input_tokens": 3})
    assert events.finished == {"failed": 1}
    stored, latest, _ = await store.history(limit=10, max_bytes=1 << 20)
    assert latest == 5
    assert [r.record() for r in seen] == stored[:2]
    assert stored[2]["error"] == "boom" and "result" not in stored[2]
    assert stored[4] == {
        "type": "done",
        "taskId": "t",
        "seq": 5,
        "createdAt": stored[4]["createdAt"],
        "status": "failed",
        "usage": {"inputTokens": 3, "outputTokens": 0},
        "error": "bad",
        "code": "PROVIDER_ERROR",
    }


def test_event_payloads_are_the_stored_form():
    # These objects are what the transcript holds; their keys and order must not change.
    assert json.dumps(TaskStatus("running").payload()) == '{"status": "running"}'
    assert list(ToolInvocation("c", "bash", {"a": 1}, "running", "out").payload()) == [
        "toolCallId",
        "name",
        "input",
        "status",
        "progress",
    ]
    assert list(PermissionRequest("r", "c", "bash", {}, "d").payload()) == [
        "requestId",
        "toolCallId",
        "name",
        "input",
        "description",
    ]
    assert ToolResult("c", "read_file", "x", False).payload() == {
        "toolCallId": "c",
        "name": "read_file",
        "isError": False,
        "result": "x",
    }
    assert TaskDone("completed").payload() == {
        "status": "completed",
        "usage": {"inputTokens": 0, "outputTokens": 0},
    }


# -- the executor ---------------------------------------------------------------------


@pytest.fixture
async def executor(store, workspace):
    tools = Tools(Jail(workspace), ToolLimits(timeout=5, output_max=1000, max_results=50))
    events = EventLog(store)
    seen: list[Recorded] = []
    events.subscribe(seen.append)
    book = PendingBook()
    run = ToolExecutor(events, book, tools, timeout=5, progress_interval=0.01, progress_max=1000)
    return run, book, seen


async def test_executor_runs_a_tool_and_reports_bad_calls(executor, workspace, store):
    run, _, seen = executor
    await store.create_task("t", "p", "openai", "m", "running")
    call = {"id": "c1", "name": "write_file", "arguments": '{"path": "a.txt", "content": "hi"}'}
    result = await run.call("t", "full", call)
    assert (workspace / "a.txt").read_text() == "hi"
    assert result["id"] == "c1" and not result["is_error"] and call["input"]["path"] == "a.txt"
    assert [(r.type, getattr(r.event, "status", None)) for r in seen] == [
        ("tool_invocation", "running"),
        ("tool_result", None),
    ]
    bad = await run.call("t", "full", {"name": "nope", "arguments": "{"})
    assert bad["is_error"] and "not valid JSON" in bad["content"] and bad["id"]
    unknown = await run.call("t", "full", {"id": "c3", "name": "nope", "arguments": "{}"})
    assert unknown["is_error"] and "there is no tool 'nope'" in unknown["content"]
    missing = await run.call(
        "t", "full", {"id": "c4", "name": "read_file", "arguments": '{"path": "zz"}'}
    )
    assert missing["is_error"] and "does not exist" in missing["content"]


async def test_executor_waits_for_approval_and_is_answerable_at_once(executor, workspace, store):
    run, book, seen = executor
    await store.create_task("t", "p", "openai", "m", "running")
    call = {"id": "c1", "name": "write_file", "arguments": '{"path": "b.txt", "content": "x"}'}
    pending = asyncio.ensure_future(run.call("t", "ask", call))
    for _ in range(200):
        if book.approvals:
            break
        await asyncio.sleep(0.01)
    (request_id,) = book.approvals
    assert [r.type for r in book.events()] == ["permission_request"]
    book.decide(request_id, False, "not now")
    result = await asyncio.wait_for(pending, 5)
    assert result["is_error"] and result["content"] == "the user rejected this tool call: not now"
    assert not (workspace / "b.txt").exists()
    statuses = [r.event.status for r in seen if r.type == "status"]  # type: ignore[attr-defined]
    assert statuses == ["awaiting_input", "running"]
    assert (await store.get_task("t"))["status"] == "running"

    question = asyncio.ensure_future(
        run.call("t", "full", {"id": "q1", "name": "ask_user", "arguments": '{"question": "?"}'})
    )
    for _ in range(200):
        if book.questions:
            break
        await asyncio.sleep(0.01)
    book.answer("q1", "blue")
    answer = await asyncio.wait_for(question, 5)
    assert answer == {"id": "q1", "name": "ask_user", "content": "blue", "is_error": False}


async def test_progress_coalesces_and_caps():
    pieces: list[str] = []
    progress = Progress(pieces.append, interval=60, budget=5)
    progress.add("ab")
    progress.add("cd")
    progress.add("efgh")
    progress.add("ij")
    progress.close()
    assert pieces == ["abcde"]


# -- the runner's own checks -------------------------------------------------------------


async def test_prompt_with_unencodable_text_is_a_clean_error(make_settings, store, workspace):
    runner = AgentRunner(make_settings(), Jail(workspace), store, environ={})
    await runner.start()
    try:
        for prompt, task_id, field in (("a\ud800", None, "prompt"), ("ok", "t\udfff", "taskId")):
            with pytest.raises(AetherError) as info:
                await runner.prompt(prompt, task_id)
            assert info.value.code.value == "INVALID_MESSAGE" and info.value.extra["field"] == field
        assert store.latest_seq == 0  # nothing was recorded
        with pytest.raises(AetherError) as info:
            await runner.abort("t\ud800")
        assert info.value.code.value == "INVALID_MESSAGE"
        page = await runner.history(before_seq=2**80)
        assert page.events == [] and page.latest_seq == 0
    finally:
        await runner.stop()


async def test_abort_of_a_task_whose_end_is_being_recorded_is_a_conflict(
    make_settings, store, workspace
):
    """A task past the point of no return (its `done` is being recorded) has ended: an
    abort then is answered as for any ended task, never with a false "aborted"."""
    runner = AgentRunner(make_settings(), Jail(workspace), store, environ={})
    await runner.start()
    try:
        await store.create_task("t1", "hi", None, None, "running")
        job = Job("t1", "hi", "anthropic", "m", "auto", finishing=True)
        runner.queue._jobs["t1"] = job  # as the queue holds a running job

        async def record_the_end() -> None:
            await runner.events.finish("t1", "completed", None, None, {})
            runner.queue._jobs.pop("t1", None)
            job.finished.set()

        ending = asyncio.create_task(record_the_end())
        with pytest.raises(AetherError) as info:
            await runner.abort("t1")
        await ending
        assert info.value.code.value == "CONFLICT" and "completed" in info.value.message
        assert not job.aborted
    finally:
        await runner.stop()


# -- the turn loop and the provider skeleton, against a fake provider on loopback ----------


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_turn_loop_runs_a_job_to_done_over_both_dialects(
    kind, make_settings, store, workspace
):
    from aetherd.agent.providers import ProviderConfig, stream_turn
    from aetherd.agent.turn import TurnLoop
    from tests.fake_providers import FakeProvider, ToolUse, Turn

    provider = await FakeProvider(kind).start()
    session = aiohttp.ClientSession()
    try:
        config = ProviderConfig(kind, provider.base_url, "k", "m", retry_base_delay=0.01)
        # The skeleton alone: pieces, then one TurnEnd with the blocks.
        provider.add(Turn(text=["he", "llo"], input_tokens=7, output_tokens=2))
        items = [
            i
            async for i in stream_turn(session, config, "sys", [{"role": "user", "text": "hi"}], [])
        ]
        assert [i.content for i in items[:-1]] == ["he", "llo"]
        end = items[-1]
        assert end.blocks[-1] == {"type": "text", "text": "hello"}
        assert (end.input_tokens, end.output_tokens) == (7, 2)

        # The turn loop: a tool call, its result sent back, then the answer.
        tools = Tools(Jail(workspace), ToolLimits(timeout=5, output_max=1000, max_results=50))
        events = EventLog(store)
        seen: list[Recorded] = []
        events.subscribe(seen.append)
        executor = ToolExecutor(
            events, PendingBook(), tools, timeout=5, progress_interval=0.01, progress_max=100
        )
        loop = TurnLoop(
            make_settings(), store, events, executor, lambda p, m: config, lambda: session
        )
        write = ToolUse("write_file", json.dumps({"path": "out.txt", "content": "done"}))
        provider.add(Turn(tools=[write]), Turn(text=["all ", "done"]))
        await store.create_task("t1", "write it", kind, "m", "queued")
        task = Job("t1", "write it", kind, "m", "full")
        await loop.run(task)
        assert (workspace / "out.txt").read_text() == "done"
        types = [r.type for r in seen]
        assert types[0] == "status" and types[-2:] == ["status", "done"]
        assert "tool_invocation" in types and "tool_result" in types and "text" in types
        done = seen[-1].record()
        assert done["status"] == "completed" and done["usage"]["inputTokens"] == 20
        row = await store.get_task("t1")
        assert row["status"] == "completed" and row["final_text"] == "all done"
        assert loop.stats.by_provider[kind]["requests"] == 2
    finally:
        await session.close()
        await provider.close()
