"""Every limit, timeout and default of the gateway, each with the reason for its value.

Rules this module keeps: it holds constants only, and imports nothing. A limit an operator may need to change
is also a ``Config`` parameter (``uagw.config``), whose default is the constant here; everything else is
changed here, in one place. docs/PROTOCOL.md §10 lists them for readers.
"""

from __future__ import annotations

__all__ = [
    "ARCHIVE_COMPRESS_DELAY",
    "ACCEPT_BATCH",
    "ACCEPT_RETRY_DELAY",
    "AGENT_DRAIN_TIMEOUT",
    "AGENT_EXIT_WAIT",
    "AGENT_GROUP_POLL",
    "AGENT_KILL_GRACE",
    "AGENT_TURN_FDS",
    "AUDIT_BACKUPS",
    "AUDIT_MAX_KEYS",
    "AUDIT_PARAMS_BYTES",
    "AUDIT_ROTATE_BYTES",
    "AUDIT_VALUE_CHARS",
    "AUTH_FAILURE_LIMIT",
    "AUTH_FAILURE_WINDOW",
    "AUTH_LOCKOUT",
    "AUTH_TRACKED_ADDRESSES",
    "BODY_TIMEOUT",
    "CLOSE_LINGER",
    "CORS_MAX_AGE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_WORKSPACES",
    "FD_RESERVE",
    "GATEWAY_LOG_BACKUPS",
    "GATEWAY_LOG_FIELD_CHARS",
    "GATEWAY_LOG_INTERVAL",
    "GATEWAY_LOG_MAX_PENDING",
    "GATEWAY_LOG_ROTATE_BYTES",
    "PRUNE_INTERVAL",
    "GIL_SWITCH_INTERVAL",
    "HEADER_TIMEOUT",
    "HTTP_FD_SHARE",
    "INDEX_RACY_NS",
    "INDEX_RESCAN_CPU_SHARE",
    "INDEX_RESCAN_INTERVAL",
    "INDEX_SAFETY_RESCAN",
    "INDEX_SCAN_BATCH",
    "INDEX_SETTLE",
    "INDEX_TURN_DELAY",
    "INDEX_ACTIVITY_INTERVAL",
    "KEEPALIVE_TIMEOUT",
    "MAX_AGENT_COMMANDS",
    "MAX_AGENT_LINE",
    "MAX_BODY_BYTES",
    "MAX_CHUNKED_OVERHEAD",
    "MAX_CHUNK_LINE",
    "MAX_CLIENT_TURN_ID",
    "MAX_CONNECTIONS",
    "MAX_HEADER_COUNT",
    "MAX_HEAD_BYTES",
    "MAX_INT_DIGITS",
    "MAX_JOURNAL_LINE",
    "MAX_JSON_DEPTH",
    "MAX_USER_ID_CHARS",
    "RESERVED_SESSION_IDS",
    "MAX_PENDING_BYTES",
    "MAX_PENDING_INPUTS",
    "MAX_PENDING_INPUT_BYTES",
    "MAX_PENDING_MESSAGES",
    "MAX_PIPELINE_BUFFER",
    "MAX_REFUSALS_LINGERING",
    "MAX_REQUEST_LINE",
    "MAX_SECRET_FILE_BYTES",
    "MAX_SEND_BACKLOG",
    "MAX_WRITER_BACKLOG",
    "METRICS_SESSION_COUNT_INTERVAL",
    "METRICS_WALK_INTERVAL",
    "METRICS_WALK_MAX_ENTRIES",
    "METRICS_WALK_MAX_SECONDS",
    "OPEN_LOGS",
    "OPS_THREADS",
    "REFUSAL_LINGER",
    "REMEMBERED_SESSIONS",
    "REMEMBERED_TURN_AGE",
    "REMEMBERED_TURN_IDS",
    "REPLAY_HOLD_BYTES",
    "REPLAY_MAX_BYTES",
    "REPLAY_MAX_EVENTS",
    "REPLAY_RING_BYTES",
    "REPLAY_RING_EVENTS",
    "REPORT_INTERVAL",
    "ROOT_CHECK_INTERVAL",
    "SECURITY_LOG_BURST",
    "SECURITY_LOG_RATE",
    "SEND_STALL_TIMEOUT",
    "SERVER_NAME",
    "SESSION_CREATE_BURST",
    "SESSION_CREATE_PER_MINUTE",
    "SESSION_CREATE_RATE",
    "SESSION_CREATE_TRACKED_ADDRESSES",
    "SESSION_WRITE_DELAY",
    "STREAM_KEEPALIVE",
    "STREAM_POLL_INTERVAL",
    "STREAM_QUEUE_BYTES",
    "MAX_STREAMS",
    "MAX_STREAMS_PER_CLIENT",
    "EVENTS_RING",
    "SHUTDOWN_GRACE",
    "WRITER_BACKLOG_POLL",
    "WRITE_BUFFER_HIGH",
    "WS_CLOSE_TIMEOUT",
    "WS_ECHO_MAX_MESSAGE",
    "WS_MAX_CLOSE_REASON",
    "WS_MAX_MESSAGE",
    "WS_MAX_SEND_BUFFER",
    "WS_PING_INTERVAL",
    "WS_PING_TIMEOUT",
]


# HTTP, connections and the server

MAX_HEAD_BYTES = 64 * 1024  # PROTOCOL.md §3: request headers over 64 KiB -> 431
MAX_REQUEST_LINE = 8192  # the most common default of popular HTTP servers; longer -> 414
MAX_HEADER_COUNT = 128  # the limit websockets applies to handshakes; more -> 431
MAX_BODY_BYTES = 1024 * 1024  # PROTOCOL.md §3: a body over 1 MiB -> 413
MAX_CHUNK_LINE = 4096  # a chunk-size line with extensions; nobody needs more
MAX_CHUNKED_OVERHEAD = 256 * 1024  # framing bytes allowed beyond the body, against 1-byte-chunk floods
MAX_INT_DIGITS = 18  # number parameters fit in 64 bits; longer strings are rejected before int()
HEADER_TIMEOUT = 10.0  # PROTOCOL.md §3: a request head not complete within 10 s -> disconnect
BODY_TIMEOUT = 30.0  # a body of at most 1 MiB arrives in 30 s even on a poor link
KEEPALIVE_TIMEOUT = 75.0  # PROTOCOL.md §3 default; the value nginx and most proxies expect of an upstream
CLOSE_LINGER = 2.0  # s a connection closing after an error keeps reading (and discarding) before it closes,
# so the kernel does not answer the peer's unread request with a reset that destroys the error response
SHUTDOWN_GRACE = 5.0  # PROTOCOL.md §1: in-flight requests get at most 5 s on SIGTERM
MAX_CONNECTIONS = 10000  # far above the 1,000 idle WebSockets we must hold; below a typical fd limit
MAX_PIPELINE_BUFFER = 256 * 1024  # unread pipelined bytes held while a handler runs; then stop reading
WRITE_BUFFER_HIGH = 4 * 1024 * 1024  # WebSocket output a peer has yet to read before its input stops being
# read: a 1 MB event fits; the bridge's own bound (WS_MAX_SEND_BUFFER) then closes a peer that stays behind
MAX_SEND_BACKLOG = 64 * 1024  # asyncio's own high-water mark: answers an HTTP peer has yet to read, beyond
# which its next pipelined request waits. Enough to keep a reading peer's socket busy; times the
# connection cap, what non-reading peers can pin (the kernel's socket buffers come on top, outside RSS).
SEND_STALL_TIMEOUT = 30.0  # s without a byte taken from a non-empty send buffer -> abort; half nginx's
# send_timeout, since a stalled peer pins a connection slot and its unsent answers meanwhile
OPS_THREADS = 8  # disk workers; OpsService serializes per session, so more only helps across sessions
GIL_SWITCH_INTERVAL = 0.0005  # s; see serve(): bounds how long a busy worker thread can delay the loop
AUTH_FAILURE_LIMIT = 10  # PROTOCOL.md §4: after 10 failures within the window ...
AUTH_FAILURE_WINDOW = 60.0  # ... of 60 s ...
AUTH_LOCKOUT = 300.0  # ... the address is locked out for 5 minutes
AUTH_TRACKED_ADDRESSES = 10000  # per table (failures, lockouts): bounded memory when an attacker rotates addresses
SESSION_CREATE_RATE = 10.0  # sessions a second per client address, sustained: far above a person or an agent
# runner at work, far below the 2,400 a second one local script made (4,800 directories a second)
SESSION_CREATE_BURST = 1000  # ... after a burst of this many: a fleet of 1,000 clients starting at once fits
SESSION_CREATE_PER_MINUTE = 3000  # all addresses together: 180,000 session directories an hour at most, whoever asks
SESSION_CREATE_TRACKED_ADDRESSES = 10000  # buckets kept; the least recently used goes first (it has refilled most)
AUDIT_ROTATE_BYTES = 16 * 1024 * 1024  # audit.log past this is renamed to audit.log.1: ~30,000 records of ~500 B
AUDIT_BACKUPS = 8  # rotated audit files kept (audit.log.1 .. .8): 144 MiB, a quarter million changes of history
AUDIT_PARAMS_BYTES = 4096  # a record's parameters, as JSON, at most: the knobs of a change, never a payload
AUDIT_VALUE_CHARS = 256  # a parameter's string value is cut to this (a description may be 2000 characters)
AUDIT_MAX_KEYS = 32  # parameters kept per record (body and query each); every route takes fewer than 8
GATEWAY_LOG_ROTATE_BYTES = 64 * 1024 * 1024  # a log file past this size is renamed to <name>.1 (Config.log_rotate_bytes)
# Seconds between the background pruner's runs when a retention policy is set (PROTOCOL.md §15): policies
# count in days, so hourly keeps a budget's overshoot to an hour's output at a cost of one scan of the root.
PRUNE_INTERVAL = 3600.0
GATEWAY_LOG_BACKUPS = 3  # rotated files kept per log (<name>.1 .. .3): 256 MiB of history each at the default size
GATEWAY_LOG_INTERVAL = 0.1  # the gateway log is written in batches this often: cheap, and near enough to live
GATEWAY_LOG_FIELD_CHARS = 256  # a logged string, JSON-escaped, is cut to this: a whole API path, not a client's 8 KiB
GATEWAY_LOG_MAX_PENDING = 50000  # records waiting for a slow disk (2.5 s of a 20k/s flood); more are counted as dropped
SECURITY_LOG_BURST = 100  # security.log takes this many records at once ...
SECURITY_LOG_RATE = 10.0  # ... then this many a second: 64 MiB takes hours of flooding, not seconds
FD_RESERVE = 16 + 4 * OPS_THREADS  # descriptors kept from connections: std streams, epoll, self-pipe, listening and
# log files, a spawning agent's pipes (16), and a directory and a file or two per disk worker
AGENT_TURN_FDS = 4  # a running agent command holds its stdin, stdout and stderr pipes, and a pidfd on 3.12+
OPEN_LOGS = 8  # session logs kept open for tails on the event loop (2 descriptors each); the recent few are what
# a console polls, and each is checked on every use, so more buys little and holds deleted files' space longer
HTTP_FD_SHARE = 4  # agent commands may take at most (1 - 1/this) of the descriptor budget: a quarter always
# stays for connections, so running turns can never lock operators (and health) out
MAX_AGENT_COMMANDS = 256  # agent commands running at once, whatever the descriptor budget: each is a process
# group with its own memory; past this a turn ends at once with an error saying to retry
MAX_WRITER_BACKLOG = 16 * 1024 * 1024  # bytes of journal and run.log waiting for the disk; past this the
# gateway stops reading agents' output (their writes block) until the writer catches up
WRITER_BACKLOG_POLL = 0.01  # s; how often a paused agent output reader looks again
MAX_REFUSALS_LINGERING = 8  # refused sockets kept open briefly so the 503 is read, not reset (taken from
# FD_RESERVE: few, since refusals happen when descriptors are short); more close at once
REFUSAL_LINGER = 0.2  # s
ACCEPT_BATCH = 100  # connections accepted per wake-up, so that a connect flood cannot starve open connections
ACCEPT_RETRY_DELAY = 0.1  # s; accepting pauses this long when accept() fails (out of descriptors): 10 tries a second
REPORT_INTERVAL = 1.0  # s; refused connections and event loop errors are reported at most this often, with a count
ROOT_CHECK_INTERVAL = 1.0  # how stale health's view of the workspaces root may be
# GET /metrics (uagw.metrics): what a scrape reads from the disk is cached, so that a scrape every second
# costs a few stat calls, not a scan of every session. Session counts may be this stale (one directory scan):
METRICS_SESSION_COUNT_INTERVAL = 5.0  # s
METRICS_WALK_INTERVAL = 60.0  # s; the bytes the workspaces root uses are walked at most this often (du-like)
# The walk stops after this many entries or seconds (reported as truncated): a root of millions of files
# costs one bounded worker-thread pass a minute, never a scrape that hangs or a worker held for minutes.
METRICS_WALK_MAX_ENTRIES = 200_000
METRICS_WALK_MAX_SECONDS = 2.0
CORS_MAX_AGE = 600  # browsers cache a preflight for 10 minutes
MAX_USER_ID_CHARS = 256  # a user id is a name; longer ones would only grow session_policy.json and logs
# Session ids that are also words of the Ops routes: a session so named could not be managed there.
RESERVED_SESSION_IDS = frozenset(("cancel",))
MAX_JSON_DEPTH = 100  # nesting accepted in any JSON we are sent; deeper is refused before it can recurse


# Defaults an operator changes through Config (environment variables or flags)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8002
DEFAULT_WORKSPACES = "AGENT_RUN_WORKSPACES"
SERVER_NAME = "ua-gateway"  # the Server header and the WebSocket handshake's
MAX_SECRET_FILE_BYTES = 64 * 1024  # a token is tens of bytes; a bigger file is the wrong file (or /dev/zero)


# WebSocket (docs/PROTOCOL.md §6)

WS_MAX_MESSAGE = 1024 * 1024  # PROTOCOL.md §6: a frame (or message) over 1 MiB closes with 1009
WS_ECHO_MAX_MESSAGE = 16 * 1024 * 1024  # PROTOCOL.md §6: the diagnostic echo route allows 16 MiB
WS_PING_INTERVAL = 20.0  # PROTOCOL.md §6: ping every 20 s ...
WS_PING_TIMEOUT = 20.0  # ... and drop a peer that has not answered within 20 s
WS_CLOSE_TIMEOUT = 10.0  # the peer has 10 s to finish the closing handshake (websockets' default)
WS_MAX_SEND_BUFFER = 8 * 1024 * 1024  # a consumer this far behind is closed with 1008, not buffered for
WS_MAX_CLOSE_REASON = 123  # RFC 6455 §5.5: a control frame carries at most 125 bytes, 2 of them the code


# Sessions and agents (docs/PROTOCOL.md §6 and §9)

MAX_CLIENT_TURN_ID = 128  # characters of a client_turn_id
REMEMBERED_TURN_IDS = 256  # completed client_turn_ids kept per session to answer duplicates
MAX_JOURNAL_LINE = 64 * 1024  # a longer event is cut in the journal (the client still gets all of it)
MAX_PENDING_MESSAGES = 32  # messages a client may send before its attach has finished
MAX_PENDING_BYTES = 4 * 1024 * 1024  # ... and their memory: one 1 MiB message at 4 bytes a character (a str
# holding one emoji takes that for each of its characters); an attach takes milliseconds
MAX_PENDING_INPUTS = 32  # input_responses the agent has not taken yet; a client may not pile up more
MAX_PENDING_INPUT_BYTES = 1024 * 1024  # ... and their memory, held as JSON text: one full-size answer; more
# waits until the agent has read it (a parsed [{}, {}, ...] would take 20 times its text)
AGENT_KILL_GRACE = 5.0  # PROTOCOL.md §6: cancel sends SIGTERM, then SIGKILL after 5 s
MAX_AGENT_LINE = 1024 * 1024  # a longer stdout/stderr line from an agent command is cut
SESSION_WRITE_DELAY = 0.01  # s: journal lines are on disk this soon after their event; batching them
# amortizes the writer thread, whose work would otherwise compete with the loop for the GIL per turn
AGENT_DRAIN_TIMEOUT = 0.2  # s: once an agent has exited, what it left in its pipes (a pipe buffer, 64 KiB by
# default) is read in microseconds; pipes silent this long are held by a child it left behind, not waited for
AGENT_GROUP_POLL = 0.05  # s between checks whether a terminated process group is gone
AGENT_EXIT_WAIT = 5.0  # s a cancelled turn waits for its agent's exit after the SIGKILL (a process in D state)
REMEMBERED_TURN_AGE = 3600.0  # s a finished client_turn_id is remembered: a client retries within minutes
REMEMBERED_SESSIONS = 256  # sessions whose finished client_turn_ids are kept, connected or not, least
# recently used dropped first: x REMEMBERED_TURN_IDS ids of at most 128 characters, 23 MiB at worst


# Live streams (PROTOCOL.md §13: SSE follow of logs, the session events stream)

STREAM_KEEPALIVE = 15.0  # s between ": keepalive" comments on an idle stream: under the 30-60 s idle timeouts
# of common proxies (nginx proxy_read_timeout 60 s, AWS ALB 60 s), so they never cut a quiet follow (Config)
STREAM_POLL_INTERVAL = 0.25  # s between the stat polls of a followed file that other writers append to: the
# issue's bound; one poll per file, shared by all its followers, so 200 followers cost what one does
STREAM_QUEUE_BYTES = 256 * 1024  # event bytes queued for one follower that reads slowly; past it that follower
# (only) gets a "resume" event and catches up by reading the file: 200 slow ones pin at most 50 MiB
MAX_STREAMS = 1024  # open streams in all (503 beyond): each holds a connection slot and a queue
MAX_STREAMS_PER_CLIENT = 256  # open streams per client address (429 beyond): a console opens a handful, the
# benchmark 200 from one address; a runaway script still cannot take every stream slot
EVENTS_RING = 4096  # session events kept for Last-Event-ID resumes: minutes of a busy gateway's changes;
# a client away longer gets a "reset" event and lists the sessions again

# Turn transcripts and replay after a reconnect (PROTOCOL.md §12).
REPLAY_RING_EVENTS = 2000  # recent events kept in memory per live session: a reconnect within a turn costs no disk
REPLAY_RING_BYTES = 2 * 1024 * 1024  # ... and their text: 200 sessions x 2 MiB at worst
# One replay sends at most this much; the rest is named in a replay_incomplete status. Half of
# WS_MAX_SEND_BUFFER, so a replay on its own never gets its client closed for being slow.
REPLAY_MAX_EVENTS = 10_000
REPLAY_MAX_BYTES = 4 * 1024 * 1024
# Live events held for a socket while its replay is read from disk; past it, the socket is closed (1008)
# with the seq to reconnect from, instead of holding memory for a client that reads nothing.
REPLAY_HOLD_BYTES = 4 * 1024 * 1024
ARCHIVE_COMPRESS_DELAY = 60.0  # s an archived log stays plain before it is gzipped (PROTOCOL.md §16): an
# operator reads an archive right after a compact or reset, and an agent may still append to the old inode


# The session index (uagw/index.py; issue 15)

INDEX_RESCAN_INTERVAL = 1.0  # s between rescans where inotify is missing: with a rescan's own time (0.1 s per
# 10,000 unchanged sessions), what other writers change shows within the 2 s the README states (up to 20,000)
INDEX_RESCAN_CPU_SHARE = 0.25  # at most this share of a core goes to rescans: a rescan of 100,000 unchanged
# sessions takes about 1 s of CPU, so without inotify they come every 4 s there, not every second
INDEX_SAFETY_RESCAN = 30.0  # s between rescans while inotify reports changes: a net for what it cannot see
# (an entry added inside an existing archive/ changes the status; an event queue overflow)
INDEX_SETTLE = 0.05  # s inotify events are gathered before re-reading: a turn's journal writes, every 10 ms, come
# as one re-read of the session, not one per line
INDEX_TURN_DELAY = 0.05  # s after a turn starts or ends before its session is re-read: its journal lines and
# heartbeat reach the disk through the writer thread just after the announcement (SESSION_WRITE_DELAY)
INDEX_ACTIVITY_INTERVAL = 1.0  # s: in the background, a busy session is re-read at most this often (a list
# re-reads every session changed since, first): at 1,500 turns a second, one re-read per turn cost more CPU
# than the turns themselves
INDEX_SCAN_BATCH = 100  # sessions the first scan reads between two of Config.index_scan_pause's pauses
INDEX_RACY_NS = 1_000_000_000  # a file changed this recently is re-read, not trusted to its mtime (git's racy rule)
