"""Autobahn|Testsuite's fuzzing client against the gateway's WS /ws/echo; one command, loopback only.

    python3 tests/soak/autobahn.py --wstest /tmp/autobahn-py27

starts ``ua_gateway.py --ws-echo --port 0`` in a temporary directory, runs ``wstest -m fuzzingclient``
against ``ws://127.0.0.1:PORT/ws/echo`` (cases 9.*, 12.* and 13.* excluded by default, as in issue 3's
reference measurement of bare websockets: 231 OK, 12 NON-STRICT, 1 FAILED, 3 INFORMATIONAL), then
prints the OK / NON-STRICT / INFORMATIONAL / FAILED counts and every case that is not plainly OK, with
the close code and reason the gateway sent. Exit status: 0 when no case FAILED (or UNIMPLEMENTED), 1
otherwise, 2 when wstest is not installed. Not collected by pytest (its name is not test_*.py).

Measured with the fixes to WebSocketBridge (tests/test_websocket_conformance.py pins them):
242 OK, 2 NON-STRICT (6.4.3 and 6.4.4: fail-fast on invalid UTF-8 *inside* one frame that arrives in
chops; websockets' Sans-I/O layer hands over whole frames only, so the 1007 comes when the frame is
complete, which Autobahn accepts as non-strict), 0 FAILED, 3 INFORMATIONAL (7.1.6, 7.13.1, 7.13.2).

Setting up Autobahn (it runs on Python 2.7 only; pyenv has 2.7.18 here). These commands worked:

    ~/.pyenv/versions/2.7.18/bin/python -m pip install 'virtualenv<20.22'
    ~/.pyenv/versions/2.7.18/bin/python -m virtualenv /tmp/autobahn-py27
    /tmp/autobahn-py27/bin/pip install autobahntestsuite==25.10.1

pip resolved that to autobahn 0.10.9, Twisted 19.10.0, txaio 2.1.0, six 1.16.0, zope.interface 4.6.0,
pyOpenSSL 19.1.0, cryptography 3.3.2, klein 17.10.0, Werkzeug 1.0.1, Jinja2 2.11.3, wsaccel 0.6.6 and
ujson 2.0.3 (among others); to pin the core explicitly:

    /tmp/autobahn-py27/bin/pip install autobahntestsuite==25.10.1 'autobahn[twisted,accelerate]==0.10.9' \\
        Twisted==19.10.0 txaio==2.1.0 six==1.16.0

``--wstest`` takes the virtualenv's directory or its ``bin/wstest``. ``--keep DIR`` keeps the HTML and
JSON reports (DIR/index.html); ``--gateway dist/ua_gateway.pyz`` tests the built zipapp instead.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import launch  # noqa: E402  (the same start-up as the test suite's)
DEFAULT_WSTEST = Path("/tmp/autobahn-py27")
DEFAULT_EXCLUDE = ["9.*", "12.*", "13.*"]
ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def find_wstest(given: Path) -> Optional[Path]:
    for candidate in (given / "bin" / "wstest", given):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def case_key(case: str) -> List[int]:
    return [int(part) for part in case.split(".")]


def summarize(outdir: Path) -> Tuple[collections.Counter, List[str]]:
    index: Dict[str, Dict[str, Any]] = json.loads((outdir / "index.json").read_text())
    counts: collections.Counter = collections.Counter()
    notes: List[str] = []
    for agent, cases in index.items():
        for case in sorted(cases, key=case_key):
            result = cases[case]
            counts[result["behavior"]] += 1
            if result["behavior"] == "OK" and result["behaviorClose"] in ("OK", "INFORMATIONAL"):
                continue
            detail: Dict[str, Any] = {}
            report = outdir / result.get("reportfile", "")
            if report.is_file():
                detail = json.loads(report.read_text())
            notes.append(
                f"  {case:<8} {result['behavior']:<13} close={result['behaviorClose']:<13} "
                f"code={result.get('remoteCloseCode')} reason={detail.get('remoteCloseReason')!r}\n"
                f"           {re.sub(r'<[^>]+>', ' ', detail.get('description', '')).split(chr(10))[0][:150]}"
            )
    return counts, notes


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wstest", type=Path, default=DEFAULT_WSTEST,
                        help=f"the Python 2.7 virtualenv holding autobahntestsuite, or its bin/wstest (default {DEFAULT_WSTEST})")
    parser.add_argument("--cases", nargs="+", default=["*"], help="case patterns to run (default all)")
    parser.add_argument("--exclude", nargs="*", default=DEFAULT_EXCLUDE,
                        help="case patterns to skip (default 9.* 12.* 13.*: the slow performance and compression cases)")
    parser.add_argument("--keep", type=Path, help="write the reports here instead of a temporary directory")
    parser.add_argument("--gateway", type=Path, help="the gateway to run (default ua_gateway.py; e.g. dist/ua_gateway.pyz)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on wstest after this many seconds")
    args = parser.parse_args(argv)

    wstest = find_wstest(args.wstest)
    if wstest is None:
        print(f"wstest not found under {args.wstest}; set up the Python 2.7 environment as this script's "
              f"docstring says (python3 {Path(__file__).name} --help shows the first line only):\n", file=sys.stderr)
        print(__doc__[__doc__.index("Setting up"):], file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="ua-autobahn-") as scratch:
        base = Path(scratch)
        outdir = (args.keep or base / "reports").resolve()
        outdir.mkdir(parents=True, exist_ok=True)
        gateway = launch(base / "workspaces", "--ws-echo",
                         command=[sys.executable, str(args.gateway or ROOT / "ua_gateway.py")])
        try:
            url = f"{gateway.ws_url}/ws/echo"
            spec = {
                "outdir": str(outdir),
                "servers": [{"agent": "ua-gateway", "url": url}],
                "cases": args.cases,
                "exclude-cases": args.exclude,
                "exclude-agent-cases": {},
            }
            (base / "fuzzingclient.json").write_text(json.dumps(spec, indent=2))
            print(f"wstest {wstest} -> {url} (cases {' '.join(args.cases)}, excluding {' '.join(args.exclude) or 'none'})")
            started = time.monotonic()
            with open(base / "wstest.log", "wb") as log:
                run = subprocess.run([str(wstest), "-m", "fuzzingclient", "-s", str(base / "fuzzingclient.json")],
                                     cwd=str(base), stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            elapsed = time.monotonic() - started
        finally:
            gateway.process.send_signal(signal.SIGTERM)
            stderr = gateway.process.communicate(timeout=15)[1].decode("utf-8", "replace")
            exit_status = gateway.stop()
        if not (outdir / "index.json").is_file():
            print((base / "wstest.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            print(f"wstest exited {run.returncode} without a report", file=sys.stderr)
            return 1
        counts, notes = summarize(outdir)
        total = sum(counts.values())
        print(f"{total} cases in {elapsed:.0f} s: " + ", ".join(f"{counts[name]} {name}" for name in ORDER if counts[name] or name in ("OK", "FAILED")))
        if notes:
            print("cases not plainly OK:")
            print("\n".join(notes))
        if exit_status != 0:
            print(f"the gateway exited {exit_status}: {stderr[-2000:]}", file=sys.stderr)
        if args.keep:
            print(f"reports: {outdir / 'index.html'}")
        return 1 if counts["FAILED"] or counts["UNIMPLEMENTED"] or exit_status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
