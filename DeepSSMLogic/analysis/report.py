"""A small self-contained HTML report: headings, paragraphs, tables and figures (PNG files next to
the report, referenced by relative paths). Written atomically."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileutil import atomic_write_text

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: .6em 1em .6em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; max-width: 720px; }
.note { color: #555; font-size: .9em; }
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


class Report:
    """Collects sections, then :meth:`write` renders ``report.html`` into ``out_dir``. Figures must
    live under ``out_dir``; they are referenced relative to it so the folder can be moved."""

    def __init__(self, title: str, out_dir: str | os.PathLike[str]) -> None:
        self.title = title
        self.out_dir = Path(out_dir)
        self._parts: list[str] = []
        self.figures: list[Path] = []

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        if not rows:
            return
        cols = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows
        )
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def key_values(self, values: Mapping[str, Any]) -> None:
        self.table([{"quantity": k, "value": v} for k, v in values.items()], ["quantity", "value"])

    def figure(self, path: str | os.PathLike[str], caption: str = "") -> None:
        p = Path(path)
        if not p.is_file() or p.stat().st_size == 0:
            raise InputError(f"report: figure {p} does not exist or is empty")
        try:
            rel = p.resolve().relative_to(self.out_dir.resolve())
        except ValueError:
            raise InputError(f"report: figure {p} must lie inside the report folder {self.out_dir}") from None
        self.figures.append(p)
        src = html.escape(rel.as_posix(), quote=True)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(caption or rel.name)}"></a>{cap}</figure>'
        )

    def html(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>\n" + "\n".join(self._parts) + "\n</body></html>\n"
        )

    def write(self, name: str = "report.html") -> Path:
        target = self.out_dir / name
        atomic_write_text(target, self.html())
        return target
