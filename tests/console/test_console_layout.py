"""The console at a phone's width, in the dark and light themes, driven by the keyboard."""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN
from tests.console.conftest import open_console, until

pytestmark = pytest.mark.slow

NO_OVERFLOW = "() => document.documentElement.scrollWidth <= window.innerWidth"


async def test_phone_width_themes_and_keyboard(start_daemon, console_assets, browser, screenshot):
    running = await start_daemon()
    page, problems = await open_console(
        browser,
        running.url("").rstrip("/"),
        TOKEN,
        viewport={"width": 390, "height": 760},
        color_scheme="dark",
        has_touch=True,
    )
    # The system's dark preference is followed until the user picks a theme.
    assert await page.evaluate("document.documentElement.dataset.theme") == "dark"
    dark_bg = await page.evaluate("getComputedStyle(document.body).backgroundColor")

    await until(page, "() => window.aetherdConsole.terminalIds().length === 1")
    # Keyboard: Tab reaches the view tabs; the arrow keys move between views.
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    for _ in range(10):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.id") == "tab-terminals":
            break
    assert await page.evaluate("document.activeElement.id") == "tab-terminals"
    for view in ("files", "agent", "ports", "config"):
        await page.keyboard.press("ArrowRight")
        assert await page.evaluate("document.activeElement.id") == f"tab-{view}"
        assert await page.locator(f"#view-{view}").is_visible()
        assert await page.get_attribute(f"#tab-{view}", "aria-selected") == "true"
        # Nothing is wider than a phone's screen.
        assert await page.evaluate(NO_OVERFLOW), view
        await screenshot(page, f"phone-{view}")
    await page.keyboard.press("ArrowRight")  # wraps around
    assert await page.evaluate("document.activeElement.id") == "tab-terminals"
    assert await page.evaluate(NO_OVERFLOW)

    # The theme button cycles auto → dark → light; the choice is remembered.
    await page.click("#theme")
    await page.click("#theme")
    assert await page.evaluate("document.documentElement.dataset.theme") == "light"
    assert await page.evaluate("getComputedStyle(document.body).backgroundColor") != dark_bg
    assert await page.evaluate("localStorage.getItem('aetherd.theme')") == "light"
    await screenshot(page, "phone-light")
    assert problems.errors == [], problems.errors
