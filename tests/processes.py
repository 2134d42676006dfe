"""Helpers for tests that start real server processes."""

import subprocess


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server process, killing it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
