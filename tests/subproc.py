"""Commands run by tests, in their own process group, that never outlive their test: on a
timeout or any interruption (pytest-timeout, Ctrl-C) the whole process tree is killed,
grandchildren included: torchrun's workers run in sessions of their own, out of reach of the
group's kill, and an orphaned one would hold the output pipes open."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the name (state, ppid, ...), or None when it is gone (or
    not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; none found elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        fields = proc_stat(int(entry))
        if fields is None:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_group(proc: subprocess.Popen) -> None:
    below = _descendants(proc.pid)  # before the kill: orphans are re-parented away from the tree
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(
    cmd: list[str], timeout: float, cwd: Path | str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `cmd` to completion, text output captured; a timeout is an AssertionError with the
    command's last output."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the tree holds the pipes
            out, err = "", "(the output pipes stayed open after the kill)"
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
