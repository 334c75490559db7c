"""Writing outputs safely: atomic writes, the output-path policy, free-space checks.

* :func:`atomic_path`: a crash or an error never leaves a half-written file or directory behind;
  an existing *directory* is replaced only when the caller verified it is its own (``replace_dir``)
  or it is empty. Orphans of killed writes (``.<name>.<pid>.<random>.tmp``) are cleaned by the
  next write of the same target.
* :func:`check_replace_target` / :func:`check_output_dir`: the output-path policy every command
  applies before its first expensive step (see ``docs/ERRORS.md``): an existing output is replaced
  only if this command wrote it or it is empty; a foreign file only with ``--overwrite``; a foreign
  non-empty directory never.
* :func:`require_free_space`, ENOSPC → :class:`~DeepSSMLogic.errors.DiskFullError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DeepSSMError, DiskFullError, OutputExistsError, OutputPathError

PathLike = str | os.PathLike[str]
Recogniser = Callable[[Path], bool]

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
# An opaque library error (torch's inline_container, ITK's "could not write") with less than this
# left on the device is reported as a full disk.
_NEARLY_FULL_BYTES = 16 << 20
_LEGACY_ORPHAN_AGE_S = 600.0
_BACKUP = ".old"


# -- free space -------------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: PathLike) -> int | None:
    """Free bytes on the file system that holds ``path`` (or would hold it); None when unknown."""
    try:
        anchor = _existing_ancestor(Path(path))
        if anchor.is_file():
            anchor = anchor.parent
        return int(shutil.disk_usage(anchor).free)
    except OSError:
        return None


def require_free_space(path: PathLike, needed: int, what: str = "") -> None:
    """Raise :class:`DiskFullError` when ``needed`` bytes (an estimate) exceed the free space."""
    if needed <= 0:
        return
    free = free_bytes(path)
    if free is not None and needed > free:
        raise DiskFullError(path, int(needed), free, f" for {what}" if what else "")


def is_disk_full(exc: BaseException, where: PathLike | None = None) -> bool:
    """Whether ``exc`` means the device is full: ENOSPC/EDQUOT/EFBIG, or a library's opaque write
    error (torch, ITK) while almost nothing is left on the device of ``where``."""
    if isinstance(exc, DeepSSMError):
        return False
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if where is not None and isinstance(exc, OSError | RuntimeError):
        free = free_bytes(where)
        return free is not None and free < _NEARLY_FULL_BYTES
    return False


def disk_full_error(exc: BaseException, path: PathLike, needed: int | None = None) -> DiskFullError:
    """The :class:`DiskFullError` for a write of ``path`` that failed with ``exc``."""
    return DiskFullError(path, needed, free_bytes(path), f" (the write failed: {_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -- directories and orphans -----------------------------------------------------------------------
def ensure_parent(target: Path) -> None:
    """Create ``target``'s parent folders; a file in the way is an :class:`OutputPathError`."""
    parent = target.parent
    anchor = _existing_ancestor(parent)
    if not anchor.is_dir():
        raise OutputPathError(f"{target}: cannot create it: {anchor} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(f"{target}: cannot create it: {parent} is a file, not a folder") from None
    except PermissionError:
        raise OutputPathError(f"{target}: cannot create {parent}: permission denied") from None
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, parent) from None
        raise OutputPathError(f"{target}: cannot create {parent} ({_first_line(e)})") from None


def _is_empty_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink() and next(p.iterdir(), None) is None
    except OSError:
        return False


def _listing(p: Path, k: int = 5) -> str:
    try:
        names = sorted(c.name + ("/" if c.is_dir() else "") for c in p.iterdir())
    except OSError:
        return "unreadable"
    more = f", … ({len(names)} entries)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    if sys.platform == "win32":  # no cheap liveness check there: rely on age
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


_scanned_dirs: set[str] = set()


def clean_orphans(target: PathLike, force: bool = False) -> list[Path]:
    """Remove temporary folders that killed writes left in ``target``'s folder.

    Only folders named like :func:`atomic_path`'s (``.<name>.<pid>.<random>.tmp``) whose process is
    gone (or, for the older ``.<name>.<random>.tmp`` form and on Windows, older than 10 minutes), and
    which hold nothing but the half-written ``<name>`` and the ``.old`` backup, are touched. A backup
    whose target is missing (a kill between the two renames of a replace) is put back first. Each
    folder is scanned once per process (``force`` to rescan): a folder of many outputs costs one
    listing, not one per write.
    """
    parent = Path(target).parent
    key = os.path.abspath(parent)
    if key in _scanned_dirs and not force:
        return []
    _scanned_dirs.add(key)
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for entry in entries:
        p = Path(entry.path)
        for name, pid in _orphan_readings(entry.name):
            if pid is not None and sys.platform != "win32" and not _process_gone(pid):
                break  # possibly a live writer's: leave it
            if _remove_orphan(p, parent / name, pid):
                removed.append(p)
                break
    return removed


def _orphan_readings(folder_name: str) -> list[tuple[str, int | None]]:
    """Every ``(target name, pid)`` a temporary folder name can be read as (a name may hold dots
    and digits, so ``.a.5.x.tmp`` has two readings); the contents check picks the true one."""
    readings: list[tuple[str, int | None]] = []
    core = folder_name[1 : -len(".tmp")]
    head, _, rand = core.rpartition(".")
    if not head or not re.fullmatch(r"[A-Za-z0-9_]{8}", rand):
        return readings
    name, _, pid = head.rpartition(".")
    if name and pid.isdigit():
        readings.append((name, int(pid)))
    readings.append((head, None))
    return readings


def _remove_orphan(p: Path, target: Path, pid: int | None) -> bool:
    try:
        if p.is_symlink() or not p.is_dir():
            return False
        age = time.time() - p.stat().st_mtime
        contents = {c.name for c in p.iterdir()}
    except OSError:
        return False
    if not contents <= {target.name, _BACKUP}:
        return False
    gone = _process_gone(pid) if pid is not None and sys.platform != "win32" else age > _LEGACY_ORPHAN_AGE_S
    if not gone:
        return False
    if _BACKUP in contents and not target.exists() and not target.is_symlink():
        os.replace(p / _BACKUP, target)
    shutil.rmtree(p, ignore_errors=True)
    return True


# -- atomic writes ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(
    target: PathLike, replace_dir: Recogniser | None = None, needed: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    Works for files and directories: whatever the body creates at the yielded path replaces
    ``target`` when the block exits without an exception, and is deleted otherwise. An existing
    directory at ``target`` is replaced only if it is empty or ``replace_dir(target)`` says it is
    this caller's own; otherwise :class:`OutputExistsError` is raised before the body runs and
    nothing is touched. A full disk during the body or the rename is a :class:`DiskFullError`
    (``needed``: the size being written, bytes, for its message).
    """
    target = Path(target)
    ensure_parent(target)
    clean_orphans(target)
    _check_replaceable(target, replace_dir)
    try:
        tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
        )
    except PermissionError:
        raise OutputPathError(f"{target}: cannot write in {target.parent}: permission denied") from None
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, target) from None
        raise
    tmp = tmp_dir / target.name
    try:
        try:
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"atomic write of {target} produced nothing")
            _check_replaceable(target, replace_dir)  # it may have appeared while the body ran
            if target.exists() and not target.is_symlink() and (target.is_dir() or tmp.is_dir()):
                os.replace(target, tmp_dir / _BACKUP)  # removed with tmp_dir below
            os.replace(tmp, target)
        except Exception as e:
            if is_disk_full(e, target.parent):
                raise disk_full_error(e, target, needed) from e
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _check_replaceable(target: Path, replace_dir: Recogniser | None) -> None:
    if target.is_symlink() or not target.is_dir() or _is_empty_dir(target):
        return
    if replace_dir is not None and replace_dir(target):
        return
    raise OutputExistsError(
        target,
        f"a folder is in the way (holds {_listing(target)})",
        "deepssm never deletes a folder it did not write: choose another output name or move it away",
    )


def atomic_write_bytes(target: PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``target`` atomically, after checking the free space for it."""
    require_free_space(Path(target).parent, len(data), str(Path(target).name))
    with atomic_path(target, needed=len(data)) as tmp, open(tmp, "wb") as f:
        write_all(f, data)


def atomic_write_text(target: PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(target: PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_all(f: Any, data: bytes | memoryview) -> None:
    """The one place bulk bytes reach a file (so faults can be injected in tests)."""
    f.write(data)


def write_at(path: PathLike, offset: int, data: bytes | memoryview) -> None:
    """Overwrite ``len(data)`` bytes of an existing file at ``offset`` with ordinary writes (a full
    disk raises :class:`DiskFullError`, never SIGBUS as a write through a memory map would)."""
    try:
        with open(path, "r+b") as f:
            f.seek(offset)
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, path, len(data)) from None
        raise


def preallocate(path: PathLike, size: int) -> None:
    """Reserve ``size`` bytes for ``path`` on disk (``posix_fallocate``), so later writes into the
    file cannot run out of space; where the call is missing, the size is written out as zeros."""
    try:
        with open(path, "r+b") as f:
            if hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(f.fileno(), 0, size)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                        raise
            block = bytes(1 << 20)
            f.seek(0)
            for start in range(0, size, len(block)):
                write_all(f, block[: min(len(block), size - start)])
            f.flush()
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, path, size) from None
        raise


def save_torch(obj: Any, target: PathLike) -> int:
    """``torch.save`` to ``target`` atomically; returns the size in bytes.

    Serialised in memory first, so a full disk is an ordinary ENOSPC (→ :class:`DiskFullError`
    with the exact size needed), not torch's opaque ``inline_container`` error.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    atomic_write_bytes(target, data)
    return len(data)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- recognising what deepssm wrote ----------------------------------------------------------------
def read_json_object(path: Path, limit: int = 64 << 20) -> dict[str, Any] | None:
    """A small JSON object file, or None when missing, too large, invalid or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_bundle(path: Path) -> bool:
    """A DeepSSM model bundle: a folder or a zip whose model.json says ``format: deepssm-bundle``."""
    if path.is_dir():
        meta = read_json_object(path / "model.json")
        return meta is not None and meta.get("format") == "deepssm-bundle"
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("model.json")
            if info.file_size > 64 << 20:
                return False
            meta = json.loads(zf.read(info).decode("utf-8"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == "deepssm-bundle"


def is_augmented_set(path: Path) -> bool:
    """An augmented set written by ``deepssm augment`` (its augmentation.json)."""
    meta = read_json_object(path / "augmentation.json")
    return meta is not None and meta.get("format") == "deepssm-augmented-set"


def is_synthetic_cohort(path: Path) -> bool:
    """A cohort written by ``deepssm synth``: synthetic.json (with its family) and cohort.csv."""
    meta = read_json_object(path / "synthetic.json")
    return meta is not None and "family" in meta and (path / "cohort.csv").is_file()


def json_marker(name: str, *keys: str) -> Recogniser:
    """A recogniser for files of a results folder: the folder's ``name`` (a JSON object this
    command writes) has all ``keys``."""

    def owned(p: Path) -> bool:
        meta = read_json_object(p.parent / name)
        return meta is not None and all(k in meta for k in keys)

    return owned


# -- the output-path policy ------------------------------------------------------------------------
def _check_writable_location(path: Path, flag: str) -> None:
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise OutputPathError(f"{flag} {path}: cannot be created: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: cannot be created: no permission to write in {anchor}")


def check_replace_target(
    path: PathLike,
    recognise: Recogniser,
    what: str,
    *,
    overwrite: bool = False,
    flag: str = "--out",
    needed_bytes: int = 0,
    overwrite_flag: str | None = "--overwrite",
) -> Path:
    """Check an output that will be replaced as a whole (a model bundle, a synthetic cohort).

    Allowed: nothing there, an empty folder, or something ``recognise`` says is a ``what``; a
    foreign *file* only with ``overwrite``. A foreign non-empty folder is never replaced. Also
    checks that the location can be written and has ``needed_bytes`` free. Returns the path.
    """
    p = Path(path)
    _check_writable_location(p, flag)
    if p.is_dir() and not p.is_symlink():
        if not _is_empty_dir(p) and not recognise(p):
            raise OutputExistsError(
                p,
                f"{flag} is a folder that is not a {what} (it holds {_listing(p)})",
                "deepssm never deletes a folder it did not write, not even with --overwrite: "
                f"choose another {flag} (for example a new folder name) or move this one away",
            )
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {p}: no permission to replace it")
    elif p.exists() or p.is_symlink():
        if not overwrite and not recognise(p):
            raise OutputExistsError(
                p,
                f"{flag} is an existing file that is not a {what}",
                (
                    f"pass {overwrite_flag} to replace it, or choose another {flag}"
                    if overwrite_flag
                    else f"choose another {flag} or move the file away"
                ),
            )
    require_free_space(p, needed_bytes, what)
    return p


def check_output_dir(
    path: PathLike,
    writes: Iterable[str] = (),
    owned: Recogniser | None = None,
    *,
    overwrite: bool = False,
    flag: str = "--out",
    needed_bytes: int = 0,
) -> Path:
    """Check a folder that a command writes files *into* (predictions, reports, an augmented set).

    The folder itself is never deleted and may hold other things. Each name in ``writes`` (file
    names; a trailing ``/`` marks a sub-folder written into) that already exists must be this
    command's own (``owned(path_of_it)``) or, for files, ``overwrite`` must be given; a folder where
    a file will be written is always refused. Returns the folder path.
    """
    d = Path(path)
    _check_writable_location(d, flag)
    if d.exists() and not d.is_dir():
        raise OutputExistsError(d, f"{flag} is a file, not a folder", f"choose another {flag}")
    if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {d}: no permission to write in this folder")
    foreign: list[str] = []
    in_the_way: list[str] = []
    for name in writes:
        sub = name.endswith("/")
        p = d / name.rstrip("/")
        if not (p.exists() or p.is_symlink()):
            continue
        if sub:
            if not p.is_dir():
                in_the_way.append(f"{p.name} (a file where a folder goes)")
        elif p.is_dir() and not p.is_symlink():
            in_the_way.append(f"{p.name}/ (a folder where a file goes)")
        elif not overwrite and not (owned is not None and owned(p)):
            foreign.append(p.name)
    if in_the_way:
        raise OutputExistsError(
            d,
            f"{flag} holds {', '.join(in_the_way[:5])}",
            "deepssm never deletes what it did not write, not even with --overwrite: "
            f"rename or move it, or choose another {flag}",
        )
    if foreign:
        more = f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise OutputExistsError(
            d,
            f"{flag} already holds {', '.join(foreign[:5])}{more}, not written by this command",
            f"pass --overwrite to replace these files, or choose another {flag}",
        )
    require_free_space(d, needed_bytes)
    return d
