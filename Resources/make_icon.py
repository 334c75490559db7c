"""Draw Resources/Icons/DeepSSM.png (128x128): an image slice with a shape outline and its
correspondence particles. Run: python Resources/make_icon.py  (needs matplotlib)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def make_icon(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    y, x = np.mgrid[-1:1:128j, -1:1:128j]
    r = np.sqrt((x / 0.72) ** 2 + (y / 0.55) ** 2)
    ax.imshow(1.0 / (1.0 + np.exp((r - 1.0) * 10.0)), cmap="gray", extent=(-1, 1, -1, 1), vmin=-0.3, vmax=1.4)
    t = np.linspace(0, 2 * np.pi, 200)
    wobble = 1.0 + 0.08 * np.sin(3 * t)
    ax.plot(0.72 * wobble * np.cos(t), 0.55 * wobble * np.sin(t), color="#35b779", lw=3)
    tp = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    wp = 1.0 + 0.08 * np.sin(3 * tp)
    ax.scatter(
        0.72 * wp * np.cos(tp),
        0.55 * wp * np.sin(tp),
        s=28,
        color="#ff8c1a",
        edgecolors="white",
        linewidths=0.6,
        zorder=3,
    )
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "Icons" / "DeepSSM.png"
    )
    print(make_icon(target))
