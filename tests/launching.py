"""Run `accelerate launch` (or any command) from a test; if it hangs, say where.

On timeout every process of the launch gets SIGABRT first: with PYTHONFAULTHANDLER set, each Python
process (the launcher and every rank) prints all its threads' stacks before dying, and the failure shows
them. A bare `subprocess.run(timeout=...)` kills only the launcher with SIGKILL and shows nothing.
"""

import os
import signal
import subprocess

import pytest


def run_launch(command: list[str], env: dict[str, str], timeout: float, cwd: str | None = None
               ) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = signal_group(process, signal.SIGABRT, wait=15)
    else:
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    pytest.fail(f"{' '.join(command[-3:])} did not finish in {timeout:.0f} s; the stacks of its processes:\n"
                f"{stacks[-12000:]}", pytrace=False)


def signal_group(process: subprocess.Popen, sig: int, wait: float) -> str:
    """Send `sig` to the whole process group, give it `wait` seconds, then kill what is left; the output."""
    try:
        os.killpg(process.pid, sig)
        _, stderr = process.communicate(timeout=wait)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, stderr = process.communicate()
    return stderr or ""
