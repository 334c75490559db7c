"""One progress/cancel mechanism for every long operation.

Producers call ``report(ProgressEvent(...))``; the CLI turns events into tqdm bars, the Slicer
runner into JSON lines on stdout (see :func:`json_line_reporter`). ``CancelToken`` is checked
between units of work (samples, batches, epochs).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from .errors import CancelledError


@dataclass
class ProgressEvent:
    """A unit of progress. ``stage`` names the operation (e.g. "augment", "train", "predict")."""

    stage: str
    done: int
    total: int
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def to_json(self) -> str:
        return json.dumps({"type": "progress", **asdict(self)}, allow_nan=False, default=float)


ProgressCallback = Callable[[ProgressEvent], None]


def null_progress(event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""


def json_line_reporter(stream: TextIO = sys.stdout) -> ProgressCallback:
    """A callback that writes one JSON object per event and flushes (read by the Slicer runner)."""

    def report(event: ProgressEvent) -> None:
        stream.write(event.to_json() + "\n")
        stream.flush()

    return report


class CancelToken:
    """Thread-safe cancellation flag; ``check()`` raises :class:`CancelledError` once cancelled."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise CancelledError("cancelled by the user")
