"""Test-only hooks: a named pause where a test SIGKILLs a writer, and a barrier that starts parallel workers
together. Unset (outside tests) both do nothing."""

from __future__ import annotations

import os
import socket
import time

PAUSE_ENV = "LORASUM_TEST_PAUSE"  # "train" (after the first optimizer step) or "write[:PART]" (temp file written,
PAUSE_MARKER_ENV = "LORASUM_TEST_PAUSE_MARKER"  # not yet renamed; PART: a substring of the target path)
BARRIER_ENV = "LORASUM_TEST_BARRIER"  # "DIR:N": N processes meet in DIR before they start work


def pause_for_test(point: str, target: str = "", holding: str = "") -> None:
    """Test-only: with LORASUM_TEST_PAUSE naming this point, write the marker file (its text: `holding`, else
    `target`, else this process's pid) and sleep, so a test can SIGKILL the process exactly here. Once the marker
    exists, later arrivals pass (a retried job is not paused again). Unset (outside tests) it does nothing."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    name, _, part = want.partition(":")
    if name != point or part not in target:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker and os.path.exists(marker):
        return  # one pause per marker: a job retried after the kill runs through
    if marker:
        tmp = f"{marker}.{os.getpid()}.tmp"  # two workers can arrive at once: each its own temp, the first link wins
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(holding or target or str(os.getpid()))
        try:
            os.link(tmp, marker)
        except FileExistsError:
            return  # another process holds the pause; this one runs through
        finally:
            os.unlink(tmp)
    deadline = time.monotonic() + 600  # a test that never kills still ends
    while time.monotonic() < deadline:
        time.sleep(0.05)


def barrier_for_test() -> None:
    """Test-only: with LORASUM_TEST_BARRIER=DIR:N, wait until N processes (this one included) have arrived, so a
    test of parallel workers does not depend on which one finished starting first. Unset it does nothing."""
    want = os.environ.get(BARRIER_ENV)
    if not want:
        return
    folder, _, n = want.rpartition(":")
    open(os.path.join(folder, f"{socket.gethostname()}.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
        time.sleep(0.02)
