"""Run `accelerate launch` (or any command) from a test; if it hangs, say where.

On timeout every process of the launch gets SIGABRT first: with PYTHONFAULTHANDLER set, each Python
process (the launcher and every rank) prints all its threads' stacks before dying, and the failure shows
them. A bare `subprocess.run(timeout=...)` kills only the launcher with SIGKILL and shows nothing.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TWO_PROCESSES = os.path.join(ROOT, "recipes", "accelerate", "cpu_2proc.yaml")


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def two_process_command(script: str, *args: str) -> list[str]:
    """`accelerate launch` of ``script`` on two CPU processes (gloo) on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", TWO_PROCESSES,
            "--main_process_port", free_port(), script, *args]


def run_two_process_worker(worker: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``tests/<worker>`` on two processes (the tests' helpers importable); fail the test, with its output,
    unless it succeeds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": TESTS + os.pathsep + ROOT}
    result = run_launch(two_process_command(os.path.join(TESTS, worker), *args), env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


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
