"""The console in a real browser: Debian's chromium, driven by selenium through chromium-driver.

What an operator does, end to end against a running gateway: load the console, see the sessions, open
one, watch a line appended to its journal appear live, run an echo turn in the agent pane, and reset the
session through the dialog. A second test does the same behind a token: the prompt, then the WebSocket
with the token offered as a subprotocol.

CI installs chromium, chromium-driver and selenium (.ci/run), so there a missing browser is a failure.
Elsewhere the tests skip when it is missing. Selenium is pointed at /usr/bin/chromedriver explicitly,
so Selenium Manager never tries to download a driver or a browser.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import ROOT, wait_for

CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 15.0  # seconds for anything the page must show; the tail polls every second
SCREENSHOT_SIZE = (1440, 1000)
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size={},{}".format(*SCREENSHOT_SIZE),
)


def chromium_binary() -> str:
    return shutil.which("chromium") or "/usr/bin/chromium"


def require_browser() -> None:
    """Skip (or, in CI, fail) when selenium, chromium or chromium-driver is missing."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install selenium)")
    for path in (chromium_binary(), CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (apt-get install chromium chromium-driver)")
    if not missing:
        return
    message = "the browser test needs " + " and ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium_binary()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(Path(os.environ.get("TMPDIR", "/tmp")) / "ua-console-failure.png"))
        raise AssertionError(f"the console did not show {what} within {timeout} s") from None


def text_of(driver: Any, selector: str) -> str:
    elements = driver.find_elements("css selector", selector)
    return elements[0].text if elements else ""


def page_errors(driver: Any) -> list:
    """Console errors of the page (a CSP violation would show here), not the favicon's absence."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def journal_line(text: str) -> bytes:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return f"[{stamp}] [TEXT] {text}\n".encode()


def make_demo_sessions(gateway: Any) -> None:
    """A few sessions with logs, heartbeats and one archive, with spread-out activity times."""
    now = time.time()
    gateway.make_session("session_20261125_173301_0c2e9b57", {"archive/20261125_180000_000000/run.log": b"old\n"})
    gateway.make_session("nightly-eval", {
        "run.log": b"".join(b"eval case %d: ok\n" % i for i in range(40)),
        "activity_journal.log": b"".join(journal_line(f"case {i} passed") for i in range(12)),
        "heartbeat_state.json": json.dumps({"last_run": now - 7200}).encode(),
    })
    gateway.make_session("session_20261126_084210_b71d04aa", {
        "run.log": b"".join(b"agent INFO step=%d tokens_in=%d\n" % (i, 300 + 7 * i) for i in range(80)),
        "activity_journal.log": b"".join(journal_line(f"step {i}") for i in range(30)),
        "heartbeat_state.json": json.dumps({"last_run": now - 900}).encode(),
        "MEMORY.md": b"# notes\n",
    })
    for age, name in ((86400, "session_20261125_173301_0c2e9b57"), (7200, "nightly-eval"),
                      (900, "session_20261126_084210_b71d04aa")):
        directory = gateway.workspaces / name
        for path in [*directory.rglob("*"), directory]:
            os.utime(path, (now - age, now - age))


def open_console(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_until(driver, lambda d: d.find_elements("css selector", "#sessions-table tbody tr"), "the sessions list")


def open_session(driver: Any, session_id: str) -> None:
    row = f'#sessions-table tbody tr[data-session-id="{session_id}"]'
    wait_until(driver, lambda d: d.find_elements("css selector", row), f"the row of {session_id}")
    driver.find_element("css selector", row).click()
    wait_until(driver, lambda d: text_of(d, "#session-title") == session_id, "the session view")


def run_echo_turn(driver: Any, text: str) -> None:
    driver.find_element("id", "agent-attach").click()
    wait_until(driver, lambda d: d.find_elements("css selector", "#agent-frames .frame-connected"), "the connected frame")
    wait_until(driver, lambda d: d.find_element("id", "agent-run").is_enabled(), "the Run button enabled")
    driver.find_element("id", "agent-input").send_keys(text)
    driver.find_element("id", "agent-run").click()
    wait_until(driver, lambda d: any(text in e.text for e in d.find_elements("css selector", "#agent-frames .frame-text")),
               "the echoed text frame")
    wait_until(driver, lambda d: d.find_elements("css selector", "#agent-frames .frame-query_complete"),
               "query_complete")


def test_operator_follows_a_journal_runs_a_turn_and_resets_the_session(browser, start_gateway, tmp_path):
    gateway = start_gateway()
    make_demo_sessions(gateway)
    session_id = "browser-demo"
    directory = gateway.make_session(session_id, {
        "activity_journal.log": journal_line("first line of the journal"),
        "run.log": b"agent started\n",
    })

    open_console(browser, gateway.url)
    rows = [row.get_attribute("data-session-id") for row in browser.find_elements("css selector", "#sessions-table tbody tr")]
    assert set(rows) >= {session_id, "nightly-eval", "session_20261126_084210_b71d04aa"}

    open_session(browser, session_id)
    journal = "#journal-tail .log-lines"
    wait_until(browser, lambda d: "first line of the journal" in text_of(d, journal), "the journal's tail")
    wait_until(browser, lambda d: "agent started" in text_of(d, "#runlog-tail .log-lines"), "run.log's tail")

    with open(directory / "activity_journal.log", "ab") as log:
        log.write(journal_line("appended while the operator watches"))
    wait_until(browser, lambda d: "appended while the operator watches" in text_of(d, journal), "the appended line, live")

    run_echo_turn(browser, "hello from the browser")
    wait_until(browser, lambda d: "[TEXT] hello from the browser" in text_of(d, journal), "the turn in the journal")
    browser.find_element("id", "agent-disconnect").click()

    browser.find_element("id", "action-reset").click()
    wait_until(browser, lambda d: d.find_element("id", "reset-dialog").get_attribute("open") is not None, "the reset dialog")
    browser.find_element("id", "reset-confirm").click()
    wait_until(browser, lambda d: d.find_element("id", "reset-dialog").get_attribute("open") is None, "the dialog closing")
    wait_until(browser, lambda d: "replaced/truncated" in text_of(d, "#journal-tail .tail-notice"), "the reset notice")
    wait_until(browser, lambda d: text_of(d, "#session-status").startswith("archived"), "the archived status")

    browser.save_screenshot(str(tmp_path / "console.png"))
    details = gateway.get(f"/api/v1/ops/sessions/{session_id}").json
    assert details["session"]["status"] == "archived"
    assert not (directory / "activity_journal.log").exists()
    archived_journal = directory / "archive" / details["archives"][-1] / "activity_journal.log"
    assert b"appended while the operator watches" in archived_journal.read_bytes()
    assert page_errors(browser) == []


def test_new_session_from_the_lobby_is_created_by_its_first_turn_and_opened(browser, start_gateway):
    gateway = start_gateway()
    gateway.make_session("existing-session")

    open_console(browser, gateway.url)
    browser.find_element("id", "agent-new").click()
    wait_until(browser, lambda d: d.find_element("id", "agent-run").is_enabled(), "the Run button enabled")
    browser.find_element("id", "agent-input").send_keys("first turn")
    browser.find_element("id", "agent-run").click()
    wait_until(browser, lambda d: d.find_elements("css selector", "#agent-frames .frame-query_complete"), "query_complete")

    new_id = text_of(browser, "#agent-frames .frame-connected .frame-data")
    assert new_id.startswith("session_") and (gateway.workspaces / new_id).is_dir()
    wait_until(browser, lambda d: text_of(d, "#session-title") == new_id, "the new session opened")
    wait_until(browser, lambda d: d.find_elements("css selector", f'tr[data-session-id="{new_id}"]'), "its row")


def test_token_prompt_then_the_websocket_authenticates_with_the_bearer_subprotocol(browser, start_gateway):
    token = "browser-token-äö/+="  # non-ASCII and base64 specials: the subprotocol must encode it right
    gateway = start_gateway(env={"UA_OPS_TOKEN": token})
    gateway.make_session("token-demo", {"run.log": b"x\n"})

    browser.get(gateway.url + "/")
    wait_until(browser, lambda d: d.find_element("id", "token-dialog").get_attribute("open") is not None, "the token prompt")
    browser.find_element("id", "token-input").send_keys(token)
    browser.find_element("id", "token-save").click()
    open_session(browser, "token-demo")
    run_echo_turn(browser, "authenticated echo")

    assert browser.execute_script("return window.localStorage.length") == 0
    assert browser.execute_script("return window.sessionStorage.getItem('ua-gateway.token')") == token
    assert token not in browser.current_url


def refused_without_token(gateway: Any, token: str) -> int:
    """The 401s the gateway has answered so far, from its own metrics (PROTOCOL.md §14)."""
    for line in gateway.get("/metrics", token=token).body.decode().splitlines():
        if line.startswith("ua_gateway_refused_requests_total{") and 'status="401"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_a_page_load_without_the_token_makes_one_failed_request_before_the_prompt(browser, start_gateway):
    token = "page-load-token"
    gateway = start_gateway(env={"UA_OPS_TOKEN": token})
    gateway.make_session("quiet-demo", {"run.log": b"x\n"})

    browser.get(gateway.url + "/")
    wait_until(browser, lambda d: d.find_element("id", "token-dialog").get_attribute("open") is not None, "the token prompt")
    # The page's other first requests (audit, events) were under way or held back when the prompt opened:
    # give any that were sent a moment to land before counting.
    settled = time.monotonic() + 1.0
    while time.monotonic() < settled:
        assert refused_without_token(gateway, token) <= 1, "the console sent several requests without the token"
        time.sleep(0.1)
    browser.find_element("id", "token-input").send_keys(token)
    browser.find_element("id", "token-save").click()
    wait_until(browser, lambda d: d.find_elements("css selector", 'tr[data-session-id="quiet-demo"]'), "the sessions list")
    assert refused_without_token(gateway, token) == 1


def test_compact_through_the_dialog_keeps_the_tail_and_the_view_says_the_log_was_replaced(browser, start_gateway):
    gateway = start_gateway()
    directory = gateway.make_session("compact-demo", {"run.log": b"".join(b"line %d\n" % i for i in range(100))})

    open_console(browser, gateway.url)
    open_session(browser, "compact-demo")
    wait_until(browser, lambda d: "line 99" in text_of(d, "#runlog-tail .log-lines"), "run.log's tail")
    browser.find_element("id", "action-compact").click()
    max_lines = browser.find_element("id", "compact-max-lines")
    max_lines.clear()
    max_lines.send_keys("10")
    browser.find_element("id", "compact-confirm").click()
    wait_until(browser, lambda d: d.find_element("id", "compact-dialog").get_attribute("open") is None, "the dialog closing")

    assert (directory / "run.log").read_bytes() == b"".join(b"line %d\n" % i for i in range(90, 100))
    wait_until(browser, lambda d: "replaced/truncated" in text_of(d, "#runlog-tail .tail-notice"), "the notice")


def test_a_compressed_archive_is_listed_with_its_sizes_and_opens_in_the_run_log_pane(browser, start_gateway):
    gateway = start_gateway(env={"UA_ARCHIVE_COMPRESS_DELAY": "0"})
    directory = gateway.make_session("archive-demo", {"run.log": b"".join(b"old line %d\n" % i for i in range(100))})
    stamp = gateway.post("/api/v1/ops/sessions/archive-demo/compact", body={"max_lines": 0}).json["archive_path"][8:]
    wait_for(lambda: (directory / "archive" / stamp / "run.log.gz").exists())

    open_console(browser, gateway.url)
    open_session(browser, "archive-demo")
    wait_until(browser, lambda d: "run.log (gzip)" in text_of(d, "#archive-files"), "the archive listed")
    browser.find_element("css selector", "#archive-files tbody button").click()
    wait_until(browser, lambda d: "old line 99" in text_of(d, "#runlog-tail .log-lines"), "the archived lines")
    assert text_of(browser, "#runlog-title") == f"archive/{stamp}/run.log"
    browser.find_element("id", "runlog-live").click()
    wait_until(browser, lambda d: text_of(d, "#runlog-title") == "run.log", "back to the live log")
    assert page_errors(browser) == []


def test_delete_asks_for_the_session_id_before_deleting(browser, start_gateway):
    gateway = start_gateway()
    directory = gateway.make_session("delete-demo", {"run.log": b"x\n"})

    open_console(browser, gateway.url)
    open_session(browser, "delete-demo")
    browser.find_element("id", "action-delete").click()
    confirm_id = browser.find_element("id", "delete-confirm-id")
    confirm_id.send_keys("delete-dem")
    assert not browser.find_element("id", "delete-confirm").is_enabled()
    assert directory.exists()
    confirm_id.send_keys("o")
    browser.find_element("id", "delete-confirm").click()

    wait_until(browser, lambda d: not d.find_elements("css selector", 'tr[data-session-id="delete-demo"]'), "the row gone")
    assert not directory.exists()
    assert browser.find_element("id", "session-view").get_attribute("hidden") is not None


AGENT_ASKING_FOR_INPUT = """\
import json, sys
request = json.loads(sys.stdin.readline())
print(json.dumps({"type": "input_required", "data": {"input_id": "confirm-1", "prompt": "Deploy to staging?"}}), flush=True)
answer = json.loads(sys.stdin.readline())
print(json.dumps({"type": "text", "data": {"text": "answer was " + str(answer["data"]["response"])}}), flush=True)
"""


def test_input_required_is_answered_from_the_agent_pane(browser, start_gateway, tmp_path):
    agent = tmp_path / "asking_agent.py"
    agent.write_text(AGENT_ASKING_FOR_INPUT)
    gateway = start_gateway("--agent-cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(agent))}")
    gateway.make_session("input-demo")

    open_console(browser, gateway.url)
    open_session(browser, "input-demo")
    browser.find_element("id", "agent-attach").click()
    wait_until(browser, lambda d: d.find_element("id", "agent-run").is_enabled(), "the Run button enabled")
    browser.find_element("id", "agent-input").send_keys("deploy")
    browser.find_element("id", "agent-run").click()
    wait_until(browser, lambda d: d.find_element("id", "agent-input-required").is_displayed(), "the input prompt")
    assert text_of(browser, "#agent-input-prompt") == "Deploy to staging?"
    browser.find_element("id", "agent-input-response").send_keys("yes")
    browser.find_element("id", "agent-input-send").click()

    wait_until(browser, lambda d: any("answer was yes" in e.text for e in d.find_elements("css selector", "#agent-frames .frame-text")),
               "the agent's answer")
    wait_until(browser, lambda d: d.find_elements("css selector", "#agent-frames .frame-query_complete"), "query_complete")


SLOW_AGENT = """\
import sys, time
sys.stdin.readline()
print('{"type": "status", "data": {"status": "working"}}', flush=True)
time.sleep(60)
"""


def start_slow_turn(browser, start_gateway, tmp_path, session_id: str):
    """A gateway whose agent takes a minute per turn, with such a turn running in session_id."""
    agent = tmp_path / "slow_agent.py"
    agent.write_text(SLOW_AGENT)
    gateway = start_gateway("--agent-cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(agent))}")
    directory = gateway.make_session(session_id)
    open_console(browser, gateway.url)
    open_session(browser, session_id)
    browser.find_element("id", "agent-attach").click()
    wait_until(browser, lambda d: d.find_element("id", "agent-run").is_enabled(), "the Run button enabled")
    browser.find_element("id", "agent-input").send_keys("take your time")
    browser.find_element("id", "agent-run").click()
    wait_until(browser, lambda d: any("working" in e.text for e in d.find_elements("css selector", "#agent-frames .frame-status")),
               "the turn running")
    return gateway, directory


def test_cancel_button_ends_the_running_turn(browser, start_gateway, tmp_path):
    start_slow_turn(browser, start_gateway, tmp_path, "cancel-demo")

    browser.find_element("id", "agent-cancel").click()

    wait_until(browser, lambda d: d.find_elements("css selector", "#agent-frames .frame-cancelled"), "the cancelled frame")
    wait_until(browser, lambda d: '"completed":false' in text_of(d, "#agent-frames .frame-query_complete"),
               "query_complete, not completed")
    assert browser.find_element("id", "agent-run").is_enabled()


def test_delete_during_a_turn_offers_force_after_the_409(browser, start_gateway, tmp_path):
    gateway, directory = start_slow_turn(browser, start_gateway, tmp_path, "busy-demo")

    browser.find_element("id", "action-delete").click()
    browser.find_element("id", "delete-confirm-id").send_keys("busy-demo")
    browser.find_element("id", "delete-confirm").click()
    wait_until(browser, lambda d: "409" in text_of(d, "#delete-dialog .dialog-error"), "the 409 detail")
    assert directory.exists()
    browser.find_element("id", "delete-force").click()
    browser.find_element("id", "delete-confirm").click()

    wait_until(browser, lambda d: d.find_element("id", "delete-dialog").get_attribute("open") is None, "the dialog closing")
    assert not directory.exists()


@pytest.mark.skipif(os.environ.get("UA_UPDATE_SCREENSHOT") != "1", reason="set UA_UPDATE_SCREENSHOT=1 to rewrite docs/console.png")
def test_write_the_readme_screenshot(browser, start_gateway):
    gateway = start_gateway()
    make_demo_sessions(gateway)
    session_id = "session_20261126_091500_3f9a2c1e"
    kinds = [("STATUS", "processing"), ("THINKING", "the failing test imports a renamed helper"),
             ("TOOL_CALL", 'run_tests {"path": "tests/test_parser.py"}'), ("TOOL_RESULT", "1 failed, 41 passed in 3.1s"),
             ("TEXT", "Renaming parse_header back fixes the import; running the suite again.")]
    directory = gateway.make_session(session_id, {
        "activity_journal.log": b"".join(journal_line(f"{text}") .replace(b"[TEXT]", f"[{kind}]".encode())
                                         for kind, text in kinds * 4),
        "run.log": b"".join(b"2026-11-26T09:15:%02dZ agent INFO step=%d tokens_in=%d tokens_out=%d\n"
                            % (i % 60, i, 1200 + 37 * i, 80 + 11 * i) for i in range(120)),
        "heartbeat_state.json": json.dumps({"last_run": time.time() - 40}).encode(),
        "MEMORY.md": b"# Project notes\n",
    })

    open_console(browser, gateway.url)
    open_session(browser, session_id)
    browser.find_element("id", "agent-attach").click()
    wait_until(browser, lambda d: d.find_elements("css selector", "#agent-frames .frame-connected"), "connected")
    browser.find_element("id", "agent-input").send_keys("Summarise the last test run")
    browser.find_element("id", "agent-run").click()
    wait_until(browser, lambda d: d.find_elements("css selector", "#agent-frames .frame-query_complete"), "query_complete")
    with open(directory / "run.log", "ab") as log:
        log.write(b"2026-11-26T09:17:02Z agent INFO turn finished in 1.8s\n")
    wait_until(browser, lambda d: "turn finished" in text_of(d, "#runlog-tail .log-lines"), "the new run.log line")
    browser.find_element("id", "agent-input").click()
    time.sleep(0.5)
    (ROOT / "docs").mkdir(exist_ok=True)
    browser.save_screenshot(str(ROOT / "docs" / "console.png"))
