"""benchmarks/gpu_check.py, the one command for a GPU machine: its CPU dry run and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_dry_run_on_cpu_writes_the_report(tmp_path):
    out = tmp_path / "report"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--out", str(out),
         "--cohort", str(tmp_path / "missing" / "cohort.csv")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    # step 2 ran pytest -m cuda: every CUDA test collected and skipped on this machine
    assert report["cuda_tests"]["ok"] and report["cuda_tests"]["skipped"] >= 8
    assert "skipped" in (out / "pytest_cuda.log").read_text()
    # step 3: one summary line per target, every timing positive, the fast TPS path within 0.05 voxel
    assert [r["metric"].split(",")[0].split(" (")[0] for r in report["summary"]] == [
        "forward", "forward", "training", "TPS warp"
    ]  # fmt: skip
    assert all(r["reference"] > 0 and r["ours"] > 0 for r in report["summary"])
    assert report["timings"]["tps"][-1]["max_dev_voxels"] <= 0.05
    assert all(r["losses_finite"] for r in report["timings"]["training"])
    # step 4 skipped cleanly, saying why
    assert report["end_to_end"]["status"] == "skipped"
    assert "no prepared cohort" in report["end_to_end"]["reason"]
    md = (out / "gpu_check.md").read_text()
    assert "| measurement | eager fp32 (reference way) |" in md and "TPS fast path: max" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_refused_loudly(tmp_path):
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == gpu_check.EXIT_REFUSED
    assert "REFUSED: --device cuda requested but" in res.stdout
    assert "refused" in json.loads((tmp_path / "gpu_check.json").read_text())


def test_kernel_check_passes_real_cpu_kernels():
    assert gpu_check.kernel_check(torch.device("cpu")) == []


def test_kernel_check_reports_missing_kernels_and_wrong_numbers(monkeypatch):
    real_conv, real_matmul = gpu_check.F.conv3d, torch.matmul

    def conv_without_fp32_kernel(x, w, *a, **k):
        if x.dtype == torch.float32:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real_conv(x, w, *a, **k)

    def wrong_fp32_matmul(a, b):
        out = real_matmul(a, b)
        return out * 1.01 if out.dtype == torch.float32 else out

    monkeypatch.setattr(gpu_check.F, "conv3d", conv_without_fp32_kernel)
    monkeypatch.setattr(torch, "matmul", wrong_fp32_matmul)
    problems = gpu_check.kernel_check(torch.device("cpu"))
    assert any(p.startswith("fp32 conv3d 5x5x5: CUDA error: no kernel image") for p in problems)
    assert any(p.startswith("fp32 matmul: relative error") for p in problems)


def test_bad_kernels_make_the_script_refuse(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "kernel_check", lambda device: ["fp32 matmul: relative error 1e-01"])
    rc = gpu_check.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path)])
    assert rc == gpu_check.EXIT_REFUSED
    text = capsys.readouterr().out
    assert (
        "REFUSED: this torch build does not run correct kernels" in text and "Install a torch wheel" in text
    )


def test_arch_problem_names_the_missing_architecture():
    env = {"torch": "2.11", "gpu": "B200", "capability": "sm_100", "arch_list": ["sm_80", "sm_90"]}
    assert "sm_100" in gpu_check._arch_problem(env)
    assert gpu_check._arch_problem(env | {"arch_list": ["sm_90", "compute_90"]}) is None  # PTX JIT
    assert gpu_check._arch_problem(env | {"capability": "sm_90"}) is None
