"""Recent model bundles, the demo bundle and the sample-data manifest (Qt-free).

The manifest ``Resources/SampleData/manifest.json`` lists each demo file with its SHA256; files
are checked before use so a truncated or edited demo never reaches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.fileutil import atomic_write_json, sha256_file

from .install import resource_path

MANIFEST = "SampleData/manifest.json"


class RecentBundles:
    """Most-recent-first list of bundle paths kept in a small JSON file (e.g. next to Slicer's
    settings); paths that no longer exist are dropped when read."""

    def __init__(self, store: str | Path, max_items: int = 8) -> None:
        self.store = Path(store)
        self.max_items = max_items

    def items(self) -> list[str]:
        try:
            data = json.loads(self.store.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return []
        return [p for p in data if isinstance(p, str) and Path(p).exists()][: self.max_items]

    def add(self, path: str | Path) -> list[str]:
        p = str(Path(path).resolve())
        items = [p] + [q for q in self.items() if q != p]
        atomic_write_json(self.store, items[: self.max_items])
        return items[: self.max_items]


def read_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The sample-data manifest (``files``: name -> {sha256, role, ...})."""
    p = Path(path) if path else resource_path(MANIFEST)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: cannot read the sample-data manifest ({e})") from None
    if not isinstance(doc.get("files"), dict):
        raise InputError(f"{p}: the manifest has no 'files' table")
    return doc


def verified_sample_file(role: str, manifest_path: str | Path | None = None) -> Path:
    """Path of the demo file with ``role`` ("image", "ground_truth", "bundle") after checking its
    SHA256 against the manifest; raises InputError when missing or modified."""
    mpath = Path(manifest_path) if manifest_path else resource_path(MANIFEST)
    doc = read_manifest(mpath)
    for name, info in doc["files"].items():
        if info.get("role") == role:
            f = mpath.parent / name
            if not f.is_file():
                raise InputError(
                    f"demo file {f} is missing; regenerate it with: {doc.get('regenerate', 'see the README')}"
                )
            actual = sha256_file(f)
            if actual != info.get("sha256"):
                raise InputError(f"demo file {f}: SHA256 {actual[:12]}… does not match the manifest")
            return f
    raise InputError(f"{mpath}: no demo file with role {role!r}")
