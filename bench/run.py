#!/usr/bin/env python3
"""ua-gateway against the FastAPI design it replaces, in one command: ``python bench/run.py``.

Rules this file keeps
- One command from a fresh clone: it creates ``bench/.venv`` (bench-only requirements: the baseline, the
  chart, the profiler), re-executes itself inside it, and installs ``wrk`` with apt-get when it is missing
  and we are root. The gateway itself runs on the host interpreter from the ``.pyz`` it builds, as it ships.
- Fair on a small, shared machine: each server is pinned to CPU 0 and the load generators (wrk, the
  WebSocket client, this script) to CPU 1; the two servers are measured alternately, workload by workload,
  with the order swapped every round, so drift and other tenants hit both alike; every figure is the median
  over rounds, and every ratio compares figures measured minutes apart at most.
- Bounded and local: all traffic goes to 127.0.0.1; every load run has a fixed duration, every wait a timeout;
  the servers and the data are removed at the end, whatever happens.

Theory of operation: build the ``.pyz`` -> write the data (1,000 sessions, a 200 MB journal, a sparse 4 GiB and
a 4 MiB run.log, a 1 GiB log to compact) into two workspaces roots (each with files of its own) ->
start both servers -> check that both answer every workload correctly -> warm up -> N rounds of
{each HTTP workload at c=50 and c=1, sequential WebSocket turns, 200 concurrent WebSocket clients, health
during 1 GiB compactions (ours only)} -> cold starts -> table, JSON (``bench/results/<stamp>.json``), chart
(``docs/bench.png``). ``--profile WORKLOAD`` instead runs one workload against our server under py-spy.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv"
REQUIREMENTS = BENCH_DIR / "requirements.txt"
RESULTS_DIR = BENCH_DIR / "results"
CHART_PATH = ROOT / "docs" / "bench.png"
HOST_PYTHON_ENV = "UA_BENCH_HOST_PYTHON"  # the interpreter that runs the .pyz (the one that started us)

# ---------------------------------------------------------------------------------------------------------
# What is measured, and the targets of issue 5.
# ---------------------------------------------------------------------------------------------------------

SERVER_CPU = 0
LOAD_CPU = 1
HOST = "127.0.0.1"

MODES = {
    # rounds: alternations of both servers; seconds: per wrk run at c=50 / c=1, per WebSocket run, per
    # compact-under-load window; cold: starts of ours / of the baseline; retry_s: time that may be spent
    # repeating runs disturbed by other processes.
    "full": dict(rounds=3, http_s=5, c1_s=3, ws_s=4, compact_s=5, warmup_s=1, cold=10, cold_baseline=5, retry_s=90),
    "quick": dict(rounds=2, http_s=1, c1_s=1, ws_s=1, compact_s=2, warmup_s=1, cold=3, cold_baseline=1, retry_s=10),
}
CONNECTIONS = 50  # wrk -c for the throughput runs (one wrk thread: -t 1)
WS_CLIENTS = 200

SESSIONS_TOTAL = 1000
PREVIEW_SESSION = "bench_preview_200m"
TAIL_4G_SESSION = "bench_tail_4g"
TAIL_4M_SESSION = "bench_tail_4m"
COMPACT_SESSION = "bench_compact_1g"
WS_SEQ_SESSION = "bench_ws_seq"
WS_SESSION = "bench_ws_{:03d}"
JOURNAL_200M = 200 * 1000 * 1000
SPARSE_4G = 4 << 30
TAIL_4M = 4 << 20
COMPACT_1G = 1 << 30
LINE_BYTES = 128  # every generated log line, newline included: 1 MiB is exactly 8,192 lines

HTTP_WORKLOADS = [
    # name, path, check(json) -> problem or None
    ("health", "/api/v1/health", lambda body: None if body.get("status") == "ok" else "status is not ok"),
    ("list", "/api/v1/ops/sessions?limit=100",
     lambda body: None if len(body.get("sessions", ())) == 100 and body.get("total") == SESSIONS_TOTAL
     else f"expected 100 of {SESSIONS_TOTAL} sessions, got {len(body.get('sessions', ()))} of {body.get('total')}"),
    ("preview", f"/api/v1/ops/sessions/{PREVIEW_SESSION}/preview?max_bytes=65536",
     lambda body: None if len(body.get("lines", ())) == 200 else f"expected 200 lines, got {len(body.get('lines', ()))}"),
    ("tail_4g", f"/api/v1/ops/logs/tail?session_id={TAIL_4G_SESSION}",
     lambda body: None if len(body.get("lines", ())) == 200 and body.get("size") == SPARSE_4G
     else f"expected 200 lines of a {SPARSE_4G}-byte file, got {len(body.get('lines', ()))} of {body.get('size')}"),
    ("tail_4m", f"/api/v1/ops/logs/tail?session_id={TAIL_4M_SESSION}",
     lambda body: None if len(body.get("lines", ())) == 200 else f"expected 200 lines, got {len(body.get('lines', ()))}"),
]
HTTP_LABELS = {
    "health": "health",
    "list": "list 1,000 sessions (limit 100)",
    "preview": "preview 200 MB journal",
    "tail_4g": "tail 4 GiB sparse run.log",
    "tail_4m": "tail 4 MiB run.log",
}

TARGET_RPS_RATIO = 3.0  # every HTTP endpoint at least 3x the baseline's requests per second ...
TARGET_P99_RATIO = 1.0  # ... with p99 latency no worse
TARGET_WS_RATIO = 1.5  # WebSocket turns per second at least 1.5x
TARGET_IDLE_RSS_MB = 30.0
TARGET_COLD_START_MS = 300.0
TARGET_TAIL_RATIO = 1.2  # a tail of 4 GiB within 1.2x of a tail of 4 MiB (c=1 median latency)
TARGET_COMPACT_HEALTH_P99_MS = 20.0

START_TIMEOUT = 60.0  # a server that is not answering health by then has failed to start
WRK_TIMEOUT_S = 10  # wrk's per-request timeout: a slow baseline list is a data point, not an error
MAX_COMPACTS = 200  # per compact-under-load window, whatever the speed
CONTENTION_LIMIT = 0.10  # a run is repeated when other processes took over 10% of a measured core ...
MAX_RETRIES = 2  # ... at most twice per run, and within the mode's retry budget; the least disturbed counts


# ---------------------------------------------------------------------------------------------------------
# Bootstrap: the bench venv and wrk. Standard library only: this runs before the venv exists.
# ---------------------------------------------------------------------------------------------------------


def _in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV_DIR.resolve()


def bootstrap(argv: Sequence[str]) -> None:
    """Create/refresh bench/.venv and re-exec this script inside it (returns only when already inside)."""
    if _in_bench_venv():
        return
    venv_python = VENV_DIR / "bin" / "python"
    if not venv_python.exists():
        print(f"bench: creating {VENV_DIR.relative_to(ROOT)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
    stamp = VENV_DIR / ".requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != digest:
        print("bench: installing bench/requirements.txt into the bench venv", flush=True)
        subprocess.run(
            [str(venv_python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
            check=True,
        )
        stamp.write_text(digest + "\n")
    env = dict(os.environ)
    env.setdefault(HOST_PYTHON_ENV, sys.executable)
    os.execve(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *argv], env)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("bench: wrk is missing; install it (Debian: apt-get install wrk) and run again")
    print("bench: installing wrk with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", "wrk"]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench: wrk is still missing after apt-get install wrk")
    return found


# ---------------------------------------------------------------------------------------------------------
# Small helpers: pinning, HTTP, /proc.
# ---------------------------------------------------------------------------------------------------------


class Pinning:
    """Servers on SERVER_CPU, load generators (and this script) on LOAD_CPU. Nothing more can be done
    about other tenants here: they run in cgroups of their own, where a nice value does not reach."""

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = len(cpus) >= 2 and SERVER_CPU in cpus and LOAD_CPU in cpus and shutil.which("taskset") is not None

    def server(self) -> List[str]:
        return ["taskset", "-c", str(SERVER_CPU)] if self.enabled else []

    def load(self) -> List[str]:
        return ["taskset", "-c", str(LOAD_CPU)] if self.enabled else []

    def pin_self(self) -> None:
        if self.enabled:
            os.sched_setaffinity(0, {LOAD_CPU})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def http_request(port: int, method: str, path: str, body: Optional[bytes] = None, timeout: float = 30.0) -> Tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_healthy(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before answering health")
        try:
            status, _ = http_request(port, "GET", "/api/v1/health", timeout=2.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"no 200 from health on port {port} within {timeout:.0f} s")


def rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak VmRSS of some processes while a block runs, sampled every 100 ms."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.peak: Dict[int, int] = {pid: 0 for pid in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                value = rss_kib(pid)
                if value is not None and value > self.peak[pid]:
                    self.peak[pid] = value
            self._stop.wait(0.1)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------
# The servers.
# ---------------------------------------------------------------------------------------------------------


def server_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    # No token, allowlist or agent command from the caller's environment: both servers run with defaults.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("UA_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(extra or {})
    return env


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there 10 s later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Server:
    def __init__(self, name: str, process: subprocess.Popen, port: int, logs: List[Any]) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid  # taskset execs the server: this is the server's own pid
        self.port = port
        self._logs = logs

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} server died (exit status {self.process.returncode})")

    def stop(self) -> None:
        terminate(self.process)
        for log in self._logs:
            log.close()


def _read_line(stream: Any, timeout: float) -> bytes:
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    try:
        if not selector.select(timeout):
            return b""
        return stream.readline()
    finally:
        selector.close()


def _drain(stream: Any, sink: Any) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        sink.write(chunk)


# The compaction workload archives about 150 GiB of log a round: with the default delay our compressor would
# spend the rest of the bench gzipping it (110 s of CPU a GiB) on the server's core, inside every later
# measurement. Archives stay plain here; bench/archive_tail.py measures compression and compressed reads.
OURS_ENV = {"UA_ARCHIVE_COMPRESS_DELAY": str(7 * 86400)}


def start_ours(pin: Pinning, host_python: str, pyz: Path, root: Path, log_dir: Path) -> Server:
    stdout_log = open(log_dir / "ours.stdout.log", "wb")
    stderr_log = open(log_dir / "ours.stderr.log", "wb")
    process = subprocess.Popen(
        pin.server() + [host_python, str(pyz), "--port", "0", "--workspaces", str(root)],
        stdout=subprocess.PIPE, stderr=stderr_log, env=server_env(OURS_ENV), cwd=str(log_dir),
    )
    line = _read_line(process.stdout, START_TIMEOUT)
    stdout_log.write(line)
    match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"our server printed no listening line: {line!r} (see {log_dir / 'ours.stderr.log'})")
    threading.Thread(target=_drain, args=(process.stdout, stdout_log), daemon=True).start()
    server = Server("ours", process, int(match.group(1)), [stdout_log, stderr_log])
    wait_healthy(server.port, START_TIMEOUT, process)
    return server


def baseline_command(pin: Pinning, port: int) -> List[str]:
    return pin.server() + [
        sys.executable, "-m", "uvicorn", "baseline_app:app", "--app-dir", str(BENCH_DIR),
        "--host", HOST, "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--ws", "websockets",
    ]


def start_baseline(pin: Pinning, root: Path, log_dir: Path) -> Server:
    port = free_port()
    # uvicorn's defaults, as the original ran it: access log on (to stdout, here a file).
    stdout_log = open(log_dir / "baseline.stdout.log", "wb")
    stderr_log = open(log_dir / "baseline.stderr.log", "wb")
    process = subprocess.Popen(
        baseline_command(pin, port), stdout=stdout_log, stderr=stderr_log,
        env=server_env({"UA_BENCH_WORKSPACES": str(root)}), cwd=str(log_dir),
    )
    server = Server("baseline", process, port, [stdout_log, stderr_log])
    try:
        wait_healthy(port, START_TIMEOUT, process)
    except RuntimeError:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------

_WORDS = ("agent tool call result query memory session workspace journal status text thinking plan step "
          "search read write file compact tail cursor token stream socket event turn reply answer").split()


def log_block(kind: str, seed: int) -> bytes:
    """1 MiB of log lines, each exactly LINE_BYTES long: journal lines or run.log lines."""
    rng = random.Random(seed)
    lines = []
    for index in range((1 << 20) // LINE_BYTES):
        second = index % 86400
        clock = f"{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
        if kind == "journal":
            kind_name = ("TEXT", "STATUS", "TOOL_CALL", "TOOL_RESULT", "THINKING")[index % 5]
            head = f"[2026-11-26 {clock}] [{kind_name}] assistant:"
        else:
            head = f"{clock} [INFO] [agent] step {index}:"
        body = " ".join(rng.choice(_WORDS) for _ in range(24))
        line = f"{head} {body}"[: LINE_BYTES - 1].ljust(LINE_BYTES - 1, ".") + "\n"
        lines.append(line)
    block = "".join(lines).encode()
    assert len(block) == 1 << 20
    return block


def write_repeated(path: Path, block: bytes, size: int) -> None:
    with open(path, "wb") as stream:
        written = 0
        while written < size:
            chunk = block[: size - written]
            stream.write(chunk)
            written += len(chunk)
        stream.flush()
        os.fsync(stream.fileno())  # no gigabyte of dirty pages left to flush during the measurements


def _small_session(path: Path, index: int, rng: random.Random, stamp: float) -> None:
    path.mkdir()
    (path / "work_products").mkdir()
    archived = index % 10 == 9
    lines = 16 + index % 16
    journal = "".join(f"[2026-11-26 10:{i % 60:02d}:00] [TEXT] assistant: reply {i} of session {index}\n" for i in range(lines))
    run_log = "".join(f"10:{i % 60:02d}:00 [INFO] [agent] step {i} of session {index}\n" for i in range(lines))
    if archived:
        archive = path / "archive" / "20261101_000000"
        archive.mkdir(parents=True)
        (archive / "run.log").write_text(run_log)
        (archive / "activity_journal.log").write_text(journal)
    else:
        (path / "activity_journal.log").write_text(journal)
        (path / "run.log").write_text(run_log)
    heartbeat = {
        "last_run": stamp,
        "last_message_hash": f"{rng.getrandbits(64):016x}",
        "last_message_ts": stamp,
        "last_summary": {"timestamp": datetime.fromtimestamp(stamp, timezone.utc).isoformat(), "ok_only": True,
                         "text": "HEARTBEAT_OK", "sent": False, "suppressed_reason": "ok_only"},
    }
    (path / "heartbeat_state.json").write_text(json.dumps(heartbeat))
    if index % 3 == 0:
        (path / "MEMORY.md").write_text(f"# Agent Memory\n\n## [profile]\nsession {index}\n")
    if index % 5 == 0:
        (path / "memory").mkdir()
        (path / "memory" / "2026-11-26.md").write_text(f"## entry\n- session: {index}\n")
    for child in path.rglob("*"):
        os.utime(child, (stamp, stamp))
    os.utime(path, (stamp, stamp))


def write_sparse_log(path: Path, block: bytes) -> None:
    """SPARSE_4G bytes at ``path``: a hole up to the last TAIL_4M, then real lines (``block``, 1 MiB, repeated):
    the file reads as 4 GiB and occupies 4 MiB. Synced, so no dirty pages are left for the measurements."""
    with open(path, "wb") as sparse:
        sparse.truncate(SPARSE_4G - TAIL_4M)
        sparse.seek(SPARSE_4G - TAIL_4M)
        for _ in range(TAIL_4M >> 20):
            sparse.write(block)
        sparse.flush()
        os.fsync(sparse.fileno())


def prepare_data(data_dir: Path) -> Dict[str, Any]:
    """Two workspaces roots, ``ours`` and ``baseline``, with the same 1,000 sessions. Each root gets files of
    its own: a hard link shared between them would read as a planted link to ua-gateway, which serves a
    live log with a second link as empty (docs/SECURITY.md, "Files and links")."""
    started = time.monotonic()
    ours, baseline = data_dir / "ours", data_dir / "baseline"
    ours.mkdir(parents=True)
    rng = random.Random(5)
    now = time.time()
    specials = [PREVIEW_SESSION, TAIL_4G_SESSION, TAIL_4M_SESSION, COMPACT_SESSION, WS_SEQ_SESSION]
    specials += [WS_SESSION.format(i) for i in range(WS_CLIENTS)]
    ordinary = SESSIONS_TOTAL - len(specials)
    for index in range(ordinary):
        name = f"session_20261101_{index:06d}_{rng.getrandbits(32):08x}"
        _small_session(ours / name, index, rng, now - 86400 * 30 * rng.random())
    for index, name in enumerate(specials):
        _small_session(ours / name, ordinary + index, rng, now - 3600 * rng.random())
    shutil.copytree(ours, baseline)
    journal_block, run_block = log_block("journal", 1), log_block("run", 2)
    for root in (ours, baseline):
        write_repeated(root / PREVIEW_SESSION / "activity_journal.log", journal_block, JOURNAL_200M)
        write_repeated(root / TAIL_4M_SESSION / "run.log", run_block, TAIL_4M)
        write_sparse_log(root / TAIL_4G_SESSION / "run.log", run_block)
        write_repeated(root / COMPACT_SESSION / "run.log", run_block, COMPACT_1G)
    sparse_stat = os.stat(ours / TAIL_4G_SESSION / "run.log")
    return {
        "sessions": SESSIONS_TOTAL,
        "journal_bytes": JOURNAL_200M,
        "sparse_bytes": sparse_stat.st_size,
        "sparse_allocated_bytes": sparse_stat.st_blocks * 512,
        "tail_small_bytes": TAIL_4M,
        "compact_bytes": COMPACT_1G,
        "line_bytes": LINE_BYTES,
        "seconds": round(time.monotonic() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# Load: wrk, WebSocket turns, compactions, cold starts.
# ---------------------------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not match:
        raise RuntimeError(f"wrk gave no Requests/sec:\n{output}")
    result["rps"] = float(match.group(1))
    for percent in ("50", "75", "90", "99"):
        found = re.search(rf"^\s+{percent}%\s+(\S+)", output, re.M)
        result[f"p{percent}_ms"] = _ms(found.group(1)) if found else None
    match = re.search(r"(\d+) requests in", output)
    result["requests"] = int(match.group(1)) if match else 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["socket_errors"] = sum(int(value) for value in match.groups()) if match else 0
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def core_busy_seconds(cpu: int) -> float:
    """Time one CPU spent running processes (user, nice, system) or stolen by the hypervisor (steal),
    from /proc/stat. Interrupt and softirq time is left out: on loopback that is mostly the bench's
    own packets, which no process is charged for."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in line.split()[1:9])
                return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


class CpuMeter:
    """CPU spent during one run: by the server, by the load generator (this process and its children),
    and by anything else on either CPU ("foreign": other tenants of a shared machine)."""

    def __init__(self, server: "Server") -> None:
        self.server = server

    def __enter__(self) -> "CpuMeter":
        self.wall = time.monotonic()
        self.server_cpu = cpu_seconds(self.server.pid)
        self.client_cpu = _own_cpu() + _children_cpu()
        self.cores = (core_busy_seconds(SERVER_CPU), core_busy_seconds(LOAD_CPU))
        return self

    def __exit__(self, *exc: Any) -> None:
        server_cpu = cpu_seconds(self.server.pid) - self.server_cpu
        client_cpu = _own_cpu() + _children_cpu() - self.client_cpu
        self.result = {
            "wall_s": round(time.monotonic() - self.wall, 2),
            "server_cpu_s": round(server_cpu, 2),
            "client_cpu_s": round(client_cpu, 2),
            "foreign_cpu_s": round(max(0.0, core_busy_seconds(SERVER_CPU) - self.cores[0] - server_cpu), 2),
            "foreign_load_cpu_s": round(max(0.0, core_busy_seconds(LOAD_CPU) - self.cores[1] - client_cpu), 2),
        }

    @property
    def disturbance(self) -> float:
        """The larger share of a core that other processes took, on the server's CPU or the load's."""
        wall = max(self.result["wall_s"], 0.01)
        return max(self.result["foreign_cpu_s"], self.result["foreign_load_cpu_s"]) / wall


def written_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def settle(server: "Server", limit: float = 30.0) -> None:
    """Wait until the server has worked off what a previous run queued (requests accepted before wrk
    stopped are still answered), so that it never spills into the next measurement."""
    deadline = time.monotonic() + limit
    previous = cpu_seconds(server.pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        current = cpu_seconds(server.pid)
        if current - previous < 0.02:  # under 10% of a core
            return
        previous = current


def drain_writes(server: "Server", limit: float = 30.0) -> float:
    """Seconds until the server stops writing (journals, heartbeats) after the clients are done: a
    server that queues disk work behind the event loop is not finished when its last answer is sent."""
    started = time.monotonic()
    previous = written_bytes(server.pid)
    quiet_since = started
    while time.monotonic() - started < limit:
        time.sleep(0.1)
        current = written_bytes(server.pid)
        if current != previous:
            quiet_since = time.monotonic()
            previous = current
        elif time.monotonic() - quiet_since >= 0.5:
            break
    return round(max(0.0, quiet_since - started), 2)


class RetryBudget:
    """Seconds that may be spent repeating disturbed runs, for the whole bench."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds


RETRIES = RetryBudget(0.0)


def measure(pin: Pinning, server: "Server", run: Callable[[], Dict[str, Any]], retry: bool = True,
            drain: bool = False) -> Dict[str, Any]:
    """One measurement: settle, run, meter the CPU. A run during which other processes took more than
    CONTENTION_LIMIT of either core is repeated while the bench's retry budget lasts (MAX_RETRIES at
    most); the least disturbed attempt is kept, and the number of attempts recorded. With ``drain``,
    the server's CPU includes the disk writes it finishes after the run (and ``drain_s`` says how long)."""
    best: Optional[Dict[str, Any]] = None
    best_disturbance = 0.0
    for attempt in range(1 + MAX_RETRIES):
        settle(server)
        with CpuMeter(server) as meter:
            result = run()
            if drain:
                result["drain_s"] = drain_writes(server)
        server.check_alive()
        result.update(meter.result)
        if best is None or meter.disturbance < best_disturbance:
            best, best_disturbance = result, meter.disturbance
        if not retry or not pin.enabled or meter.disturbance <= CONTENTION_LIMIT or RETRIES.left <= 0:
            break
        RETRIES.left -= meter.result["wall_s"]
    best["attempts"] = attempt + 1
    best["disturbance"] = round(best_disturbance, 3)
    return best


def run_wrk(pin: Pinning, server: "Server", path: str, connections: int, seconds: int, retry: bool = True) -> Dict[str, Any]:
    command = pin.load() + [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", f"{WRK_TIMEOUT_S}s",
        f"http://{HOST}:{server.port}{path}",
    ]

    def run() -> Dict[str, Any]:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + WRK_TIMEOUT_S + 30)
        return parse_wrk(completed.stdout)

    result = measure(pin, server, run, retry)
    if result["non_2xx"] or result["socket_errors"]:
        print(f"    warning: {server.name} {path}: {result['non_2xx']} non-2xx, {result['socket_errors']} socket errors",
              flush=True)
    return result


def run_async(coroutine: Any) -> Any:
    import asyncio

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def ws_sequential(pin: Pinning, server: Server, seconds: float) -> Dict[str, Any]:
    import wsload

    path = f"/api/v1/sessions/{WS_SEQ_SESSION}/stream"
    return measure(pin, server, lambda: run_async(wsload.sequential_turns(HOST, server.port, path, seconds)), drain=True)


def ws_concurrent(pin: Pinning, server: Server, seconds: float) -> Dict[str, Any]:
    import wsload

    paths = [f"/api/v1/sessions/{WS_SESSION.format(i)}/stream" for i in range(WS_CLIENTS)]
    return measure(pin, server, lambda: run_async(wsload.concurrent_turns(HOST, server.port, paths, seconds)), drain=True)


def websocket_conformance(server: Server) -> Optional[str]:
    """One turn with the websockets library: the frames a real client sees, in order."""
    from websockets.sync.client import connect

    url = f"ws://{HOST}:{server.port}/api/v1/sessions/{WS_SEQ_SESSION}/stream"
    with connect(url, open_timeout=10, close_timeout=5) as websocket:
        first = json.loads(websocket.recv(timeout=10))
        if first.get("type") != "connected":
            return f"first frame is {first.get('type')!r}, not 'connected'"
        websocket.send(json.dumps({"type": "execute", "data": {"user_input": "conformance"}}))
        types = []
        while not types or types[-1] != "query_complete":
            frame = json.loads(websocket.recv(timeout=10))
            if not {"type", "data", "timestamp"} <= frame.keys():
                return f"frame without type/data/timestamp: {frame}"
            types.append(frame["type"])
            if len(types) > 10:
                break
        if types != ["status", "text", "query_complete"]:
            return f"a turn gave {types}, expected status, text, query_complete"
    return None


def health_during_compaction(pin: Pinning, server: Server, root: Path, seconds: int) -> Dict[str, Any]:
    """wrk on health while our server compacts a 1 GiB run.log again and again (each compaction archives
    the full file; the bench links that archived copy back as the live log for the next one)."""
    session = root / COMPACT_SESSION
    live = session / "run.log"
    result_box: Dict[str, Any] = {}

    def load() -> None:
        result_box["wrk"] = run_wrk(pin, server, "/api/v1/health", CONNECTIONS, seconds, retry=False)

    loader = threading.Thread(target=load)
    loader.start()
    compact_ms: List[float] = []
    rewrites = 0
    time.sleep(0.5)
    window_end = time.monotonic() + seconds - 1.0
    while time.monotonic() < window_end and len(compact_ms) < MAX_COMPACTS:
        if live.stat().st_size != COMPACT_1G:
            raise RuntimeError(f"{live} is not the 1 GiB log before a compaction")
        sent = time.perf_counter()
        status, body = http_request(server.port, "POST", f"/api/v1/ops/sessions/{COMPACT_SESSION}/compact", b"{}")
        compact_ms.append((time.perf_counter() - sent) * 1000)
        reply = json.loads(body)
        if status != 200 or live.stat().st_size >= COMPACT_1G:
            raise RuntimeError(f"compaction of the 1 GiB log answered {status} and left it whole: {reply}")
        archive_dir = reply.get("archive_dir") if isinstance(reply, dict) else None
        archived = session / archive_dir / "run.log" if isinstance(archive_dir, str) else None
        os.unlink(live)
        if archived is not None and archived.exists() and archived.stat().st_size == COMPACT_1G:
            os.link(archived, live)
        else:  # not archived whole: write the gigabyte again (slow, counted)
            rewrites += 1
            write_repeated(live, log_block("run", 2), COMPACT_1G)
        if archived is not None:
            shutil.rmtree(archived.parent, ignore_errors=True)
    loader.join()
    result = dict(result_box["wrk"])
    result.update(
        compactions=len(compact_ms),
        compact_p50_ms=round(statistics.median(compact_ms), 2) if compact_ms else None,
        compact_max_ms=round(max(compact_ms), 2) if compact_ms else None,
        rewrites=rewrites,
    )
    return result


def cold_start_ours(pin: Pinning, host_python: str, pyz: Path, root: Path) -> float:
    """Milliseconds from spawning ``python ua_gateway.pyz`` to its first 200 from health."""
    started = time.perf_counter()
    process = subprocess.Popen(
        pin.server() + [host_python, str(pyz), "--port", "0", "--workspaces", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=server_env(),
    )
    try:
        line = _read_line(process.stdout, START_TIMEOUT)
        match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"no listening line from a cold start: {line!r}")
        wait_healthy(int(match.group(1)), START_TIMEOUT, process)
        return (time.perf_counter() - started) * 1000
    finally:
        terminate(process)


def cold_start_baseline(pin: Pinning, root: Path) -> float:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        baseline_command(pin, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=server_env({"UA_BENCH_WORKSPACES": str(root)}),
    )
    try:
        wait_healthy(port, START_TIMEOUT, process)
        return (time.perf_counter() - started) * 1000
    finally:
        terminate(process)


# ---------------------------------------------------------------------------------------------------------
# The machine, the build.
# ---------------------------------------------------------------------------------------------------------


def _run_text(command: Sequence[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def describe_machine(host_python: str, pin: Pinning) -> Dict[str, Any]:
    from importlib import metadata

    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    packages = {}
    for name in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "websockets", "pydantic", "matplotlib", "py-spy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    wrk_version = _run_text(["wrk", "--version"]).splitlines()
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)) if not pin.enabled else [SERVER_CPU, LOAD_CPU],
        "memory_gib": round(memory_kib / 1048576, 1) if memory_kib else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python_ours": _run_text([host_python, "-c", "import sys; print(sys.version.split()[0])"]),
        "python_ours_path": host_python,
        "python_bench": platform.python_version(),
        "packages": packages,
        "wrk": wrk_version[0] if wrk_version else None,
        "pinning": f"servers on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}" if pin.enabled else "none (fewer than 2 CPUs)",
        "git_commit": _run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "git_dirty_files": [line[3:] for line in _run_text(["git", "-C", str(ROOT), "status", "--porcelain"]).splitlines()],
        "loadavg_start": os.getloadavg(),
    }


def build_pyz(host_python: str, output: Path, worktree: bool) -> Dict[str, Any]:
    """Build the .pyz with the project's own zipapp_build.py: from a snapshot of the last commit (default:
    what is measured is a commit, whatever else is half-edited in the checkout), or from the work tree."""
    started = time.monotonic()
    source = ROOT
    env = dict(os.environ)
    commit = _run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    if not worktree and commit:
        source = output.parent / "source"
        source.mkdir()
        archive = output.parent / "source.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(source)
        archive.unlink()
        if (ROOT / "build" / "cache").is_dir():  # the verified websockets download, so no network is needed
            shutil.copytree(ROOT / "build" / "cache", source / "build" / "cache")
        # The same timestamp a build in the checkout uses, so the archive has the same bytes.
        env.setdefault("SOURCE_DATE_EPOCH", _run_text(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"]))
    completed = subprocess.run(
        [host_python, str(source / "zipapp_build.py"), "--output", str(output)],
        capture_output=True, text=True, cwd=str(source), timeout=900, env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"zipapp_build.py failed:\n{completed.stdout}\n{completed.stderr}")
    return {
        "source": f"work tree at {commit}" if source == ROOT else f"commit {commit}",
        "bytes": output.stat().st_size,
        "sha256": hashlib.sha256(output.read_bytes()).hexdigest(),
        "seconds": round(time.monotonic() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _say(text: str) -> None:
    print(text, flush=True)


def check_answers(servers: Sequence[Server]) -> Dict[str, Any]:
    """Every workload answers 200 with the expected content on both servers, before any load."""
    sizes: Dict[str, Any] = {}
    for name, path, check in HTTP_WORKLOADS:
        for server in servers:
            status, body = http_request(server.port, "GET", path)
            problem = f"status {status}" if status != 200 else check(json.loads(body))
            if problem:
                raise RuntimeError(f"{server.name} {path}: {problem}; body {body[:300]!r}")
            sizes.setdefault(name, {})[server.name] = len(body)
    for server in servers:
        problem = websocket_conformance(server)
        if problem:
            raise RuntimeError(f"{server.name} WebSocket: {problem}")
    return sizes


class Errors:
    """Failures of single measurements: recorded and reported, never fatal to the rest of the bench."""

    def __init__(self) -> None:
        self.items: List[str] = []

    def attempt(self, label: str, function: Callable[[], Any]) -> Any:
        try:
            return function()
        except Exception as exc:  # a workload that breaks must not hide the others' results
            self.items.append(f"{label}: {exc}"[:500])
            _say(f"  error: {label}: {exc}"[:300])
            return None


def run_bench(options: argparse.Namespace) -> Dict[str, Any]:
    settings = MODES["quick" if options.quick else "full"]
    RETRIES.left = settings["retry_s"]
    pin = Pinning()
    pin.pin_self()
    host_python = os.environ.get(HOST_PYTHON_ENV) or getattr(sys, "_base_executable", sys.executable)
    wall_started = time.monotonic()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    machine = describe_machine(host_python, pin)
    errors = Errors()
    raw: Dict[str, Any] = {"http": {}, "ws_sequential": {}, "ws_concurrent": {}, "compact": []}
    report: Dict[str, Any] = {"stamp": stamp, "mode": "quick" if options.quick else "full", "settings": settings,
                              "machine": machine, "connections": CONNECTIONS, "ws_clients": WS_CLIENTS, "raw": raw}
    _say(f"bench: {report['mode']} mode, {settings['rounds']} rounds; {machine['cpu_model']}, {machine['cpus']} CPUs, "
         f"{machine['pinning']}; load average {machine['loadavg_start'][0]:.2f}")
    data_dir = Path(tempfile.mkdtemp(prefix="ua-bench-", dir=options.data_dir))
    servers: List[Server] = []
    try:
        pyz = data_dir / "ua_gateway.pyz"
        if options.pyz:
            shutil.copyfile(options.pyz, pyz)
            report["build"] = {"source": f"prebuilt {options.pyz}", "bytes": pyz.stat().st_size,
                               "sha256": hashlib.sha256(pyz.read_bytes()).hexdigest(), "seconds": 0.0}
        else:
            report["build"] = build_pyz(host_python, pyz, options.worktree)
        _say(f"bench: built {pyz.name} from the {report['build']['source']} ({report['build']['bytes']} bytes)")
        report["data"] = prepare_data(data_dir)
        _say(f"bench: wrote the data in {report['data']['seconds']} s (sparse 4 GiB file occupies "
             f"{report['data']['sparse_allocated_bytes'] >> 20} MiB)")
        ours = start_ours(pin, host_python, pyz, data_dir / "ours", data_dir)
        servers.append(ours)
        baseline = start_baseline(pin, data_dir / "baseline", data_dir)
        servers.append(baseline)
        time.sleep(1.0)
        report["rss_idle_kib"] = {server.name: rss_kib(server.pid) for server in servers}
        report["response_bytes"] = check_answers(servers)
        _say(f"bench: both servers answer every workload; idle RSS ours {report['rss_idle_kib']['ours'] / 1024:.1f} MB, "
             f"baseline {report['rss_idle_kib']['baseline'] / 1024:.1f} MB")

        for name, path, _ in HTTP_WORKLOADS:  # warm caches and code paths; not recorded
            for server in servers:
                errors.attempt(f"warm-up {name} {server.name}", lambda: run_wrk(pin, server, path, 10, settings["warmup_s"]))
        for server in servers:
            errors.attempt(f"warm-up ws {server.name}", lambda: ws_sequential(pin, server, 0.5))

        with RssSampler([server.pid for server in servers]) as sampler:
            for round_index in range(settings["rounds"]):
                order = servers if round_index % 2 == 0 else servers[::-1]
                _say(f"bench: round {round_index + 1}/{settings['rounds']} (order: {', '.join(s.name for s in order)})")
                run_round(pin, settings, order, ours, data_dir, raw, errors)
            report["rss_peak_kib"] = {server.name: sampler.peak[server.pid] for server in servers}
        time.sleep(1.0)
        report["rss_after_kib"] = {server.name: rss_kib(server.pid) for server in servers}
        for server in servers:
            server.stop()
        servers = []

        _say("bench: cold starts")
        cold_root = data_dir / "cold"
        cold_root.mkdir()
        cold: Dict[str, List[float]] = {"ours": [], "baseline": []}
        for index in range(settings["cold"]):
            value = errors.attempt("cold start ours", lambda: cold_start_ours(pin, host_python, pyz, cold_root / f"ours{index}"))
            if value is not None:
                cold["ours"].append(round(value, 1))
        for _ in range(settings["cold_baseline"]):
            value = errors.attempt("cold start baseline", lambda: cold_start_baseline(pin, cold_root))
            if value is not None:
                cold["baseline"].append(round(value, 1))
        report["cold_start_ms"] = cold
    finally:
        for server in servers:
            server.stop()
        if options.keep_data:
            _say(f"bench: data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    runs = [run for per in raw["http"].values() for server in per.values() for level in server.values()
            for run in level] + [run for key in ("ws_sequential", "ws_concurrent")
                                 for server in raw[key].values() for run in server]
    report["noise"] = {
        "runs": len(runs),
        "repeated_runs": sum(1 for run in runs if run["attempts"] > 1),
        "median_disturbance": _median([run["disturbance"] for run in runs]),
        "max_disturbance_kept": max((run["disturbance"] for run in runs), default=None),
        "retry_budget_left_s": round(RETRIES.left, 1),
    }
    report["errors"] = errors.items
    report["seconds"] = round(time.monotonic() - wall_started, 1)
    report["summary"] = summarize(report)
    return report


def run_round(pin: Pinning, settings: Dict[str, Any], order: Sequence[Server], ours: Server, data_dir: Path,
              raw: Dict[str, Any], errors: Errors) -> None:
    """One round: every workload on both servers, in ``order``, one after the other."""
    for name, path, _ in HTTP_WORKLOADS:
        for server in order:
            entry = raw["http"].setdefault(name, {}).setdefault(server.name, {"c50": [], "c1": []})
            heavy = errors.attempt(f"{name} c=50 {server.name}",
                                   lambda: run_wrk(pin, server, path, CONNECTIONS, settings["http_s"]))
            light = errors.attempt(f"{name} c=1 {server.name}", lambda: run_wrk(pin, server, path, 1, settings["c1_s"]))
            if heavy is not None:
                entry["c50"].append(heavy)
            if light is not None:
                entry["c1"].append(light)
            if heavy is not None and light is not None:
                _say(f"  {name:8s} {server.name:8s} c=50 {heavy['rps']:9.0f} rps p99 {heavy['p99_ms']:8.2f} ms | "
                     f"c=1 {light['rps']:7.0f} rps p50 {light['p50_ms']:6.2f} p99 {light['p99_ms']:6.2f} ms")
    for key, label, function in (("ws_sequential", "ws-seq", ws_sequential), ("ws_concurrent", "ws-200", ws_concurrent)):
        for server in order:
            result = errors.attempt(f"{key} {server.name}", lambda: function(pin, server, settings["ws_s"]))
            if result is not None:
                raw[key].setdefault(server.name, []).append(result)
                _say(f"  {label:8s} {server.name:8s} {result['turns_per_s']:9.0f} turns/s p99 {result['p99_ms']} ms, "
                     f"{result['errors']} errors, writes done {result['drain_s']} s after the last turn")
    result = errors.attempt("compact ours", lambda: health_during_compaction(pin, ours, data_dir / "ours", settings["compact_s"]))
    if result is not None:
        raw["compact"].append(result)
        _say(f"  compact  ours     health p99 {result['p99_ms']:.2f} ms during {result['compactions']} "
             f"compactions of 1 GiB (each {result['compact_p50_ms']} ms median)")


# ---------------------------------------------------------------------------------------------------------
# The table, the JSON, the chart.
# ---------------------------------------------------------------------------------------------------------


def _cpu_per_unit(row: Dict[str, Any], ours: Sequence[Dict[str, Any]], base: Sequence[Dict[str, Any]], unit: str) -> None:
    """Server CPU microseconds per request (or turn), median over rounds: a figure other tenants of the
    machine barely move, unlike requests per second. ``cpu_ratio`` is baseline / ours (higher is better)."""
    def per_unit(runs: Sequence[Dict[str, Any]]) -> Optional[float]:
        return _median([r["server_cpu_s"] / r[unit] * 1e6 if r.get(unit) else None for r in runs])

    row["cpu_us_ours"], row["cpu_us_baseline"] = per_unit(ours), per_unit(base)
    if row["cpu_us_ours"] and row["cpu_us_baseline"]:
        row["cpu_ratio"] = row["cpu_us_baseline"] / row["cpu_us_ours"]


def summarize(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Rows: workload, unit, ours, baseline, ratio (ours/baseline), target text, kind, passed. A target whose
    figure could not be measured counts as missed."""
    rows: List[Dict[str, Any]] = []
    raw = report["raw"]

    def runs(*path: str) -> List[Dict[str, Any]]:
        node: Any = raw
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, list) else []

    def med(items: Sequence[Dict[str, Any]], field: str) -> Optional[float]:
        return _median([item.get(field) for item in items])

    def row(key: str, label: str, unit: str, ours: Optional[float], base: Optional[float], target: str,
            check: Optional[Callable[[float, Optional[float]], bool]], kind: str, with_ratio: bool = True) -> Dict[str, Any]:
        ratio = ours / base if with_ratio and ours is not None and base else None
        if check is None:
            passed = None
        else:
            passed = ours is not None and check(ours, base)
        item = {"key": key, "workload": label, "unit": unit, "ours": ours, "baseline": base, "ratio": ratio,
                "target": target, "passed": passed, "kind": kind}
        rows.append(item)
        return item

    def relative(limit: float, higher_is_better: bool) -> Callable[[float, Optional[float]], bool]:
        def check(ours: float, base: Optional[float]) -> bool:
            if not base:
                return False
            return ours / base >= limit if higher_is_better else ours / base <= limit
        return check

    def absolute(limit: float) -> Callable[[float, Optional[float]], bool]:
        return lambda ours, _: ours <= limit

    for name, _, _ in HTTP_WORKLOADS:
        ours_runs, base_runs = runs("http", name, "ours", "c50"), runs("http", name, "baseline", "c50")
        item = row(f"{name}.rps", f"{HTTP_LABELS[name]}: req/s (c=50)", "req/s", med(ours_runs, "rps"),
                   med(base_runs, "rps"), f">= {TARGET_RPS_RATIO:g}x", relative(TARGET_RPS_RATIO, True), "throughput")
        _cpu_per_unit(item, ours_runs, base_runs, "requests")
        for level in ("c50", "c1"):
            row(f"{name}.p99_{level}", f"{HTTP_LABELS[name]}: p99 (c={level[1:]})", "ms",
                med(runs("http", name, "ours", level), "p99_ms"), med(runs("http", name, "baseline", level), "p99_ms"),
                "<= 1x (no worse)", relative(TARGET_P99_RATIO, False), "latency")
    for key, label in (("ws_sequential", "WS turns, 1 client in sequence"),
                       ("ws_concurrent", f"WS turns, {WS_CLIENTS} clients at once")):
        ours_runs, base_runs = runs(key, "ours"), runs(key, "baseline")
        item = row(key, f"{label}: turns/s", "turns/s", med(ours_runs, "turns_per_s"), med(base_runs, "turns_per_s"),
                   f">= {TARGET_WS_RATIO:g}x", relative(TARGET_WS_RATIO, True), "throughput")
        _cpu_per_unit(item, ours_runs, base_runs, "turns")
        row(f"{key}.p99", f"{label}: turn p99", "ms", med(ours_runs, "p99_ms"), med(base_runs, "p99_ms"),
            "info", None, "info")
        row(f"{key}.drain", f"{label}: writes pending after the run", "s",
            med(ours_runs, "drain_s"), med(base_runs, "drain_s"), "info", None, "info", with_ratio=False)
    idle = report.get("rss_idle_kib", {})
    row("rss_idle", "RSS idle", "MB", _kib_to_mb(idle.get("ours")), _kib_to_mb(idle.get("baseline")),
        f"<= {TARGET_IDLE_RSS_MB:g} MB", absolute(TARGET_IDLE_RSS_MB), "absolute")
    peak = report.get("rss_peak_kib", {})
    row("rss_load", "RSS peak under load (all workloads)", "MB", _kib_to_mb(peak.get("ours")),
        _kib_to_mb(peak.get("baseline")), "info", None, "info")
    cold = report.get("cold_start_ms", {})
    row("cold_start", "cold start to first health answer (median)", "ms", _median(cold.get("ours", [])),
        _median(cold.get("baseline", [])), f"<= {TARGET_COLD_START_MS:g} ms", absolute(TARGET_COLD_START_MS), "absolute")
    tails: Dict[str, Optional[float]] = {}
    for server in ("ours", "baseline"):
        big = med(runs("http", "tail_4g", server, "c1"), "p50_ms")
        small = med(runs("http", "tail_4m", server, "c1"), "p50_ms")
        tails[server] = big / small if big is not None and small else None
    row("tail_ratio", "logs/tail 4 GiB / 4 MiB latency (c=1 p50)", "x", tails["ours"], tails["baseline"],
        f"<= {TARGET_TAIL_RATIO:g}x", absolute(TARGET_TAIL_RATIO), "absolute", with_ratio=False)
    compact = runs("compact")
    item = row("compact_health_p99", "health p99 (c=50) during 1 GiB compactions", "ms", med(compact, "p99_ms"), None,
               f"<= {TARGET_COMPACT_HEALTH_P99_MS:g} ms", absolute(TARGET_COMPACT_HEALTH_P99_MS), "absolute")
    health_p99 = med(runs("http", "health", "ours", "c50"), "p99_ms")
    if compact and health_p99 is not None:
        item["note"] = (f"health p99 (c=50) of ours without compaction: {health_p99:.2f} ms; "
                        f"{sum(r['compactions'] for r in compact)} compactions, "
                        f"median {med(compact, 'compact_p50_ms'):.1f} ms each")
    return rows


def _kib_to_mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 1024


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "turns/s"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MB":
        return f"{value:.1f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def table_lines(rows: Sequence[Dict[str, Any]], markdown: bool = False) -> List[str]:
    header = ("workload", "unit", "ours", "baseline", "ours/base", "target", "result", "CPU per req: ours, base")
    body = []
    for item in rows:
        result = "info" if item["passed"] is None else ("PASS" if item["passed"] else "FAIL")
        ratio = "-" if item["ratio"] is None else f"{item['ratio']:.2f}x"
        cpu = "-"
        if item.get("cpu_ratio"):
            cpu = f"{item['cpu_us_ours']:.0f}, {item['cpu_us_baseline']:.0f} us = {item['cpu_ratio']:.2f}x"
        body.append((item["workload"], item["unit"], _fmt(item["ours"], item["unit"]),
                     _fmt(item["baseline"], item["unit"]), ratio, item["target"], result, cpu))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"] * 2 + ["---:"]) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return lines
    widths = [max(len(cells[i]) for cells in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i in (0, 1, 5, 6) else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(cells, widths))) for cells in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def draw_chart(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = report["summary"]
    panels = [
        ("Throughput: ours / baseline (higher is better)\n\u25c6 = baseline / ours server CPU per request",
         [r for r in rows if r["kind"] == "throughput"], lambda r: r["ratio"],
         lambda r: TARGET_WS_RATIO if r["key"].startswith("ws") else TARGET_RPS_RATIO, True),
        ("p99 latency: ours / baseline (lower is better)",
         [r for r in rows if r["kind"] == "latency"], lambda r: r["ratio"], lambda r: TARGET_P99_RATIO, True),
        ("Absolute targets: ours / limit (lower is better)",
         [r for r in rows if r["kind"] == "absolute"],
         lambda r: None if r["ours"] is None else r["ours"] / _absolute_limit(r["key"]), lambda r: 1.0, False),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(18, 7.5), gridspec_kw={"width_ratios": [7, 10, 4]})
    ratio_format = FuncFormatter(lambda value, _: f"{value:g}x")
    for axis, (title, selected, value_of, target_of, log_scale) in zip(axes, panels):
        selected = [r for r in selected if value_of(r) is not None]
        values = [value_of(r) for r in selected]
        colors = ["#2e7d32" if r["passed"] else "#c62828" for r in selected]
        positions = list(range(len(selected)))
        axis.bar(positions, values, color=colors, width=0.65)
        for x, (value, r) in enumerate(zip(values, selected)):
            axis.hlines(target_of(r), x - 0.42, x + 0.42, colors="black", linestyles="--", linewidth=1.4)
            text = f"{value:.2f}x" if r["kind"] != "absolute" else _fmt(r["ours"], r["unit"]) + (
                "" if r["unit"] == "x" else f" {r['unit']}")
            axis.annotate(text, (x, value), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                          textcoords="offset points")
            if r.get("cpu_ratio"):
                axis.plot([x], [r["cpu_ratio"]], marker="D", color="black", markersize=5)
        if log_scale:
            axis.set_yscale("log")
            axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
            axis.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        else:
            axis.set_ylim(0, max([1.2] + [value * 1.15 for value in values]))
        axis.yaxis.set_major_formatter(ratio_format)
        axis.set_xticks(positions)
        axis.set_xticklabels([_short_label(r) for r in selected], rotation=55, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    machine = report["machine"]
    noise = report.get("noise", {})
    figure.suptitle(
        f"ua-gateway (.pyz) vs FastAPI+uvicorn baseline: {report['stamp']}, {report['mode']} mode, medians of "
        f"{report['settings']['rounds']} alternated rounds; {machine['cpu_model']}, {machine['cpus']} CPUs, "
        f"{machine['pinning']}\ndashed line = target, green = met. Shared machine: other processes took a median "
        f"{100 * (noise.get('median_disturbance') or 0):.0f}% of a measured core during the runs",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _absolute_limit(key: str) -> float:
    return {"rss_idle": TARGET_IDLE_RSS_MB, "cold_start": TARGET_COLD_START_MS, "tail_ratio": TARGET_TAIL_RATIO,
            "compact_health_p99": TARGET_COMPACT_HEALTH_P99_MS}[key]


def _short_label(row: Dict[str, Any]) -> str:
    key = row["key"]
    names = {"health": "health", "list": "list 1000", "preview": "preview 200MB", "tail_4g": "tail 4GiB",
             "tail_4m": "tail 4MiB", "ws_sequential": "WS 1 client", "ws_concurrent": f"WS {WS_CLIENTS} clients",
             "rss_idle": "idle RSS", "cold_start": "cold start", "tail_ratio": "tail 4GiB/4MiB",
             "compact_health_p99": "health p99\nduring compact"}
    base, _, part = key.partition(".")
    label = names.get(base, base)
    if part.startswith("p99_"):
        label += f" p99 c={part[5:]}"
    return label


def save(report: Dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{report['stamp']}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Profiling one workload of our server with py-spy.
# ---------------------------------------------------------------------------------------------------------


def profile(options: argparse.Namespace) -> None:
    pin = Pinning()
    pin.pin_self()
    host_python = os.environ.get(HOST_PYTHON_ENV) or getattr(sys, "_base_executable", sys.executable)
    py_spy = Path(sys.executable).parent / "py-spy"
    workloads = {name: path for name, path, _ in HTTP_WORKLOADS}
    if options.profile not in workloads and options.profile not in ("ws_sequential", "ws_concurrent"):
        sys.exit(f"bench: --profile takes one of {', '.join(list(workloads) + ['ws_sequential', 'ws_concurrent'])}")
    seconds = options.profile_seconds
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data_dir = Path(tempfile.mkdtemp(prefix="ua-bench-", dir=options.data_dir))
    server = None
    try:
        pyz = data_dir / "ua_gateway.pyz"
        build_pyz(host_python, pyz, options.worktree)
        prepare_data(data_dir)
        server = start_ours(pin, host_python, pyz, data_dir / "ours", data_dir)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        raw_path = RESULTS_DIR / f"profile-{options.profile}-{stamp}.txt"
        recorder = subprocess.Popen(
            pin.load() + [str(py_spy), "record", "--pid", str(server.pid), "--duration", str(seconds + 1),
                          "--rate", "250", "--nonblocking", "--gil", "--format", "raw", "--output", str(raw_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        if options.profile in workloads:
            result = run_wrk(pin, server, workloads[options.profile], CONNECTIONS, seconds)
            _say(f"bench: {options.profile}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.2f} ms, "
                 f"{result['server_cpu_s'] / max(1, result['requests']) * 1e6:.0f} us CPU per request")
        elif options.profile == "ws_sequential":
            result = ws_sequential(pin, server, seconds)
            _say(f"bench: ws_sequential: {result['turns_per_s']:.0f} turns/s")
        else:
            result = ws_concurrent(pin, server, seconds)
            _say(f"bench: ws_concurrent: {result['turns_per_s']:.0f} turns/s")
        _, errors = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0 or not raw_path.exists():
            sys.exit(f"bench: py-spy failed: {errors.decode(errors='replace')[-2000:]}")
        print_profile(raw_path)
        _say(f"bench: collapsed stacks in {raw_path} (load into speedscope or flamegraph.pl)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def print_profile(raw_path: Path, top: int = 30) -> None:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    self_samples: Dict[str, int] = {}
    inclusive: Dict[str, int] = {}
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r" \((.*/)?([^/]+)\)$", r" (\2)", frame) for frame in stack.split(";")]
        frames = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_samples[frames[-1]] = self_samples.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    _say(f"\n{total} samples. Top self time:")
    for frame, count in sorted(self_samples.items(), key=lambda item: -item[1])[:top]:
        _say(f"  {100 * count / total:5.1f}%  {frame}")
    _say("Top inclusive time:")
    for frame, count in sorted(inclusive.items(), key=lambda item: -item[1])[:top]:
        _say(f"  {100 * count / total:5.1f}%  {frame}")


# ---------------------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Growth (--growth; issue 15): what a list, a tail and idle connections cost as they grow. One root grows
# from 1,000 to 100,000 sessions (kept with --data-dir --keep-data, so a second run starts at once); each
# server is started on it at each size, measured, stopped. The table goes to docs/bench.md, "Growth".
# ---------------------------------------------------------------------------------------------------------

GROWTH_SIZES = (1_000, 10_000, 20_000, 100_000)  # 20,000: the size the 2x target names
GROWTH_LIST_CALLS = 300  # sequential list calls per server and size, at most ...
GROWTH_LIST_SECONDS = 10.0  # ... or this long, whichever ends first (but at least GROWTH_LIST_MIN calls)
GROWTH_LIST_MIN = 3
GROWTH_CALL_TIMEOUT = 120.0  # s one list call may take: the baseline reads every session on each call
GROWTH_BASELINE_MAX_CALL = 30.0  # s: a baseline list slower than this at one size is not tried at the next
GROWTH_TAIL_CALLS = 300  # sequential tail calls per server and file
GROWTH_CONNECTIONS = (1_000, 10_000)  # idle connections held (after the count of 0)
GROWTH_CONNECT_BATCH = 500  # connections opened at once: below the listen backlog of both servers
GROWTH_IDLE_TIMEOUT = 600  # s, both servers: keep-alive and WebSocket pings must not end the idle connections
GROWTH_FIRST_LIST_TIMEOUT = 900.0  # s the index's first scan may take at 100,000 sessions before we give up
GROWTH_SESSION = "growth_{:07d}"
GROWTH_TAIL_4M, GROWTH_TAIL_4G = "growth_tail_4m", "growth_tail_4g"
GROWTH_COUNT_FILE = ".growth-sessions"  # how many growth sessions the root holds (next to it, not in it)
GROWTH_TARGETS = {20_000: 2.0, 100_000: 3.0}  # list median at this size within this factor of 1,000's
GROWTH_MD = ROOT / "docs" / "bench.md"


def grow_sessions(root: Path, count: int) -> float:
    """Make ``root`` hold ``count`` small sessions (a run.log and a heartbeat, distinct mtimes); returns seconds.
    Fast on purpose: os.mkdir and two small writes each, about 10 s for 100,000."""
    started = time.monotonic()
    marker = root.parent / GROWTH_COUNT_FILE
    have = int(marker.read_text()) if marker.exists() else 0
    now = time.time()
    for number in range(have, count):
        directory = root / GROWTH_SESSION.format(number)
        os.mkdir(directory)
        stamp = now - 86400 * 30 + number  # later sessions are newer: every list sorts all of them
        for name, data in (("run.log", b"10:00:00 [INFO] [agent] started\n"),
                           ("heartbeat_state.json", b'{"last_run": %d, "last_summary": "ok"}' % int(stamp))):
            fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.utime(os.path.join(directory, name), (stamp, stamp))
        os.utime(directory, (stamp, stamp))
        if number % 10_000 == 9_999:
            marker.write_text(str(number + 1))
    marker.write_text(str(max(have, count)))
    return time.monotonic() - started


def growth_tail_files(root: Path) -> None:
    """The two logs the tail is measured on (as prepare_data makes them): 4 MiB of lines, and 4 GiB of which
    all but the last 4 MiB is a hole (the reader is told the size; it reads only the end, as it should)."""
    if (root / GROWTH_TAIL_4G / "run.log").exists():
        return
    block = log_block("run", 2)
    (root / GROWTH_TAIL_4M).mkdir(exist_ok=True)
    (root / GROWTH_TAIL_4G).mkdir(exist_ok=True)
    write_repeated(root / GROWTH_TAIL_4M / "run.log", block, TAIL_4M)
    write_sparse_log(root / GROWTH_TAIL_4G / "run.log", block)
    for name in (GROWTH_TAIL_4M, GROWTH_TAIL_4G):  # oldest of all: they do not move the pages listed
        os.utime(root / name / "run.log", (1e9, 1e9))
        os.utime(root / name, (1e9, 1e9))


def _start_growth_server(name: str, pin: Pinning, host_python: str, pyz: Path, root: Path, log_dir: Path) -> Server:
    if name == "ours":
        stdout_log = open(log_dir / "growth-ours.stdout.log", "wb")
        stderr_log = open(log_dir / "growth-ours.stderr.log", "wb")
        process = subprocess.Popen(
            pin.server() + [host_python, str(pyz), "--port", "0", "--workspaces", str(root),
                            "--max-connections", str(GROWTH_CONNECTIONS[-1] + 100),
                            "--keepalive-timeout", str(GROWTH_IDLE_TIMEOUT), "--ws-ping-interval", str(GROWTH_IDLE_TIMEOUT)],
            stdout=subprocess.PIPE, stderr=stderr_log, env=server_env(), cwd=str(log_dir),
        )
        line = _read_line(process.stdout, START_TIMEOUT)
        match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            process.kill()
            raise RuntimeError(f"our server printed no listening line: {line!r}")
        threading.Thread(target=_drain, args=(process.stdout, stdout_log), daemon=True).start()
        server = Server("ours", process, int(match.group(1)), [stdout_log, stderr_log])
    else:
        port = free_port()
        stdout_log = open(log_dir / "growth-baseline.stdout.log", "wb")
        stderr_log = open(log_dir / "growth-baseline.stderr.log", "wb")
        command = baseline_command(pin, port) + ["--timeout-keep-alive", str(GROWTH_IDLE_TIMEOUT),
                                                 "--ws-ping-interval", str(GROWTH_IDLE_TIMEOUT)]
        process = subprocess.Popen(command, stdout=stdout_log, stderr=stderr_log,
                                   env=server_env({"UA_BENCH_WORKSPACES": str(root)}), cwd=str(log_dir))
        server = Server("baseline", process, port, [stdout_log, stderr_log])
    try:
        wait_healthy(server.port, START_TIMEOUT, process)
    except RuntimeError:
        server.stop()
        raise
    return server


def _wait_complete_list(server: Server, expected: int) -> float:
    """Seconds until a list answers all ``expected`` sessions and is not partial (the index's first scan)."""
    started = time.monotonic()
    while time.monotonic() - started < GROWTH_FIRST_LIST_TIMEOUT:
        server.check_alive()
        status, body = http_request(server.port, "GET", "/api/v1/ops/sessions?limit=1", timeout=GROWTH_CALL_TIMEOUT)
        answer = json.loads(body) if status == 200 else {}
        if not answer.get("partial") and answer.get("total", 0) >= expected:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"{server.name}: no complete list of {expected} sessions within {GROWTH_FIRST_LIST_TIMEOUT:.0f} s")


def _sequential(server: Server, path: str, calls: int, seconds: float, minimum: int = GROWTH_LIST_MIN) -> Dict[str, Any]:
    """Median latency (ms) and server CPU per call (ms) of sequential GETs of ``path`` on one connection."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=GROWTH_CALL_TIMEOUT)
    latencies: List[float] = []
    cpu_before = cpu_seconds(server.pid)
    started = time.monotonic()
    try:
        while len(latencies) < calls and (len(latencies) < minimum or time.monotonic() - started < seconds):
            sent = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - sent)
            if response.status != 200:
                raise RuntimeError(f"{server.name}: {path} answered {response.status}")
    except (OSError, http.client.HTTPException) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "calls": len(latencies)}
    finally:
        connection.close()
    cpu = cpu_seconds(server.pid) - cpu_before
    return {"median_ms": round(1000 * statistics.median(latencies), 3), "cpu_ms_per_call": round(1000 * cpu / len(latencies), 3),
            "calls": len(latencies), "max_ms": round(1000 * max(latencies), 3)}


_WS_REQUEST = ("GET /api/v1/sessions/{sid}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
_KEEPALIVE_REQUEST = "GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def open_idle_connections(port: int, count: int, kind: str, sessions: Sequence[str]) -> List[socket.socket]:
    """``count`` connections that have each made one request (a health call kept alive, or a WebSocket
    handshake to a session's stream) and then stay idle; raises RuntimeError when one is refused."""
    import selectors

    opened: List[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        while len(opened) < count:
            batch: Dict[socket.socket, bytearray] = {}
            for number in range(len(opened), min(count, len(opened) + GROWTH_CONNECT_BATCH)):
                sock = socket.create_connection((HOST, port), timeout=30)
                text = _WS_REQUEST.format(sid=sessions[number % len(sessions)]) if kind == "websocket" else _KEEPALIVE_REQUEST
                sock.sendall(text.encode())
                sock.setblocking(False)
                batch[sock] = bytearray()
                selector.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while batch and time.monotonic() < deadline:
                for key, _ in selector.select(1.0):
                    sock = key.fileobj  # type: ignore[assignment]
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError(f"a {kind} connection was closed by the server after {len(opened)} were open")
                    batch[sock] += data
                    head = bytes(batch[sock])
                    done = (b" 101 " in head.split(b"\r\n", 1)[0] and b"\r\n\r\n" in head) if kind == "websocket" \
                        else (b"\r\n\r\n" in head and head.endswith(b"}"))
                    status_line = head.split(b"\r\n", 1)[0]
                    if b"\r\n\r\n" in head and not head.startswith((b"HTTP/1.1 101", b"HTTP/1.1 200")):
                        raise RuntimeError(f"a {kind} connection was answered {status_line!r}")
                    if done:
                        selector.unregister(sock)
                        opened.append(sock)
                        del batch[sock]
            if batch:
                raise RuntimeError(f"{len(batch)} {kind} connections had no answer within 60 s")
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    finally:
        selector.close()
    return opened


def _idle_rss(server: Server, kind: str, sessions: Sequence[str]) -> Dict[str, Any]:
    """RSS (KiB) with 0 and each of GROWTH_CONNECTIONS idle connections of ``kind``; they are closed after."""
    settle(server)
    rss = {"0": rss_kib(server.pid)}
    held: List[socket.socket] = []
    try:
        for count in GROWTH_CONNECTIONS:
            held += open_idle_connections(server.port, count - len(held), kind, sessions)
            time.sleep(1.0)  # let the server finish its side of the last handshakes
            rss[str(count)] = rss_kib(server.pid)
    except (RuntimeError, OSError) as exc:
        rss["error"] = str(exc)
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.0)
    return rss


def index_in_process(root: Path, sessions: int) -> Dict[str, Any]:
    """The session index built in this process on ``root``: its memory per session (RSS grown by the first
    scan, less a baseline of the same process) and the CPU of one rescan of unchanged sessions (median of 3)."""
    import gc
    import asyncio as _asyncio
    import concurrent.futures as _futures

    sys.path.insert(0, str(ROOT))
    from ops_service import OpsService as _Ops
    from uagw.changes import Changes as _Changes
    from uagw.index import SessionIndex as _Index

    gc.collect()
    before = rss_kib(os.getpid()) or 0
    index = _Index(_Ops(root), use_inotify=False, rescan_interval=3600)
    loop, executor = _asyncio.new_event_loop(), _futures.ThreadPoolExecutor(1)
    started = time.monotonic()
    index.start(loop, executor, _Changes())
    index.complete.wait(GROWTH_FIRST_LIST_TIMEOUT)
    scan_s = time.monotonic() - started
    gc.collect()
    after = rss_kib(os.getpid()) or 0
    time.sleep(1.1)  # past the racy second of the last reads, so the rescans find nothing to re-read
    index.rescan()
    cpu = []
    for _ in range(3):
        cpu_started = time.process_time()
        index.rescan()
        cpu.append(time.process_time() - cpu_started)
    listed = len(index._entries)
    index.close()
    executor.shutdown()
    loop.close()
    return {"sessions": listed, "bytes_per_session": round((after - before) * 1024 / max(1, listed)),
            "first_scan_s": round(scan_s, 2), "rescan_cpu_s": round(statistics.median(cpu), 3)}


def run_growth(options: argparse.Namespace) -> Dict[str, Any]:
    started = time.monotonic()
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 client sockets, and the servers inherit it
    except (ValueError, OSError):
        pass
    pin = Pinning()
    pin.pin_self()
    host_python = os.environ.get(HOST_PYTHON_ENV, sys.executable)
    base = Path(options.data_dir) if options.data_dir else Path(tempfile.gettempdir())
    data_dir = base / "ua-bench-growth"
    root = data_dir / "root"
    root.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    report: Dict[str, Any] = {"stamp": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "list": {}, "errors": []}
    try:
        pyz = Path(options.pyz) if options.pyz else data_dir / "ua_gateway.pyz"
        if not options.pyz:
            shutil.rmtree(data_dir / "source", ignore_errors=True)
            report["build"] = build_pyz(host_python, pyz, options.worktree)
        growth_tail_files(root)
        baseline_ok = True
        for size in GROWTH_SIZES:
            made = grow_sessions(root, size)
            _say(f"growth: {size:,} sessions ({made:.1f} s to create)")
            row: Dict[str, Any] = {}
            total = size + 2  # the two tail sessions
            for name in ("ours", "baseline"):
                if name == "baseline" and not baseline_ok:
                    row[name] = {"skipped": f"its list took over {GROWTH_BASELINE_MAX_CALL:.0f} s a call at a smaller size"}
                    continue
                server = _start_growth_server(name, pin, host_python, pyz, root, log_dir)
                try:
                    first = _wait_complete_list(server, total) if name == "ours" else None
                    result = _sequential(server, "/api/v1/ops/sessions?limit=100", GROWTH_LIST_CALLS, GROWTH_LIST_SECONDS)
                    result["rss_kib"] = rss_kib(server.pid)
                    if first is not None:
                        result["first_complete_list_s"] = round(first, 2)
                    row[name] = result
                    _say(f"growth:   {name}: list {result}")
                    if name == "baseline" and result.get("median_ms", 1e9) > 1000 * GROWTH_BASELINE_MAX_CALL:
                        baseline_ok = False
                    if size == GROWTH_SIZES[0]:
                        report.setdefault("tail", {})[name] = {
                            "4m": _sequential(server, f"/api/v1/ops/logs/tail?session_id={GROWTH_TAIL_4M}", GROWTH_TAIL_CALLS, 30, 30),
                            "4g": _sequential(server, f"/api/v1/ops/logs/tail?session_id={GROWTH_TAIL_4G}", GROWTH_TAIL_CALLS, 30, 30),
                        }
                        streams = [GROWTH_SESSION.format(number) for number in range(100)]
                        report.setdefault("rss", {})[name] = {
                            "http": _idle_rss(server, "http", streams),
                            "websocket": _idle_rss(server, "websocket", streams),
                        }
                        _say(f"growth:   {name}: tail {report['tail'][name]}; rss {report['rss'][name]}")
                except RuntimeError as exc:
                    row[name] = {"error": str(exc)}
                    report["errors"].append(f"{name} at {size:,}: {exc}")
                finally:
                    server.stop()
            report["list"][str(size)] = row
        report["index"] = index_in_process(root, GROWTH_SIZES[-1])
        _say(f"growth: index in process: {report['index']}")
    finally:
        if not options.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["machine"] = describe_machine(host_python, pin)
    return report


def _ms_cell(result: Optional[Dict[str, Any]], key: str = "median_ms") -> str:
    if not result:
        return "—"
    if "skipped" in result:
        return "not run"
    if "error" in result:
        return "failed"
    return f"{result[key]:,.2f} ms"


def growth_lines(report: Dict[str, Any]) -> List[str]:
    """The growth table (markdown) and its notes, from a run_growth report."""
    lines = ["| measure | ours | baseline | baseline / ours | target |", "|---|---:|---:|---:|---|"]
    lists = report["list"]
    first = lists.get(str(GROWTH_SIZES[0]), {}).get("ours", {}).get("median_ms")
    for size in GROWTH_SIZES:
        row = lists.get(str(size), {})
        ours, base = row.get("ours", {}), row.get("baseline", {})
        ratio = f"{base['median_ms'] / ours['median_ms']:.1f}x" if "median_ms" in ours and "median_ms" in base else "—"
        target = ""
        if size in GROWTH_TARGETS and first and "median_ms" in ours:
            growth = ours["median_ms"] / first
            target = f"≤ {GROWTH_TARGETS[size]:g}x of 1,000: {growth:.2f}x {'✓' if growth <= GROWTH_TARGETS[size] else '✗'}"
        lines.append(f"| list, {size:,} sessions (limit 100, sequential, median) | {_ms_cell(ours)} | {_ms_cell(base)} | {ratio} | {target} |")
        lines.append(f"| … server CPU per list call | {_ms_cell(ours, 'cpu_ms_per_call')} | {_ms_cell(base, 'cpu_ms_per_call')} | | |")
    for size in GROWTH_SIZES:
        ours = lists.get(str(size), {}).get("ours", {})
        if "first_complete_list_s" in ours:
            lines.append(f"| first complete list after start, {size:,} sessions (partial answers before) | "
                         f"{ours['first_complete_list_s']:.2f} s | — | | health at once |")
    for key, label in (("4m", "tail 4 MiB run.log (sequential, median)"), ("4g", "tail 4 GiB sparse run.log (sequential, median)")):
        ours = report.get("tail", {}).get("ours", {}).get(key)
        base = report.get("tail", {}).get("baseline", {}).get(key)
        ratio = f"{base['median_ms'] / ours['median_ms']:.1f}x" if ours and base and "median_ms" in ours and "median_ms" in base else "—"
        lines.append(f"| {label} | {_ms_cell(ours)} | {_ms_cell(base)} | {ratio} | |")
    for kind, label in (("http", "HTTP keep-alive"), ("websocket", "WebSocket")):
        for count in ("0",) + tuple(str(c) for c in GROWTH_CONNECTIONS):
            cells = []
            for name in ("ours", "baseline"):
                rss = report.get("rss", {}).get(name, {}).get(kind, {})
                value = rss.get(count)
                if value is None:
                    cells.append("failed" if rss.get("error") else "—")
                    continue
                per = "" if count == "0" or rss.get("0") is None else f" ({(value - rss['0']) * 1024 / int(count) / 1024:.1f} KiB each)"
                cells.append(f"{value / 1024:.1f} MiB{per}")
            lines.append(f"| RSS, {int(count):,} idle {label} connections | {cells[0]} | {cells[1]} | | |")
    index = report.get("index", {})
    if index:
        lines.append(f"| index memory per session ({index['sessions']:,} sessions, in process) | {index['bytes_per_session']:,} B | — | | |")
        lines.append(f"| index rescan CPU per cycle, {index['sessions']:,} unchanged sessions | {index['rescan_cpu_s']:.2f} s | — | | |")
    notes = [f"- {error}" for error in report.get("errors", ())]
    for size in GROWTH_SIZES:
        base = lists.get(str(size), {}).get("baseline", {})
        if "skipped" in base:
            notes.append(f"- baseline at {size:,} sessions: not run, {base['skipped']}.")
    for name in ("ours", "baseline"):
        for kind in ("http", "websocket"):
            error = report.get("rss", {}).get(name, {}).get(kind, {}).get("error")
            if error:
                notes.append(f"- {name}, idle {kind} connections: {error}")
    return lines + ([""] + notes if notes else [])


def write_growth_section(lines: Sequence[str], report: Dict[str, Any]) -> None:
    """Replace (or add) the "Growth" section of docs/bench.md with this run's table."""
    machine = report.get("machine", {})
    body = ["## Growth", "",
            f"`python3 bench/run.py --growth` on {machine.get('cpu_model', 'this machine')}, {report['stamp']} "
            f"({report['seconds']:.0f} s; servers pinned to CPU {SERVER_CPU}, the client to CPU {LOAD_CPU}). One root grows from "
            "1,000 to 100,000 small sessions; each server is started on it at each size. Lists are sequential calls "
            "on one connection (median); CPU is the server's utime + stime per call. The 4 GiB run.log is sparse "
            "(a hole, then 4 MiB of lines): a tail reads only its end, as it must. Idle connections each made one "
            "request (a health call kept alive, or a WebSocket handshake to a session's stream); both servers were "
            f"given idle timeouts of {GROWTH_IDLE_TIMEOUT} s for the measurement.", "", *lines, ""]
    text = GROWTH_MD.read_text() if GROWTH_MD.exists() else "# Benchmarks\n"
    start = text.find("\n## Growth\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + "\n".join(body) + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body)
    GROWTH_MD.write_text(text)


def growth_main(options: argparse.Namespace) -> int:
    report = run_growth(options)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"growth-{report['stamp']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    lines = growth_lines(report)
    _say("")
    for line in lines:
        _say(line)
    write_growth_section(lines, report)
    _say(f"\nbench: growth in {report['seconds']} s; results in {path.relative_to(ROOT)}; table in "
         f"{GROWTH_MD.relative_to(ROOT)}")
    return 1 if report["errors"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark ua-gateway (.pyz) against a FastAPI + uvicorn baseline of the design it replaces.",
        epilog="Writes bench/results/<UTC stamp>.json and docs/bench.png. Needs about 1.3 GB of free disk for the data.",
    )
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (fewer, shorter rounds)")
    parser.add_argument("--data-dir", help="where to create the temporary data directory (default: the system temp dir)")
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory afterwards")
    parser.add_argument("--worktree", action="store_true",
                        help="build the .pyz from the work tree as it is (default: from the last commit)")
    parser.add_argument("--pyz", help="benchmark this prebuilt zipapp instead of building one (A/B experiments)")
    parser.add_argument("--no-chart", action="store_true", help="do not redraw docs/bench.png")
    parser.add_argument("--profile", metavar="WORKLOAD",
                        help="instead of the bench, profile our server under one workload with py-spy "
                        "(health, list, preview, tail_4g, tail_4m, ws_sequential, ws_concurrent)")
    parser.add_argument("--profile-seconds", type=int, default=10, help="length of the profiled run (default 10)")
    parser.add_argument("--growth", action="store_true",
                        help="instead of the bench, the growth table: list at 1k-100k sessions, tail at 4 MiB/4 GiB, RSS at "
                        "0-10k idle connections (~15 min the first time; --data-dir D --keep-data keeps the 100k sessions)")
    options = parser.parse_args(arguments)
    bootstrap(arguments)
    ensure_wrk()
    sys.path.insert(0, str(BENCH_DIR))
    if options.profile:
        profile(options)
        return 0
    if options.growth:
        return growth_main(options)
    report = run_bench(options)
    path = save(report)
    lines = table_lines(report["summary"])
    _say("")
    for line in lines:
        _say(line)
    notes = [item["note"] for item in report["summary"] if item.get("note")]
    for note in notes:
        _say(f"  note: {note}")
    failed = [item["workload"] for item in report["summary"] if item["passed"] is False]
    for error in report["errors"]:
        _say(f"  error: {error}")
    noise = report["noise"]
    _say(f"  noise: other processes took a median {100 * noise['median_disturbance']:.0f}% of a measured core "
         f"(worst kept run {100 * noise['max_disturbance_kept']:.0f}%); {noise['repeated_runs']} of {noise['runs']} "
         f"runs were repeated for that")
    _say(f"\nbench: {report['seconds']} s; results in {path.relative_to(ROOT)}; "
         f"{'all targets met' if not failed else str(len(failed)) + ' target(s) missed'}")
    md_path = path.with_suffix(".md")
    md_path.write_text("\n".join(table_lines(report["summary"], markdown=True) + [""] + [f"- {n}" for n in notes]
                                 + [f"- noise: {json.dumps(noise)}"]) + "\n")
    if not options.no_chart:
        draw_chart(report, CHART_PATH)
        _say(f"bench: chart in {CHART_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
