"""Training cost against the reference grid's voxel count (issue 16: the automatic default spacing).

In ONE run, for each encoder (paper, light) and cubic grid (default 32³, 40³, 48³, 64³): seconds
per training sample (forward + backward + Adam step, batch 8, Base-DeepSSM, 20 modes, 512
particles, ``same`` padding, random data: the cost does not depend on the values) and the projected
time of one epoch of 200 samples. The CPU default voxel budget of ``pipeline.auto_grid_spacing``
is picked from this table.

    .venv/bin/python benchmarks/bench_grid_budget.py [--sizes 32 40 48 64] [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
from _common import best_time, peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.losses import correspondence_l2
from DeepSSMLogic.networks import BaseDeepSSM, count_parameters


def seconds_per_sample(encoder: str, n: int, batch: int, steps: int, bf16: bool = False) -> tuple[float, int]:
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3 * 512, 20, dtype=torch.float64))
    net = BaseDeepSSM(
        (n, n, n),
        20,
        torch.randn(512, 3) * 30,
        q.T,
        torch.zeros(20),
        torch.ones(20),
        conv_padding="same",
        encoder=encoder,
    )
    with torch.no_grad():
        net.encoder.fc[-1].weight.normal_(0, 0.1)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch, 1, n, n, n)
    target = torch.randn(batch, 512, 3) * 30
    net.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = correspondence_l2(net(x)[1], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return best_time(step, torch.device("cpu"), repeats=steps) / batch, count_parameters(net)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 40, 48, 64])
    p.add_argument("--encoders", nargs="+", default=["light", "paper"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=("fp32", "bf16"),
        help="bf16: CPU autocast (AVX512-BF16/AMX)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, load average at start {os.getloadavg()[0]:.1f}"
    )
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    print(
        f"CPU bf16 flags: {sorted(flags & {'avx512_bf16', 'amx_bf16', 'amx_tile'}) or 'none'}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print("\n| encoder | grid | voxels | parameters | precision | s / sample | epoch of 200 samples (s) |")
    print("|---|---|---:|---:|---|---:|---:|")
    for enc in args.encoders:
        for n in args.sizes:
            for prec in args.precision:  # interleaved: the load drifts less between the two
                t, params = seconds_per_sample(enc, n, args.batch, args.steps, prec == "bf16")
                print(f"| {enc} | {n}³ | {n**3} | {params} | {prec} | {t:.3f} | {200 * t:.0f} |", flush=True)
    print(f"\npeak RSS {peak_rss_mb():.0f} MiB; load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
