"""Commands run by tests, in their own process group, that never outlive their test: on a
timeout or any interruption (pytest-timeout, Ctrl-C) the whole group is killed, grandchildren
(torchrun workers, tokenizer processes) included."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
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
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
