"""Web pages as an operator's browser shows them: Debian's ``chromium``, headless.

The Prefect UI is a single-page application: its HTML is an empty shell that scripts fill in
from the API. ``--virtual-time-budget`` lets those scripts run (and their requests answer)
for that many milliseconds of the page's own clock before the DOM is dumped or the screenshot taken.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

INSTALL_HINT = "apt-get install chromium"
RUN_TIMEOUT = 45.0
"""Seconds one render may take: a cold start of Chromium alone takes ~5 s on a busy 2-core machine."""
ATTEMPTS = 2
"""On a loaded machine a headless Chromium now and then never finishes a page: the second try does."""
BUDGET_MS = 3000


class ChromiumError(RuntimeError):
    """Chromium is not installed, or it failed to render a page; the message says which, and why."""


def rendered_text(url: str, budget_ms: int = BUDGET_MS) -> str:
    """The text of the page at ``url`` once its scripts ran: what a reader sees, whitespace collapsed."""
    return _visible_text(_chromium(url, budget_ms, "--dump-dom"))


def screenshot(url: str, output: Path, width: int = 1400, height: int = 900, budget_ms: int = BUDGET_MS) -> None:
    """Save a PNG of the page at ``url`` as a ``width`` x ``height`` browser window shows it."""
    _chromium(url, budget_ms, f"--screenshot={output}", f"--window-size={width},{height}")
    if not output.is_file():
        raise ChromiumError(f"chromium wrote no screenshot of {url} to {output}")


def _chromium(url: str, budget_ms: int, *arguments: str) -> str:
    binary = shutil.which("chromium")
    if binary is None:
        raise ChromiumError(f"no chromium on PATH ({INSTALL_HINT})")
    for _ in range(ATTEMPTS - 1):
        try:
            return _run_chromium(binary, url, budget_ms, *arguments)
        except _TimedOut:
            pass
    try:
        return _run_chromium(binary, url, budget_ms, *arguments)
    except _TimedOut:
        raise ChromiumError(f"chromium did not render {url} within {RUN_TIMEOUT:.0f} s, "
                            f"{ATTEMPTS} times") from None


def _run_chromium(binary: str, url: str, budget_ms: int, *arguments: str) -> str:
    # A profile of its own: two Chromiums rendering at once must not share one.
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *arguments, url]
        # A session of its own, so that its renderer and helper processes go down with it on a timeout.
        browser = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            output, errors = browser.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
            raise _TimedOut from None
    if browser.returncode != 0:
        raise ChromiumError(f"chromium exited with code {browser.returncode} rendering {url}:\n{errors[-2000:]}")
    return output


class _TimedOut(Exception):
    """One Chromium run took longer than RUN_TIMEOUT."""


def _visible_text(html: str) -> str:
    reader = _TextReader()
    reader.feed(html)
    reader.close()
    return " ".join(" ".join(reader.parts).split())


class _TextReader(HTMLParser):
    """Collects the text of a document, leaving out what a browser does not show as text."""

    _HIDDEN = frozenset({"script", "style", "noscript", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden_depth:
            self._hidden_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)
