"""Background work for the Slicer module: a subprocess that streams JSON progress lines.

Qt-free on purpose. The widget owns a ``qt.QTimer`` that calls :meth:`BackgroundRunner.poll`
every ~100 ms, so the GUI never blocks on the child; tests drive ``poll`` directly with a fake
:class:`ProcessProtocol` (no real process, no Slicer).

Wire protocol (one JSON object per line on the child's stdout; stderr is merged in):

- ``{"type": "progress", "stage", "done", "total", "message", "metrics"}`` — a
  :class:`DeepSSMLogic.progress.ProgressEvent` (``ProgressEvent.to_json``);
- ``{"type": "log", "message"}`` — a line for the log box;
- ``{"type": "result", ...}`` — the payload handed to the finished callback;
- ``{"type": "error", "message", "error_class", "details"}`` — a failure the user should read.

Any other line (tracebacks, warnings from libraries) is kept as a plain log line.
"""

from __future__ import annotations

import enum
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from DeepSSMLogic.progress import ProgressEvent

#: Exit status the worker uses for :class:`DeepSSMLogic.errors.DeepSSMError` (same as the CLI).
EXIT_USER_ERROR = 2
#: Exit status for a cancelled operation (same as the CLI).
EXIT_CANCELLED = 130


class ProcessProtocol(Protocol):
    """What the runner needs from a child process; tests inject a fake."""

    def start(self, args: Sequence[str], env: Mapping[str, str] | None, cwd: str | None) -> None:
        """Launch ``args``; must not block."""

    def read_lines(self) -> list[str]:
        """Output lines (without newline) produced since the last call; never blocks."""

    def poll(self) -> int | None:
        """The exit status once the process has ended, else None."""

    def kill_tree(self) -> None:
        """Terminate the process and every process it started."""


class SubprocessProcess:
    """:class:`ProcessProtocol` over :class:`subprocess.Popen` with a reader thread.

    The child gets its own process group (POSIX) so that :meth:`kill_tree` also stops the
    DataLoader workers or other grandchildren it spawned; on Windows ``taskkill /T`` does that.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self, args: Sequence[str], env: Mapping[str, str] | None, cwd: str | None) -> None:
        kwargs: dict[str, Any] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True
        else:  # pragma: no cover - Windows only
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        self._proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            **kwargs,
        )
        self._reader = threading.Thread(target=self._read, name="DeepSSM-runner-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._proc.stdout.close()

    def read_lines(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def poll(self) -> int | None:
        if self._proc is None:
            return None
        code = self._proc.poll()
        if code is None:
            return None
        # Report the end only once the reader has drained the pipe, so no line is lost.
        if self._reader is not None and self._reader.is_alive():
            self._reader.join(timeout=0.05)
            if self._reader.is_alive():
                return None
        return code

    def kill_tree(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if os.name == "posix":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:  # pragma: no cover - Windows only
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )


class RunState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class RunOutcome:
    """How a run ended. ``error``/``details`` are set when ``state`` is FAILED."""

    state: RunState
    returncode: int | None
    result: dict[str, Any] | None
    error: str | None
    details: str | None
    elapsed_s: float
    log: list[str] = field(default_factory=list)


def parse_line(line: str) -> dict[str, Any] | None:
    """The protocol message in ``line``, or None for a plain log line."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        msg = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(msg, dict) or msg.get("type") not in ("progress", "log", "result", "error"):
        return None
    return msg


def event_from_message(msg: Mapping[str, Any]) -> ProgressEvent:
    """A :class:`ProgressEvent` from a ``{"type": "progress", ...}`` message (lenient on extras)."""
    return ProgressEvent(
        stage=str(msg.get("stage", "")),
        done=int(msg.get("done", 0)),
        total=int(msg.get("total", 0)),
        message=str(msg.get("message", "")),
        metrics=dict(msg.get("metrics") or {}),
    )


class BackgroundRunner:
    """Runs one child process at a time and turns its output into callbacks.

    Call :meth:`start`, then :meth:`poll` periodically (from a GUI timer) until it returns False.
    Callbacks run inside :meth:`poll`, i.e. on the GUI thread, so they may touch MRML nodes.
    """

    def __init__(
        self,
        process_factory: Callable[[], ProcessProtocol] = SubprocessProcess,
        clock: Callable[[], float] = time.monotonic,
        max_log_lines: int = 5000,
    ) -> None:
        self._factory = process_factory
        self._clock = clock
        self._max_log = max_log_lines
        self.on_progress: list[Callable[[ProgressEvent], None]] = []
        self.on_log: list[Callable[[str], None]] = []
        self.on_finished: list[Callable[[RunOutcome], None]] = []
        self._reset()
        self.state = RunState.IDLE

    def _reset(self) -> None:
        self._process: ProcessProtocol | None = None
        self._log: deque[str] = deque(maxlen=self._max_log)
        self._result: dict[str, Any] | None = None
        self._error: dict[str, Any] | None = None
        self._cancel_requested = False
        self._t0 = 0.0
        self._t_end: float | None = None
        self._stage: str | None = None
        self._stage_t0 = 0.0
        self.last_event: ProgressEvent | None = None
        self.outcome: RunOutcome | None = None

    # -- control ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    def start(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        """Launch ``args``. Raises RuntimeError if a run is already in progress."""
        if self.running:
            raise RuntimeError("a DeepSSM background task is already running; cancel it first")
        self._reset()
        self._process = self._factory()
        self._t0 = self._clock()
        self.state = RunState.RUNNING
        try:
            self._process.start(list(args), env, str(cwd) if cwd is not None else None)
        except OSError as e:
            self._finish(RunState.FAILED, None, f"could not start the background process: {e}", repr(args))
            raise

    def cancel(self) -> None:
        """Kill the child and its descendants; the run ends as CANCELLED at the next :meth:`poll`."""
        if self.running and self._process is not None:
            self._cancel_requested = True
            self._process.kill_tree()

    def poll(self) -> bool:
        """Dispatch new output; returns True while the run is still going."""
        if not self.running or self._process is None:
            return False
        for line in self._process.read_lines():
            self._handle_line(line)
        code = self._process.poll()
        if code is None:
            return True
        for line in self._process.read_lines():  # anything written just before exit
            self._handle_line(line)
        self._conclude(code)
        return False

    # -- timing -------------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        if self.state is RunState.IDLE:
            return 0.0
        end = self._t_end if self._t_end is not None else self._clock()
        return max(0.0, end - self._t0)

    def eta_s(self) -> float | None:
        """Seconds left in the current stage, extrapolated from its progress so far; None if unknown."""
        ev = self.last_event
        if not self.running or ev is None or ev.total <= 0 or ev.done <= 0:
            return None
        spent = self._clock() - self._stage_t0
        frac = min(1.0, ev.done / ev.total)
        return max(0.0, spent * (1.0 - frac) / frac)

    @property
    def log(self) -> list[str]:
        return list(self._log)

    # -- internals ----------------------------------------------------------------------------
    def _handle_line(self, line: str) -> None:
        msg = parse_line(line)
        if msg is None:
            self._append_log(line)
            return
        kind = msg["type"]
        if kind == "progress":
            try:
                event = event_from_message(msg)
            except (TypeError, ValueError):
                self._append_log(line)
                return
            if event.stage != self._stage:
                self._stage = event.stage
                self._stage_t0 = self._clock()
            self.last_event = event
            for cb in self.on_progress:
                cb(event)
            if event.message:
                self._append_log(f"[{event.stage} {event.done}/{event.total}] {event.message}")
        elif kind == "log":
            self._append_log(str(msg.get("message", "")))
        elif kind == "result":
            self._result = {k: v for k, v in msg.items() if k != "type"}
        else:  # error
            self._error = msg
            self._append_log(f"ERROR: {msg.get('message', '')}")

    def _append_log(self, line: str) -> None:
        self._log.append(line)
        for cb in self.on_log:
            cb(line)

    def _conclude(self, code: int) -> None:
        if self._cancel_requested or code == EXIT_CANCELLED:
            self._finish(RunState.CANCELLED, code, None, None)
        elif code == 0 and self._error is None:
            self._finish(RunState.SUCCEEDED, code, None, None)
        else:
            if self._error is not None:
                message = str(self._error.get("message") or "the background task failed")
                details = str(self._error.get("details") or "")
            else:
                message = f"the background task exited with status {code}"
                details = ""
            tail = "\n".join(list(self._log)[-60:])
            details = (details + "\n\n--- log (last lines) ---\n" + tail).strip()
            self._finish(RunState.FAILED, code, message, details)

    def _finish(self, state: RunState, code: int | None, error: str | None, details: str | None) -> None:
        self._t_end = self._clock()
        self.state = state
        self.outcome = RunOutcome(
            state=state,
            returncode=code,
            result=self._result if state is RunState.SUCCEEDED else None,
            error=error,
            details=details,
            elapsed_s=self.elapsed_s,
            log=list(self._log),
        )
        for cb in self.on_finished:
            cb(self.outcome)


# -- launching the worker -------------------------------------------------------------------------
def logic_root() -> Path:
    """The directory that holds the ``DeepSSMLogic`` package (repo root or qt-scripted-modules)."""
    import DeepSSMLogic

    return Path(DeepSSMLogic.__file__).resolve().parent.parent


def worker_script() -> Path:
    """Path of the worker script run in the child process."""
    return Path(__file__).resolve().with_name("worker.py")


def worker_command(
    python: str | os.PathLike[str] | None, subcommand: str, options: Sequence[str]
) -> list[str]:
    """The argv that runs ``worker.py SUBCOMMAND OPTIONS`` with ``python`` (default: this Python)."""
    return [str(python or sys.executable), "-u", str(worker_script()), subcommand, *options]


def worker_environment(device: str = "auto", base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Child environment: DeepSSMLogic importable, unbuffered output, CPU forced when asked.

    ``device`` is "auto", "cpu" or "cuda[:N]". For "cpu" the GPUs are hidden from torch
    (``CUDA_VISIBLE_DEVICES=-1``) so nothing allocates CUDA memory by accident.
    """
    env = dict(os.environ if base is None else base)
    root = str(logic_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # ITK_AUTOLOAD_PATH is not touched here: Slicer's launcher would put it back into
    # PythonSlicer's environment; the worker removes it itself before importing SimpleITK.
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env
