"""Starting and stopping the local processes by PID, with PID files and readiness waits.

Used by `sluice stack`, `sluice demo` and the test fixtures alike, so they start
and stop things the same way. Each process gets its own session (a terminal's
Ctrl-C does not reach it), a log file and a PID file in the run directory. Stop
sends SIGTERM, waits, then SIGKILL, and only ever signals a PID whose command
line still matches what was started (PIDs get reused).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import SluiceError


class ProcessError(SluiceError):
    """A local process could not be started, or died during start-up (the message has its log's tail)."""


@dataclass
class ManagedProcess:
    name: str
    pid: int
    argv: list[str]
    log_path: Path
    pid_path: Path
    # Set when this process started it: then we can reap it and read its exit status.
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _matches(self.pid, self.argv)

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        except FileNotFoundError:
            return "(no log)"


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.decode(errors="replace").rstrip("\0").split("\0") if raw else None


def _matches(pid: int, argv: Sequence[str]) -> bool:
    """Running, not a zombie, and still the program we started: the same executable and, unless
    the program rewrote its title (redis-server does), the same first arguments."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        exe = os.readlink(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") or exe != os.path.realpath(argv[0]):
        return False
    cmdline = _cmdline(pid) or []
    return len(cmdline) < 3 or cmdline[1:3] == list(argv[1:3])


def start(
    name: str,
    argv: Sequence[str],
    run_dir: Path,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log"
    pid_path = run_dir / f"{name}.pid"
    existing = read(name, run_dir)
    if existing is not None and existing.alive():
        raise ProcessError(f"{name} is already running as PID {existing.pid}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    pid_path.write_text(f"{proc.pid}\n" + "\0".join(argv))
    return ManagedProcess(name, proc.pid, list(argv), log_path, pid_path, popen=proc)


def read(name: str, run_dir: Path) -> ManagedProcess | None:
    pid_path = run_dir / f"{name}.pid"
    try:
        pid_text, _, argv_text = pid_path.read_text().partition("\n")
    except FileNotFoundError:
        return None
    return ManagedProcess(name, int(pid_text), argv_text.split("\0"), run_dir / f"{name}.log", pid_path)


def wait_ready(process: ManagedProcess, check: Callable[[], bool], timeout_s: float) -> None:
    """Poll `check` until it passes; fail early, with the log's tail, if the process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if not process.alive():
            raise ProcessError(f"{process.name} exited during start-up. Log tail:\n{process.log_tail()}")
        time.sleep(0.05)
    raise ProcessError(f"{process.name} not ready after {timeout_s:.0f}s. Log tail:\n{process.log_tail()}")


def stop(process: ManagedProcess, timeout_s: float = 15.0) -> bool:
    """SIGTERM, wait up to timeout_s, then SIGKILL. Returns whether it stopped gracefully."""
    graceful = True
    if process.alive():
        os.kill(process.pid, signal.SIGTERM)
        if not _wait_gone(process, timeout_s):
            graceful = False
            if process.alive():
                os.kill(process.pid, signal.SIGKILL)
            _wait_gone(process, 5.0)
    process.pid_path.unlink(missing_ok=True)
    return graceful


def kill(process: ManagedProcess) -> None:
    """SIGKILL at once: the crash that the delivery guarantees are about."""
    if process.alive():
        os.kill(process.pid, signal.SIGKILL)
        _wait_gone(process, 5.0)
    process.pid_path.unlink(missing_ok=True)


def _wait_gone(process: ManagedProcess, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():  # for our own child, alive() also reaps it
            return True
        time.sleep(0.02)
    return not process.alive()
