"""The console's Files view in a real browser: the tree follows the disk, a file is edited
and saved (and a conflict is resolved through the prompt), uploaded by drag and drop,
downloaded, and the config is edited with its errors shown at their lines."""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN
from tests.console.conftest import WAIT, open_console, until
from tests.support import wait_for

pytestmark = pytest.mark.slow


def node(path: str) -> str:
    return f'.tree .node[data-path="{path}"]'


async def test_edit_save_conflict_upload_download(
    start_daemon, console_assets, browser, screenshot, workspace, tmp_path
):
    (workspace / "src").mkdir()
    target = workspace / "src" / "hello.py"
    target.write_text("def greet():\n    return 'hi'\n")
    running = await start_daemon()
    page, problems = await open_console(browser, running.url("").rstrip("/"), TOKEN, "files")

    await page.click(node("/src"))
    await page.click(node("/src/hello.py"))
    await until(page, "() => document.querySelector('.cm-content')?.textContent.includes('return')")
    # Syntax highlighting is on: the Python keyword is in its own styled span.
    assert await page.locator(".cm-content span", has_text="def").count() >= 1

    # Edit and save (Ctrl+S): the file changes on disk.
    await page.click(".cm-content")
    await page.keyboard.press("Control+End")
    await page.keyboard.type("\nprint(greet())\n")
    await page.keyboard.press("Control+s")
    await wait_for(lambda: "print(greet())" in target.read_text(), WAIT)
    assert target.read_text().startswith("def greet():\n    return 'hi'\n")

    # The tree follows the disk (files/change events).
    (workspace / "src" / "made-on-disk.txt").write_text("x")
    await page.wait_for_selector(node("/src/made-on-disk.txt"), timeout=WAIT * 1000)
    (workspace / "src" / "made-on-disk.txt").unlink()
    await page.wait_for_selector(
        node("/src/made-on-disk.txt"), state="detached", timeout=WAIT * 1000
    )

    # A conflict: unsaved edits in the page, and the file changes on disk meanwhile.
    await page.click(".cm-content")
    await page.keyboard.press("Control+End")
    await page.keyboard.type("# mine\n")
    target.write_text("theirs\n")
    await page.keyboard.press("Control+s")
    dialog = page.locator("dialog[open]")
    await dialog.wait_for(timeout=WAIT * 1000)
    assert "changed on disk" in await dialog.inner_text()
    await screenshot(page, "conflict")
    await dialog.get_by_role("button", name="Overwrite").click()
    await wait_for(lambda: "# mine" in target.read_text(), WAIT)
    assert "theirs" not in target.read_text()

    # Upload: files dropped on a folder of the tree go into that folder (HTTP PUT).
    transfer = await page.evaluate_handle(
        """() => { const dt = new DataTransfer();
        dt.items.add(new File(['dropped bytes\\n'], 'dropped.txt', {type: 'text/plain'}));
        return dt; }"""
    )
    await page.dispatch_event(node("/src"), "dragover", {"dataTransfer": transfer})
    await page.dispatch_event(node("/src"), "drop", {"dataTransfer": transfer})
    await wait_for(lambda: (workspace / "src" / "dropped.txt").is_file(), WAIT)
    await wait_for(
        lambda: (workspace / "src" / "dropped.txt").read_text() == "dropped bytes\n", WAIT
    )
    await page.wait_for_selector(node("/src/dropped.txt"), timeout=WAIT * 1000)

    # Download (HTTP GET with the token in a header, saved from a blob).
    async with page.expect_download(timeout=WAIT * 1000) as info:
        await page.click("text=Download")
    download = await info.value
    saved = tmp_path / "downloaded.py"
    await download.save_as(saved)
    assert saved.read_text() == target.read_text()
    assert download.suggested_filename == "hello.py"

    await screenshot(page)
    assert problems.errors == [], problems.errors


async def test_config_errors_at_their_lines_then_a_valid_save(
    start_daemon, console_assets, browser, screenshot, workspace
):
    config = workspace / ".aether" / "config.yaml"
    config.parent.mkdir()
    config.write_text("env:\n  GREETING: hello\n")
    running = await start_daemon()
    page, problems = await open_console(browser, running.url("").rstrip("/"), TOKEN, "config")
    await until(
        page,
        "() => document.querySelector('#view-config .cm-content')?.textContent.includes('GREETING')",
    )
    editor = page.locator("#view-config .cm-content")
    await editor.click()
    await page.keyboard.press("Control+a")
    bad = "env:\n  GREETING: hello\nterminals:\n  - name: web\n    command: echo hi\n    autostart: false\n    restart: sometimes\n"
    await page.keyboard.press("Backspace")
    await page.keyboard.insert_text(bad)
    error = page.locator(".config-errors li").first
    await error.wait_for(timeout=WAIT * 1000)
    assert await error.get_attribute("data-line") == "7"
    assert "line 7" in await error.inner_text() and "'on-failure'" in await error.inner_text()
    # The error is also marked on its line in the editor's lint gutter.
    await page.wait_for_selector("#view-config .cm-lint-marker-error", timeout=WAIT * 1000)
    await screenshot(page, "invalid")
    await page.click("#view-config button:has-text('Save')")
    await until(page, "() => document.getElementById('status').textContent.includes('not valid')")
    assert "sometimes" not in config.read_text()  # an invalid config is never written

    await editor.click()
    await page.keyboard.press("Control+a")
    await page.keyboard.press("Backspace")
    await page.keyboard.insert_text(bad.replace("sometimes", "always"))
    await page.wait_for_selector(".config-errors li", state="detached", timeout=WAIT * 1000)
    await page.keyboard.press("Control+s")
    await wait_for(lambda: "restart: always" in config.read_text(), WAIT)
    assert config.read_text() == bad.replace("sometimes", "always")
    await screenshot(page)
    assert problems.errors == [], problems.errors
