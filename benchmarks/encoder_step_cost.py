"""CPU cost of one training step per image encoder (issue 16), all encoders in one run.

One step = batch forward + L2 loss on the particles + backward + Adam step of a Base-DeepSSM with the
given encoder, on random inputs of the grid's size. Reports process CPU seconds per step (all
threads; a shared machine's other jobs change it far less than the wall-clock) and wall seconds,
averaged over ``--steps`` steps after one warm-up step. The default grid is the one the automatic
spacing picks for the 30-subject 64³ cohort of the "≤ 10 minutes" target (56×46×42 voxels).

    python benchmarks/encoder_step_cost.py                       # paper light light2, 1 thread
    python benchmarks/encoder_step_cost.py --encoders light light2 --threads 2 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def step_cost(encoder: str, shape_zyx: tuple[int, int, int], batch: int, steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per training step, mean over ``steps`` after one warm-up step."""
    from DeepSSMLogic.networks import BaseDeepSSM

    torch.manual_seed(0)
    net = BaseDeepSSM(shape_zyx, 12, n_particles=256, conv_padding="same", encoder=encoder)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-3)
    x, y = torch.randn(batch, 1, *shape_zyx), torch.randn(batch, 256, 3)

    def step() -> None:
        _, particles = net(x)
        loss = ((particles - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    return (time.process_time() - c0) / steps, (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    from DeepSSMLogic.networks import encoder_names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", nargs="+", choices=encoder_names(), default=["paper", "light", "light2"])
    p.add_argument("--grid", nargs=3, type=int, default=[56, 46, 42], metavar=("X", "Y", "Z"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steady on a busy machine)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.grid[2], args.grid[1], args.grid[0])
    print(f"grid {args.grid[0]}×{args.grid[1]}×{args.grid[2]}, batch {args.batch_size}, {args.threads} thread(s), "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    rows = {e: step_cost(e, shape, args.batch_size, args.steps) for e in args.encoders}
    base = rows[args.encoders[0]][0]
    print(f"\n| encoder | CPU s/step | wall s/step | CPU ÷ {args.encoders[0]} |\n|---|---:|---:|---:|")
    for e, (cpu, wall) in rows.items():
        print(f"| {e} | {cpu:.2f} | {wall:.2f} | {cpu / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
