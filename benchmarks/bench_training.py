"""Base-DeepSSM forward latency and training throughput at the paper's 118×69×88 grid.

In ONE run: the eager fp32 baseline (contiguous NCDHW, how the reference implementation runs) vs our
configured path (channels_last_3d and/or bf16 autocast, chosen per device), on random inputs with
the real architecture (valid convolutions, 20 modes, 1024 particles). Prints a table; peak memory is
the process max RSS so far on CPU (cumulative over rows) and ``torch.cuda.max_memory_allocated`` on CUDA.

    .venv/bin/python benchmarks/bench_training.py [--device cpu|cuda] [--batch 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from _common import best_time, peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.losses import correspondence_l2
from DeepSSMLogic.networks import BaseDeepSSM

SHAPE_ZYX = (88, 69, 118)


def _net(device: torch.device, channels_last: bool) -> BaseDeepSSM:
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3 * 1024, 20, dtype=torch.float64))
    net = BaseDeepSSM(SHAPE_ZYX, 20, torch.randn(1024, 3) * 30, q.T, torch.zeros(20), torch.ones(20)).to(
        device
    )
    if channels_last:
        net.to(memory_format=torch.channels_last_3d)
    return net


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def measure(
    device: torch.device, channels_last: bool, bf16: bool, batch: int, steps: int
) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    net = _net(device, channels_last)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x1 = torch.randn(1, 1, *SHAPE_ZYX, device=device).contiguous(memory_format=fmt)
    xb = torch.randn(batch, 1, *SHAPE_ZYX, device=device).contiguous(memory_format=fmt)
    target = torch.randn(batch, 1024, 3, device=device) * 30

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(x1)

    net.eval()
    fwd = best_time(forward, device, repeats=5)
    # accuracy of this path vs fp32 on the same weights (particles, mm)
    with torch.no_grad():
        ref = _net(device, False).eval()(x1.contiguous())[1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x1)[1]
    max_dev = float((out.float() - ref).abs().max())

    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-5)
    net.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = correspondence_l2(net(xb)[1], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = best_time(step, device, repeats=steps)
    return {
        "forward_ms": fwd * 1e3,
        "step_ms": t_step * 1e3,
        "samples_s": batch / t_step,
        "peak_mb": _peak_mb(device),
        "max_dev_mm": max_dev,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="also time bf16 autocast on CPU (very slow on CPUs without AMX / AVX512-BF16); always on for CUDA",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    configs = [("eager fp32 (baseline)", False, False), ("channels_last_3d fp32", True, False)]
    if device.type == "cuda" or args.bf16:
        configs.append(("channels_last_3d + bf16 autocast", True, True))
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"grid {SHAPE_ZYX[2]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[0]}, batch {args.batch}"
    )
    print(
        f"| configuration | forward b=1 (ms) | train step b={args.batch} (ms) | samples/s | peak MB | max dev vs fp32 (mm) |"
    )
    print("|---|---|---|---|---|---|")
    for label, cl, bf in configs:
        r = measure(device, cl, bf, args.batch, args.steps)
        print(
            f"| {label} | {r['forward_ms']:.1f} | {r['step_ms']:.0f} | {r['samples_s']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['max_dev_mm']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
