"""The console's live views in a real browser (PROTOCOL.md §13): a followed log streams over fetch()
instead of polling, the sessions table follows the events stream, and a page without ReadableStream
still works by polling.

Requests are counted on the server side, from the gateway's own access records in
``_gateway/gateway.log``: a streamed follow is one request (recorded when it ends), a polled one is a
request per second.
"""

from __future__ import annotations

import json
import time
from typing import Any, List

from conftest import wait_for
from test_browser import browser, journal_line, open_console, open_session, text_of, wait_until  # noqa: F401

JOURNAL = "#journal-tail .log-lines"
POLL_MS = 1.0  # the console's TAIL_POLL_MS: a polling page asks again at least this often
LIVE_WAIT = 3.0  # seconds a streamed change may take to show (its list timer is 5 s, its poll 1 s)


def access_paths(gateway: Any) -> List[str]:
    """The path of every request the gateway has recorded so far, oldest first."""
    log = gateway.workspaces / "_gateway" / "gateway.log"
    paths = []
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line)
        if record.get("event") == "access" and record.get("method") == "GET":
            paths.append(record.get("path"))
    return paths


def requests_to(gateway: Any, path: str) -> int:
    return access_paths(gateway).count(path)


def without_readable_stream(driver: Any) -> None:
    """Every page this driver loads from now on lacks ReadableStream, as an old browser would."""
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.ReadableStream;"})


def test_a_line_appended_to_a_followed_journal_appears_without_polling(browser, start_gateway):  # noqa: F811
    gateway = start_gateway()
    directory = gateway.make_session("live-journal", {"activity_journal.log": journal_line("before the page")})
    open_console(browser, gateway.url)
    open_session(browser, "live-journal")
    wait_until(browser, lambda d: "before the page" in text_of(d, JOURNAL), "the journal's first slice")
    opened = time.monotonic()

    with open(directory / "activity_journal.log", "ab") as log:
        log.write(journal_line("pushed to the page"))
    wait_until(browser, lambda d: "pushed to the page" in text_of(d, JOURNAL), "the appended line", timeout=LIVE_WAIT)
    # Watch a while longer than a polling page needs for two more requests, then count them.
    wait_until(browser, lambda d: time.monotonic() - opened > 2.5 * POLL_MS, "time passing")
    with open(directory / "activity_journal.log", "ab") as log:
        log.write(journal_line("and another"))
    wait_until(browser, lambda d: "and another" in text_of(d, JOURNAL), "the second line", timeout=LIVE_WAIT)
    assert requests_to(gateway, "/api/v1/ops/sessions/live-journal/preview") == 0  # the open stream is not recorded yet
    assert text_of(browser, JOURNAL).count("pushed to the page") == 1


def test_a_session_another_client_creates_appears_in_the_table_without_listing_again(browser, start_gateway):  # noqa: F811
    gateway = start_gateway()
    gateway.make_session("already-there")
    open_console(browser, gateway.url)
    assert wait_for(lambda: requests_to(gateway, "/api/v1/ops/sessions") >= 1)
    listed = requests_to(gateway, "/api/v1/ops/sessions")

    created = gateway.post("/api/v1/sessions", {"session_id": "made-elsewhere"})
    assert created.status in (200, 201), created.body
    row = '#sessions-table tbody tr[data-session-id="made-elsewhere"]'
    wait_until(browser, lambda d: d.find_elements("css selector", row), "the new session's row", timeout=LIVE_WAIT)
    assert requests_to(gateway, "/api/v1/ops/sessions") == listed

    gateway.delete("/api/v1/ops/sessions/made-elsewhere?confirm=true")
    wait_until(browser, lambda d: not d.find_elements("css selector", row), "the row gone", timeout=LIVE_WAIT)


def test_a_page_without_readable_stream_follows_by_polling(browser, start_gateway):  # noqa: F811
    gateway = start_gateway()
    directory = gateway.make_session("polled-journal", {"activity_journal.log": journal_line("first")})
    without_readable_stream(browser)
    open_console(browser, gateway.url)
    open_session(browser, "polled-journal")
    wait_until(browser, lambda d: "first" in text_of(d, JOURNAL), "the journal's first slice")

    with open(directory / "activity_journal.log", "ab") as log:
        log.write(journal_line("found by a poll"))
    wait_until(browser, lambda d: "found by a poll" in text_of(d, JOURNAL), "the appended line")
    assert wait_for(lambda: requests_to(gateway, "/api/v1/ops/sessions/polled-journal/preview") >= 2)
    assert text_of(browser, "#journal-tail .tail-state").startswith("polling")  # the operator is told


def test_a_follow_answered_without_an_event_stream_falls_back_to_polling(browser, start_gateway):  # noqa: F811
    gateway = start_gateway()
    directory = gateway.make_session("proxied-journal", {"activity_journal.log": journal_line("first")})
    # As a proxy that buffers (or a gateway without streams) would: a follow gets a plain JSON answer.
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.followsAsked = 0;
        const realFetch = window.fetch;
        window.fetch = function (url, options) {
          if (String(url).indexOf('follow=true') < 0) return realFetch(url, options);
          window.followsAsked += 1;
          return Promise.resolve(new Response('{}', { headers: { 'Content-Type': 'application/json' } }));
        };"""})
    open_console(browser, gateway.url)
    open_session(browser, "proxied-journal")
    wait_until(browser, lambda d: "first" in text_of(d, JOURNAL), "the journal's first slice")
    with open(directory / "activity_journal.log", "ab") as log:
        log.write(journal_line("found by a poll"))
    wait_until(browser, lambda d: "found by a poll" in text_of(d, JOURNAL), "the appended line")
    assert browser.execute_script("return window.followsAsked") >= 1  # it tried to stream first
    assert text_of(browser, "#journal-tail .tail-state").startswith("polling")
