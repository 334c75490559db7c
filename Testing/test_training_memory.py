"""Peak memory of training (issue 16): reported in the result, the log and the summary, and the
augmented set is streamed without mapping it into the process's resident set."""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest
from test_augmented_set import _write
from test_training import sphere_set, tiny_config

from DeepSSMLogic.augment.dataset import AugmentedSet
from DeepSSMLogic.training import LOG_NAME, cpu_bf16_features, peak_memory, train


def test_peak_memory_is_reported_per_epoch_and_in_the_summary(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = train(tiny_config(epochs=2), sphere_set(12, 0), sphere_set(4, 1), tmp_path, image_transform=None)
    mem = result.summary()["peak_memory"]
    assert result.summary()["precision"] == {
        "autocast": "fp32",
        "device": "cpu",
        "cpu_bf16": cpu_bf16_features(),
    }
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    assert before - 0.1 <= mem["rss_mb"] <= after + 0.1  # this process's ru_maxrss, MiB
    assert 20 < mem["rss_mb"] < 64 * 1024 and mem["cuda_max_allocated_mb"] is None  # CPU run
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    per_epoch = [h["peak_rss_mb"] for h in log]
    assert len(per_epoch) == 2 and per_epoch == sorted(per_epoch) and per_epoch[-1] <= mem["rss_mb"]


def test_peak_memory_reads_cuda_only_on_a_cuda_device():
    assert peak_memory("cpu")["cuda_max_allocated_mb"] is None
    assert peak_memory()["rss_mb"] > 0


@pytest.mark.slow  # writes an augmented set (TPS warps)
def test_augmented_samples_are_read_without_the_memory_map(tmp_path):
    out = _write(tmp_path / "aug", n=6)
    ds = AugmentedSet(out)
    images = np.load(out / "images.npy", mmap_mode="r")
    for i in (0, 5, -1):
        img, _pts = ds[i]
        np.testing.assert_array_equal(img[0].numpy(), images[i])
    assert ds._images is None  # never mapped: mapped pages would count in the resident set


def test_cpu_bf16_features_are_detected_not_assumed():
    assert cpu_bf16_features("flags : fpu avx2 avx512f avx512_bf16 amx_tile") == ["avx512_bf16"]
    assert cpu_bf16_features("flags : fpu avx2 amx_bf16 amx_tile avx512_bf16") == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_features("flags : fpu avx2") == []
