"""Subcommands of the ``deepssm`` CLI: each module has ``add_parser(subparsers)``; the parser it
adds sets ``run=<callable(args) -> int>`` through ``set_defaults``.

This package module holds what several subcommands share: the ``--device`` option and the
progress bars on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from ..progress import ProgressCallback, ProgressEvent

DEVICE_HELP = "auto (default), cpu, cuda or cuda:N"


def add_device_option(
    parser: argparse.ArgumentParser, default: str = "auto", help: str = DEVICE_HELP
) -> None:
    """``--device``: where the network runs (``auto`` picks CUDA when present)."""
    parser.add_argument("--device", default=default, help=help)


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace existing *files* this command did not write (folders never are;
    see docs/ERRORS.md)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files at the output that deepssm did not write (a folder is never deleted)",
    )


def tqdm_progress(disable: bool = False) -> tuple[ProgressCallback, Any]:
    """A progress callback drawing one tqdm bar per stage; returns ``(callback, close)``."""
    from tqdm import tqdm

    state: dict[str, Any] = {"stage": None, "bar": None}

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    def report(event: ProgressEvent) -> None:
        if disable:
            return
        if event.stage != state["stage"] or state["bar"] is None or state["bar"].total != event.total:
            close()
            state["stage"] = event.stage
            state["bar"] = tqdm(total=event.total, desc=event.stage, unit="", leave=False, file=sys.stderr)
        bar = state["bar"]
        bar.n = event.done
        if event.metrics:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.metrics.items()}
            bar.set_postfix(shown, refresh=False)
        elif event.message:
            bar.set_postfix_str(event.message[:40], refresh=False)
        bar.refresh()

    return report, close


@contextlib.contextmanager
def progress_bars(disable: bool = False) -> Iterator[ProgressCallback]:
    """:func:`tqdm_progress` for the duration of a ``with`` block; the last bar is closed on exit,
    also when the block raises."""
    report, close = tqdm_progress(disable=disable)
    try:
        yield report
    finally:
        close()
