"""Browser fixtures: one headless Debian chromium per session (fresh profile) and a tab per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.ui.browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, require_browser


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Playwright driving /usr/bin/chromium (never `playwright install`) with a fresh user data dir."""
    require_browser()
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A new tab that records JavaScript errors; the test fails if any were thrown."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text)
           if msg.type == "error" and "status of 401" not in msg.text else None)
    tab.set_default_timeout(TIMEOUT_MS)
    yield tab
    tab.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
