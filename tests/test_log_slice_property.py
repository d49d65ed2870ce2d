"""Property: a follower of a log gets every complete line of every file generation once, in order.

A state machine appends random UTF-8 text in chunks that split lines and multi-byte
characters, rotates the log by rename (the new file sometimes already longer than the
follower's offset) or truncates it in place, and reads it with random limits. The
follower drains the file (reads while ``more``) before each rotation or truncation, as
PROTOCOL.md §5.11 rule 5 expects of a reader that wants to miss nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ops_service import read_log_slice

# The writer ends a line once it is FORCE_NEWLINE_AFTER bytes long; one append adds at most
# 2 * 24 characters of 4 bytes, so a line never reaches MIN_MAX_BYTES and is never cut:
# the follower's lines can be compared with the writer's one for one.
FORCE_NEWLINE_AFTER = 60
MIN_MAX_BYTES = 300
TEXT = st.text(alphabet=st.sampled_from("ab \r\n\t€é😀\x00"), max_size=24)


def expected_lines(content: bytes) -> list:
    complete = content[: content.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    return [(line[:-1] if line.endswith(b"\r") else line).decode("utf-8", "replace") for line in lines]


class LogFollower(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="slice-property-"))
        self.log = self.directory / "run.log"
        self.generation = 0
        self.content = b""  # what the writer put in the current file generation
        self.carry = b""  # the second half of a chunk, written by the next append
        self.received: list = []  # what the follower got from the current generation
        self.expect_reset = False
        # The follower starts before the log exists, from the empty slice's cursor.
        self.cursor = read_log_slice(self.log)["cursor"]
        self.start_generation(prefill=b"")

    def teardown(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- writer ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        with self.log.open("ab") as handle:
            handle.write(data)
        self.content += data

    def start_generation(self, prefill: bytes) -> None:
        # Each generation opens with a line whose first byte differs from the previous
        # generation's: a rewrite that reproduces the old bytes exactly is, by design,
        # indistinguishable from an append.
        header = b"%c%d\n" % (ord("A") + self.generation % 26, self.generation)
        self.content = b""
        self.received = []
        self.carry = b""
        self.write(header + prefill)

    @rule(text=TEXT, split=st.integers(min_value=0, max_value=200))
    def append(self, text: str, split: int) -> None:
        data = self.carry + text.encode("utf-8")
        cut = split % (len(data) + 1)
        self.carry = data[cut:]
        self.write(data[:cut])
        if len(self.content) - self.content.rfind(b"\n") > FORCE_NEWLINE_AFTER:
            self.write(b"\n")

    # -- reader ------------------------------------------------------------------------

    def read_once(self, limit: int, max_bytes: int) -> dict:
        result = read_log_slice(self.log, self.cursor, limit=limit, max_bytes=max_bytes)
        assert result["reset"] is self.expect_reset
        assert result["truncated"] is False
        assert len(result["lines"]) <= limit
        self.expect_reset = False
        self.received += result["lines"]
        self.cursor = result["cursor"]
        assert self.received == expected_lines(self.content)[: len(self.received)]
        return result

    def drain(self, limit: int, max_bytes: int) -> None:
        while self.read_once(limit, max_bytes)["more"]:
            pass
        assert self.received == expected_lines(self.content)

    @rule(limit=st.integers(min_value=1, max_value=6), max_bytes=st.integers(MIN_MAX_BYTES, 1500))
    def read(self, limit: int, max_bytes: int) -> None:
        self.read_once(limit, max_bytes)

    @rule(limit=st.integers(min_value=1, max_value=6), max_bytes=st.integers(MIN_MAX_BYTES, 1500))
    def drain_now(self, limit: int, max_bytes: int) -> None:
        self.drain(limit, max_bytes)

    # -- rotation and truncation -------------------------------------------------------

    def prefill(self, longer: bool) -> bytes:
        if not longer:
            return b""
        # Already longer than everything the follower has read of the old generation.
        line = b"prefilled line\n"
        return line * (len(self.content) // len(line) + 2)

    @rule(limit=st.integers(min_value=1, max_value=6), longer=st.booleans())
    def rotate(self, limit: int, longer: bool) -> None:
        self.drain(limit, MIN_MAX_BYTES)
        os.replace(self.log, self.directory / "run.log.1")
        self.generation += 1
        self.start_generation(self.prefill(longer))
        self.expect_reset = True

    @rule(limit=st.integers(min_value=1, max_value=6), longer=st.booleans())
    def truncate(self, limit: int, longer: bool) -> None:
        self.drain(limit, MIN_MAX_BYTES)
        os.truncate(self.log, 0)
        self.generation += 1
        self.start_generation(self.prefill(longer))
        self.expect_reset = True

    @precondition(lambda self: not self.expect_reset)
    @invariant()
    def never_ahead_of_the_writer(self) -> None:
        assert len(self.received) <= len(expected_lines(self.content))


LogFollower.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
test_follower_gets_every_complete_line_once_in_order = LogFollower.TestCase
