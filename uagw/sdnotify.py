"""systemd's readiness protocol, sd_notify(3), with the standard library's socket module: ``Notifier``
tells the service manager ``READY=1`` once the gateway listens, ``STOPPING=1`` when it stops, and,
while the unit has ``WatchdogSec=``, ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` from a task on the
event loop (a loop that hangs stops the pings, and systemd restarts the gateway).

Rules this module keeps: it never fails the gateway. Without ``NOTIFY_SOCKET`` it does nothing; a socket
that is gone, refuses, or is full loses that one message, reported once on stderr, and serving goes on.

May import: the standard library only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Mapping, Optional, Union

__all__ = ["Notifier", "WATCHDOG_FRACTION", "watchdog_interval"]

# sd_watchdog_enabled(3): "it is recommended that a daemon sends a keep-alive notification message to the
# service manager every half of the time returned here": one lost or late ping is not a restart.
WATCHDOG_FRACTION = 0.5


def watchdog_interval(environ: Mapping[str, str]) -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` messages, or None: no watchdog is set, or it is for another process
    (``WATCHDOG_PID``, sd_watchdog_enabled(3)), or the variable is not a positive integer."""
    usec = _decimal(environ.get("WATCHDOG_USEC", ""))
    pid = environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and _decimal(pid) != os.getpid():
        return None
    return usec / 1_000_000 * WATCHDOG_FRACTION


def _decimal(text: str) -> Optional[int]:
    """``text`` as ASCII decimal digits, or None. str.isdigit alone admits "²" (int() refuses it), and int()
    refuses over 4300 digits on 3.11+: garbage in the environment must not stop the gateway."""
    if not (0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()):
        return None
    return int(text)


_MAX_DIGITS = 20  # a 64-bit unsigned integer, what systemd writes for WATCHDOG_USEC and WATCHDOG_PID


def _address(value: str) -> Optional[Union[str, bytes]]:
    """The AF_UNIX address of ``NOTIFY_SOCKET``: a path, or ``@name`` for Linux's abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])  # as the environment gave it: undecodable bytes round-trip
    return None


class Notifier:
    """Sends sd_notify messages to ``address`` (None: a notifier that does nothing). Event loop or any one
    thread; ``notify`` never raises and never blocks (a full socket loses the message)."""

    def __init__(self, address: Optional[Union[str, bytes]]) -> None:
        self.address = address
        self.sent = 0
        self.failed = 0
        self._socket: Optional[socket.socket] = None
        self._reported = False
        self._watchdog: Optional["asyncio.Task[None]"] = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        value = environ.get("NOTIFY_SOCKET", "")
        address = _address(value)
        notifier = cls(address)
        if value and address is None:
            notifier._report(f"NOTIFY_SOCKET={value!r} is neither a path nor an @abstract name; "
                             "systemd is not told that the gateway is ready")
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignment.replace("\n", " ") for assignment in assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited (PEP 446)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            self.failed += 1
            self._close()  # a new socket for the next message: the manager may be back by then
            self._report(f"cannot notify systemd at NOTIFY_SOCKET ({exc.strerror or exc}); serving goes on")
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping: finishing requests in flight") -> bool:
        self.stop_watchdog()
        return self.notify("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self, environ: Mapping[str, str] = os.environ) -> Optional[float]:
        """Send ``WATCHDOG=1`` every ``watchdog_interval`` from now on, on the running loop; the interval, or None."""
        interval = watchdog_interval(environ)
        if interval is None or self.address is None or self._watchdog is not None:
            return None
        self._watchdog = asyncio.get_running_loop().create_task(self._keep_alive(interval))
        return interval

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        self._close()

    async def _keep_alive(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _report(self, problem: str) -> None:
        if not self._reported:
            self._reported = True
            print(f"ua-gateway: warning: {problem}", file=sys.stderr, flush=True)
