"""The command line: arguments, ``serve`` (run a gateway until SIGTERM or SIGINT), ``main``, the
open-file limit, the non-dumpable process flag and the event loop's error reporter.

May import: the standard library, ``uagw.limits``, ``uagw.config`` and ``uagw.app`` (only to serve: the
rest runs without websockets); ``ua_client`` when a client command runs or the help lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Optional, Sequence

from . import __version__
from .limits import (
    AGENT_KILL_GRACE, BODY_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WORKSPACES, GIL_SWITCH_INTERVAL,
    HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, MAX_CONNECTIONS, REPORT_INTERVAL, SEND_STALL_TIMEOUT, SHUTDOWN_GRACE, STREAM_KEEPALIVE,
    WS_CLOSE_TIMEOUT, WS_PING_INTERVAL, WS_PING_TIMEOUT,
)
from .config import Config, ConfigError, parse_byte_size

if TYPE_CHECKING:
    from .app import Gateway  # imported when serving: only serving needs websockets

# Serving is the one thing that needs websockets (vendored in the .pyz, installed by pip): --help, --version
# and the client commands run without it, and a source checkout without it gets what to do, not a traceback.
WEBSOCKETS_MISSING = ("ua-gateway needs websockets 15.0.1 to serve: pip install websockets==15.0.1, "
                      "or build the single file with python3 zipapp_build.py, which carries it")

__all__ = [
    "CLIENT_COMMANDS",
    "LoopErrorReporter",
    "PR_SET_DUMPABLE",
    "WEBSOCKETS_MISSING",
    "build_arg_parser",
    "client_commands_summary",
    "main",
    "serve",
]


def _raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one; ``descriptor_budget`` then sizes connections from it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _forbid_inspection() -> bool:
    """Mark this process non-dumpable where Linux's prctl is available; returns whether it took effect.

    Processes of the same user, the agent commands included, can then neither read the gateway's
    /proc/<pid>/environ (where UA_OPS_TOKEN may be) or /proc/<pid>/mem nor ptrace it, and a crash leaves
    no core dump holding the token. Agent commands are unaffected: exec makes a process dumpable again.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):  # no ctypes, no libc, no prctl: nothing to do
        return False


class LoopErrorReporter:
    """The event loop's exception handler when the gateway owns the loop: asyncio's report on stderr,
    one a REPORT_INTERVAL at most, the next one saying how many were left out. Whatever repeats an
    error per event (a bug, an exhausted resource) then costs a line a second, not a flooded disk."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.reported = -REPORT_INTERVAL
        self.left_out = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.reported < REPORT_INTERVAL:
            self.left_out += 1
            return
        if self.left_out:
            context = dict(context, message=f"{context.get('message')} ({self.left_out} earlier errors not reported)")
        self.reported, self.left_out = now, 0
        loop.default_exception_handler(context)
        if self.gateway.log is not None:
            self.gateway.log.write("loop_error", message=context.get("message"), error=repr(context.get("exception")))


async def serve(config: Config, *, agent: Optional[Callable[..., Awaitable[Any]]] = None) -> int:
    """Run a gateway until SIGTERM or SIGINT; returns the exit status."""
    from .app import Gateway

    _forbid_inspection()
    gateway = Gateway(config, agent=agent)
    asyncio.get_running_loop().set_exception_handler(LoopErrorReporter(gateway))
    try:
        await gateway.start()
    except ConfigError as exc:
        print(f"ua-gateway: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ua-gateway: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
              " (another gateway may be running there; choose another --port)", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Disk work runs in threads; a waiting event loop gets the GIL back within this time rather than
    # CPython's default 5 ms, which would otherwise show up as latency whenever a worker is busy.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    print(f"ua-gateway {__version__} listening on {gateway.url} (workspaces {gateway.ops.root})", flush=True)
    await stop.wait()
    await gateway.stop(config.shutdown_grace)
    return 0


CLIENT_COMMANDS = ("sessions", "logs", "audit")

# Timeouts an operator may tune (behind a proxy with its own idle timeout, say) and tests make short; each
# sets the Config parameter of its name (--header-timeout sets header_timeout).
TIMEOUT_FLAGS = (
    ("header_timeout", HEADER_TIMEOUT, "seconds a request head may take from its first byte; then 408"),
    ("body_timeout", BODY_TIMEOUT, "seconds a request body may take from its first byte; then 408"),
    ("ws_ping_interval", WS_PING_INTERVAL, "seconds between the server's WebSocket pings"),
    ("ws_ping_timeout", WS_PING_TIMEOUT, "seconds a WebSocket peer has to answer a ping; then close 1011"),
    ("ws_close_timeout", WS_CLOSE_TIMEOUT, "seconds a WebSocket peer has to finish the closing handshake"),
    ("agent_kill_grace", AGENT_KILL_GRACE, "seconds between SIGTERM and SIGKILL for a stopped agent command"),
    ("shutdown_grace", SHUTDOWN_GRACE, "seconds requests in flight get to finish on SIGTERM or SIGINT"),
    ("stream_keepalive", STREAM_KEEPALIVE, "seconds between keep-alive comments on an idle event stream"),
)


def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def client_commands_summary() -> str:
    """The client's commands as the top-level help lists them ('sessions list|show|...', 'audit'), read
    from the client's own parser so that the list cannot go stale."""
    import ua_client  # standard library only, like this module

    summary = []
    for command, parser in _subcommands(ua_client.build_parser()).items():
        actions = _subcommands(parser)
        summary.append(f"'{command} {'|'.join(actions)}'" if actions else f"'{command}'")
    return ", ".join(summary)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ua-gateway",
        description="The operations gateway for AI agent runs: WebSocket agent sessions and an Ops API on one port. "
        f"Without a command it serves (same as 'serve'). The Ops API client: {client_commands_summary()} "
        "(see 'sessions --help' and so on).",
        epilog="Environment: UA_GATEWAY_HOST, UA_GATEWAY_PORT, UA_WORKSPACES_DIR, UA_OPS_TOKEN (or UA_OPS_TOKEN_FILE, "
        "the path of a file holding it), UA_ALLOWED_USERS, UA_CORS_ORIGINS, UA_OPS_ALLOW_FROM, UA_ALLOWED_HOSTS, "
        "UA_AGENT_CMD, UA_SESSION_CREATE_RATE, UA_SESSION_CREATE_BURST, UA_SESSION_CREATE_PER_MINUTE, "
        "UA_GATEWAY_LOG_ROTATE_BYTES, UA_RETAIN_ARCHIVES_DAYS, UA_RETAIN_IDLE_SESSIONS_DAYS, UA_DISK_BUDGET_BYTES, "
        "UA_RETAIN_TRASH_DAYS, UA_PRUNE_INTERVAL, UA_ARCHIVE_COMPRESS_DELAY, UA_SESSION_INDEX, UA_INDEX_RESCAN_INTERVAL, "
        "UA_INDEX_SCAN_PAUSE; Universal Agent's UA_INTERNAL_API_TOKEN (or UA_INTERNAL_API_TOKEN_FILE), "
        "DEFAULT_USER_ID, COMPOSIO_USER_ID, UA_DASHBOARD_OWNER_ID, TELEGRAM_ALLOWED_USER_IDS. Flags override them.",
    )
    parser.add_argument("--version", action="version", version=f"ua-gateway {__version__}")
    parser.add_argument("--host", help=f"address to bind (default {DEFAULT_HOST}; non-loopback needs UA_OPS_TOKEN or UA_INTERNAL_API_TOKEN)")
    parser.add_argument("--port", type=int, help=f"port to bind (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--workspaces", help=f"workspaces root (default ./{DEFAULT_WORKSPACES}, created if missing)")
    parser.add_argument("--agent-cmd", help="run each agent turn with this command (JSON lines on stdin/stdout)")
    parser.add_argument("--ws-echo", action="store_true", default=None, help="enable WS /ws/echo for conformance tests")
    parser.add_argument("--insecure", action="store_true", default=None, help="allow a non-loopback bind without a token")
    parser.add_argument("--keepalive-timeout", type=float, help=f"idle keep-alive timeout in seconds (default {KEEPALIVE_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=int, help=f"open connections at most; more get 503 (default {MAX_CONNECTIONS})")
    parser.add_argument(
        "--send-stall-timeout", type=float,
        help=f"abort a connection whose peer reads none of its answers for this many seconds (default {SEND_STALL_TIMEOUT:g})",
    )
    parser.add_argument("--no-session-index", dest="session_index", action="store_false", default=None,
                        help="answer lists by scanning the root each time, not from the session index (for comparison)")
    for name, default, meaning in TIMEOUT_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=float, help=f"{meaning} (default {default:g})")
    parser.add_argument("--retain-archives-days", type=float, help="prune archives older than this many days (default off)")
    parser.add_argument("--retain-idle-sessions-days", type=float,
                        help="delete sessions idle this many days, never a connected or running one (default off)")
    parser.add_argument("--disk-budget", help="keep the workspaces root under this size, oldest archives first "
                        "(bytes, or 512M, 20G; default off)")
    parser.add_argument("--retain-trash-days", type=float, help="keep trash entries this many days (default: emptied at every prune)")
    parser.add_argument("--prune-interval", type=float, help="seconds between pruner runs when a policy is set (default 3600)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] and args_list[0] in CLIENT_COMMANDS:
        import ua_client  # the command-line client of the Ops API; it needs nothing of the server

        return ua_client.main(args_list)
    if args_list[:1] == ["serve"]:
        args_list = args_list[1:]
    parser = build_arg_parser()
    args = parser.parse_args(args_list)
    try:
        config = Config.from_env(
            host=args.host,
            port=args.port,
            workspaces=args.workspaces,
            agent_cmd=args.agent_cmd,
            ws_echo=args.ws_echo,
            insecure=args.insecure,
            keepalive_timeout=args.keepalive_timeout,
            max_connections=args.max_connections,
            send_stall_timeout=args.send_stall_timeout,
            session_index=args.session_index,
            **{name: getattr(args, name) for name, _, _ in TIMEOUT_FLAGS},
            retain_archives_days=args.retain_archives_days,
            retain_idle_sessions_days=args.retain_idle_sessions_days,
            disk_budget_bytes=parse_byte_size(args.disk_budget, "--disk-budget"),
            retain_trash_days=args.retain_trash_days,
            prune_interval=args.prune_interval,
        )
        config.check_exposure()
    except ConfigError as exc:
        print(f"ua-gateway: error: {exc}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("websockets") is None:
        print(f"ua-gateway: error: {WEBSOCKETS_MISSING}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
