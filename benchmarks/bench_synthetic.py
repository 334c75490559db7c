"""Speed of one synthetic subject (``DeepSSMLogic.synthetic.make_subject``): image, segmentation,
mesh and particles. Targets: < 1 s at the default 64³ and < 3 s at the paper's 118×69×88 (1.25 mm),
per family, best of ``--repeats`` on CPU. Exit status 1 when a target is missed.

    .venv/bin/python benchmarks/bench_synthetic.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from _common import best_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.synthetic import FAMILIES, make_subject

CASES = (("64³ @ 1.5 mm", (64, 64, 64), 1.5, 1.0), ("118×69×88 @ 1.25 mm", (118, 69, 88), 1.25, 3.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cpu = torch.device("cpu")
    missed = 0
    print("| family | grid | seconds (best) | target | met |\n|---|---|---|---|---|")
    for family in FAMILIES:
        for label, size, spacing, target in CASES:
            t = best_time(
                lambda f=family, z=size, sp=spacing: make_subject(
                    f, np.random.default_rng(3), image_size=z, spacing=sp
                ),
                cpu,
                args.repeats,
            )
            met = t < target
            missed += not met
            print(f"| {family} | {label} | {t:.3f} | < {target:g} s | {'yes' if met else '**no**'} |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
