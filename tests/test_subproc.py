"""The tests' subprocess runner: a timeout ends the whole process tree, including processes in
sessions of their own (as torchrun starts its workers), and returns promptly."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
import subproc


def _alive(pid: int) -> bool:
    fields = subproc.proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_timeout_kills_a_grandchild_in_a_session_of_its_own(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    child = textwrap.dedent(
        f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(g.pid))
        time.sleep(120)
        """
    )
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 15 s"):
        subproc.run([sys.executable, "-c", child], timeout=15)
    # the grandchild holds the output pipes: had it survived, the runner would have waited it out
    assert time.monotonic() - start < 60
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
