"""Offscreen render (EGL, no display) of a DeepSSM result scene through Slicer's displayable
managers: volume slice, predicted particles, heatmap mesh and colour legend. The same code writes
docs/screenshot.png (``python Testing/slicer_scene.py``), which the README shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_scene as ss

PIL = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slicer


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(PIL.open(path).convert("RGB")).astype(np.int32)


def _content_masks(img: np.ndarray) -> dict[str, np.ndarray]:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    chroma = img.max(axis=-1) - img.min(axis=-1)
    # Slicer's default 3D background is a blue-violet gradient with r close to g
    background = (b > r + 20) & (b > g + 20) & (b > 120) & (abs(r - g) < 25)
    particles = (r > 180) & (g > 60) & (g < 170) & (b < 90)  # orange glyphs
    return {
        "background": background,
        "particles": particles,
        "heatmap": (chroma > 40) & ~background & ~particles,  # colour-mapped surface (any colour)
        "slice": (chroma < 12) & (r < 110),  # grey image slice (dark background)
    }


def test_result_scene_renders_offscreen(tmp_path):
    png = ss.render_result_png(tmp_path / "shot.png", tmp_path / "result", size=(480, 320))
    img = _rgb(png)
    assert img.shape == (320, 480, 3)
    masks = _content_masks(img)
    total = img.shape[0] * img.shape[1]
    assert masks["background"].sum() < 0.9 * total, "the render is (almost) only background"
    for part, min_fraction in (("particles", 0.002), ("heatmap", 0.01), ("slice", 0.01)):
        assert masks[part].sum() > min_fraction * total, f"no {part} visible in the render"


def test_readme_screenshot_is_the_rendered_scene():
    shot = ss.REPO / "docs" / "screenshot.png"
    assert shot.is_file(), "run `python Testing/slicer_scene.py` to write docs/screenshot.png"
    img = _rgb(shot)
    masks = _content_masks(img)
    total = img.shape[0] * img.shape[1]
    assert img.shape[:2] == (640, 960)
    for part in ("particles", "heatmap", "slice"):
        assert masks[part].sum() > 0.002 * total, f"docs/screenshot.png shows no {part}"
    readme = ss.REPO / "README.md"
    if readme.is_file():
        assert "docs/screenshot.png" in readme.read_text(encoding="utf-8")
