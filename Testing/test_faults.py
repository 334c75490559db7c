"""Fault injection: output paths that are not ours, full disks, corrupt bundles, absurd grids.

Each case is one the issue-11 probe found (data loss, SIGBUS, raw tracebacks, wrong blame). A full
disk is simulated by making the one write primitive, ``posix_fallocate`` or ``shutil.disk_usage``
report ``ENOSPC`` / little space (mounting a small file system is impossible here). "Before the
first expensive step" is shown by making that step fail loudly if it is ever reached.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_cohort import write_tiny_cohort
from helpers_predict import make_tiny_bundle, phantom_image
from test_augmented_set import _model_and_sampler, _training

from DeepSSMLogic import fileutil, io
from DeepSSMLogic.augment.dataset import write_augmented_set
from DeepSSMLogic.bundle import MODEL_JSON, _content_digest, load_bundle, read_bundle_meta
from DeepSSMLogic.cli import main
from DeepSSMLogic.errors import (
    BundleError,
    DiskFullError,
    InputError,
    IntensityRangeWarning,
    OutputExistsError,
    OutputPathError,
)
from DeepSSMLogic.fileutil import atomic_path, atomic_write_text, is_bundle, save_torch
from DeepSSMLogic.pipeline import reference_grid
from DeepSSMLogic.predict import warn_if_outside_training_range
from DeepSSMLogic.preprocess import IntensityNormalizer
from DeepSSMLogic.training import load_checkpoint


class Evil:
    """A pickled object of this class is code a weights-only load must refuse."""

    def __init__(self, x: int):
        self.x = x


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_temp_leftovers(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")]


class _Reached(Exception):
    """Raised by a patched expensive step: the checks before it passed."""


@pytest.fixture
def no_expensive_step(monkeypatch):
    """Make reading the training images (the first expensive step of train) raise ``_Reached``."""

    def reached(*a, **k):
        raise _Reached

    monkeypatch.setattr("DeepSSMLogic.pipeline.prepare_training_arrays", reached)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("faults") / "model")


@pytest.fixture
def cohort(tmp_path) -> Path:
    manifest, _ = write_tiny_cohort(tmp_path / "cohort", n=5, splits=["train"] * 4 + ["test"])
    return manifest


# -- output paths: never delete what is not ours ---------------------------------------------------
def test_train_out_is_the_cohort_folder_refused_and_untouched(cohort, capsys, no_expensive_step):
    before = _tree(cohort.parent)
    rc = main(["train", str(cohort), "--out", str(cohort.parent), "--quiet", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not a DeepSSM model bundle" in err and "never deletes" in err and "cohort.csv" in err
    assert _tree(cohort.parent) == before


def test_train_out_existing_file_refused_before_training(cohort, tmp_path, capsys, no_expensive_step):
    target = tmp_path / "notes.zip"
    target.write_text("mine")
    rc = main(["train", str(cohort), "--out", str(target), "--quiet"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert target.read_text() == "mine"
    # with --overwrite the checks pass and training would start
    with pytest.raises(_Reached):
        main(["train", str(cohort), "--out", str(target), "--quiet", "--overwrite"])


def test_train_out_under_a_file_refused(cohort, tmp_path, capsys, no_expensive_step):
    (tmp_path / "afile").write_text("x")
    rc = main(["train", str(cohort), "--out", str(tmp_path / "afile" / "model"), "--quiet"])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_atomic_path_never_removes_an_unverified_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="never deletes"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
    assert (target / "precious.txt").read_text() == "keep"
    # verified as ours: replaced; an empty folder: replaced
    with atomic_path(target, replace_dir=lambda p: (p / "precious.txt").exists()) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_write_text(empty, "a file where an empty folder was")
    assert empty.read_text().startswith("a file")
    assert _no_temp_leftovers(tmp_path)


def test_save_bundle_replaces_a_bundle_but_not_a_folder(tmp_path):
    path = make_tiny_bundle(tmp_path / "m", seed=1)
    make_tiny_bundle(path, seed=2)  # an earlier bundle is ours: replaced
    assert is_bundle(path) and load_bundle(path).meta["format"] == "deepssm-bundle"
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "scan.nrrd").write_text("not a model")
    with pytest.raises(OutputExistsError, match=r"scan\.nrrd"):
        make_tiny_bundle(foreign)
    assert (foreign / "scan.nrrd").read_text() == "not a model"


def test_predict_name_clash_with_a_folder_refused(bundle_dir, tmp_path, capsys):
    img = tmp_path / "case.nrrd"
    io.write_image(phantom_image(noise=0.0), img)
    out = tmp_path / "pred"
    (out / "case.particles").mkdir(parents=True)
    (out / "case.particles" / "mine.txt").write_text("keep")
    rc = main(
        ["predict", str(bundle_dir), str(img), "--out", str(out), "--no-align", "--quiet", "--overwrite"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "case.particles/" in err and "never deletes" in err
    assert (out / "case.particles" / "mine.txt").read_text() == "keep"


def test_predict_replaces_its_own_files_and_refuses_foreign_ones(bundle_dir, tmp_path, capsys):
    img = tmp_path / "case.nrrd"
    io.write_image(phantom_image(noise=0.0), img)
    out = tmp_path / "pred"
    args = ["predict", str(bundle_dir), str(img), "--out", str(out), "--no-align", "--quiet"]
    assert main(args) == 0
    assert main(args) == 0  # a rerun replaces its own predictions
    other = tmp_path / "other"
    other.mkdir()
    (other / "case.particles").write_text("1 2 3\n")
    rc = main(args[:4] + [str(other), "--no-align", "--quiet"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (other / "case.particles").read_text() == "1 2 3\n"
    assert main(args[:4] + [str(other), "--no-align", "--quiet", "--overwrite"]) == 0
    assert io.read_particles(other / "case.particles").shape[0] == 64


def test_predict_out_under_a_file_refused_before_loading(tmp_path, capsys, monkeypatch):
    img = tmp_path / "case.nrrd"
    io.write_image(phantom_image(noise=0.0), img)
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr("DeepSSMLogic.predict.load_bundle", lambda *a, **k: pytest.fail("bundle loaded"))
    rc = main(["predict", str(tmp_path / "nomodel"), str(img), "--out", str(tmp_path / "f" / "o"), "--quiet"])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_predict_out_read_only_refused(tmp_path, capsys):
    img = tmp_path / "case.nrrd"
    io.write_image(phantom_image(noise=0.0), img)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["predict", str(tmp_path / "m"), str(img), "--out", str(ro / "o"), "--quiet"])
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "permission" in capsys.readouterr().err


def test_evaluate_refuses_foreign_files_with_its_names(bundle_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "DeepSSMLogic.analysis.evaluation.evaluate_model", lambda *a, **k: pytest.fail("evaluation ran")
    )
    out = tmp_path / "results"
    out.mkdir()
    (out / "subjects.csv").write_text("my own table\n")
    rc = main(["evaluate", str(bundle_dir), str(tmp_path / "c.csv"), "--out", str(out), "--quiet"])
    assert rc == 2 and "subjects.csv" in capsys.readouterr().err
    assert (out / "subjects.csv").read_text() == "my own table\n"


def test_synth_never_replaces_a_cohort_it_did_not_write(cohort, capsys):
    before = _tree(cohort.parent)
    rc = main(["synth", "--family", "femur", "--n", "2", "--out", str(cohort.parent), "--quiet"])
    assert rc == 2 and "not a synthetic cohort" in capsys.readouterr().err
    assert _tree(cohort.parent) == before


def test_augment_refuses_a_foreign_folder_before_resampling(cohort, capsys, monkeypatch):
    monkeypatch.setattr(
        "DeepSSMLogic.pipeline.prepare_training_arrays", lambda *a, **k: pytest.fail("reached")
    )
    rc = main(["augment", str(cohort), "--n", "2", "--out", str(cohort.parent), "--quiet"])
    assert rc == 2 and "not an augmented set" in capsys.readouterr().err


def test_orphan_temp_of_a_killed_write_is_cleaned_next_time(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "checkpoint.pt"
    orphan = tmp_path / f".checkpoint.pt.{dead.pid}.abcd1234.tmp"
    orphan.mkdir()
    (orphan / "checkpoint.pt").write_bytes(b"half")
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}.abcd5678.tmp"  # a live writer: left alone
    alive.mkdir()
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not orphan.exists() and alive.exists()


def test_orphan_of_an_interrupted_replace_restores_the_previous_version(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "model"
    orphan = tmp_path / f".model.{dead.pid}.abcd1234.tmp"
    (orphan / ".old").mkdir(parents=True)
    (orphan / ".old" / "model.json").write_text("{}")
    fileutil.clean_orphans(target, force=True)
    assert (target / "model.json").read_text() == "{}" and not orphan.exists()


# -- checkpoints -------------------------------------------------------------------------------------
def test_train_existing_checkpoint_needs_resume_or_restart(cohort, tmp_path, capsys, no_expensive_step):
    out = tmp_path / "m"
    ckpt = tmp_path / "m.work" / "training" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"an earlier run")
    rc = main(["train", str(cohort), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--restart" in err
    assert ckpt.read_bytes() == b"an earlier run"
    for flag in ("--resume", "--restart"):
        with pytest.raises(_Reached):
            main(["train", str(cohort), "--out", str(out), "--quiet", flag])
    assert main(["train", str(cohort), "--out", str(out), "--quiet", "--resume", "--restart"]) == 2


def test_corrupt_checkpoint_message_advises_restart_and_never_unsafe_loading(tmp_path):
    torch.save({"a": torch.zeros(100)}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "pickle.pt").write_bytes(b"garbage" * 10)
    torch.save({"x": Evil(1)}, tmp_path / "evil.pt")
    for name in ("trunc.pt", "pickle.pt", "evil.pt"):
        with pytest.raises(InputError) as e:
            load_checkpoint(tmp_path / name)
        assert "--restart" in str(e.value)
        assert "weights_only" not in str(e.value) and "trust" not in str(e.value)


def test_bundle_weights_error_never_repeats_unsafe_advice(bundle_dir, tmp_path):
    d = shutil.copytree(bundle_dir, tmp_path / "b")
    torch.save({"x": Evil(1)}, d / "weights.pt")
    _refresh_digests(d)
    with pytest.raises(BundleError) as e:
        load_bundle(d)
    assert "not a plain state_dict" in str(e.value) and "weights_only" not in str(e.value)


# -- full disks ------------------------------------------------------------------------------------
def _augment(out: Path, n: int = 6):
    grid, imgs, parts, segs = _training(n=4, m=20)
    sm, sampler = _model_and_sampler(parts)
    return write_augmented_set(
        out, imgs, parts, grid, sm, sampler, n, 3, device="cpu", segmentations=segs, chunk=4
    )


def test_augment_full_disk_at_setup_is_named_and_restartable(tmp_path, monkeypatch):
    reference = _tree(_augment(tmp_path / "ref"))
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", _enospc)
        with pytest.raises(DiskFullError) as e:
            _augment(tmp_path / "aug")
    assert e.value.needed and "images.npy" in str(e.value.path)
    assert not (tmp_path / "aug" / "augmentation.json").exists()
    assert _tree(_augment(tmp_path / "aug")) == reference  # the rerun starts cleanly


def test_augment_full_disk_mid_run_raises_not_sigbus_and_resumes_identically(tmp_path, monkeypatch):
    reference = _tree(_augment(tmp_path / "ref"))
    calls = {"n": 0}
    real = fileutil.write_all

    def fail_on_third(f, data):
        calls["n"] += 1
        if calls["n"] == 3:  # images chunk 0, labels chunk 0, then images chunk 1
            _enospc()
        real(f, data)

    with monkeypatch.context() as m:
        m.setattr(fileutil, "write_all", fail_on_third)
        with pytest.raises(DiskFullError):
            _augment(tmp_path / "aug")
    meta = json.loads((tmp_path / "aug" / "augmentation.json").read_text())
    assert meta["completed"] == 4  # the first chunk is kept
    assert _tree(_augment(tmp_path / "aug")) == reference


def test_augment_free_space_estimate_checked_first(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DiskFullError, match="augmented set of 6 samples") as e:
        _augment(tmp_path / "aug")
    assert e.value.needed > 6 * 24 * 20 * 16 * 4 and e.value.free == 1000
    assert not (tmp_path / "aug").exists()


def test_checkpoint_write_full_disk_is_named_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    save_torch({"epoch": torch.tensor(1)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(fileutil, "write_all", _enospc)
    with pytest.raises(DiskFullError) as e:
        save_torch({"epoch": torch.tensor(2), "w": torch.zeros(1000)}, target)
    assert e.value.needed and e.value.needed > 4000
    assert target.read_bytes() == before and _no_temp_leftovers(tmp_path)


@pytest.mark.slow
def test_train_checkpoint_full_disk_is_named(tmp_path, monkeypatch):
    from DeepSSMLogic.training import TrainConfig, train

    rng = np.random.default_rng(0)
    n, m = 6, 8
    images = rng.normal(size=(n, 1, 16, 16, 16)).astype(np.float32)
    parts = rng.normal(size=(n, m, 3)).astype(np.float32)
    ds = [(images[i], parts[i]) for i in range(n)]
    config = TrainConfig.from_dict({"epochs": 1, "batch_size": 3, "device": "cpu", "conv_padding": "same"})
    monkeypatch.setattr(fileutil, "write_all", _enospc)
    with pytest.raises(DiskFullError, match=r"checkpoint\.pt"):
        train(config, ds[:4], ds[4:], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and _no_temp_leftovers(tmp_path)


def test_predict_full_disk_is_named_and_writes_nothing_half(bundle_dir, tmp_path, capsys, monkeypatch):
    img = tmp_path / "case.nrrd"
    io.write_image(phantom_image(noise=0.0), img)
    monkeypatch.setattr(Path, "write_text", _enospc)
    rc = main(["predict", str(bundle_dir), str(img), "--out", str(tmp_path / "p"), "--no-align", "--quiet"])
    assert rc == 2 and "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "p" / "case.particles").exists() and _no_temp_leftovers(tmp_path)


def test_synth_full_disk_is_named_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("DeepSSMLogic.io.write_image", _enospc)
    rc = main(
        [
            "synth",
            "--family",
            "femur",
            "--n",
            "2",
            "--size",
            "16",
            "16",
            "16",
            "--out",
            str(tmp_path / "c"),
            "--quiet",
        ]
    )
    assert rc == 2 and "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and _no_temp_leftovers(tmp_path)


def test_synth_free_space_estimate_checked_first(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    monkeypatch.setattr("DeepSSMLogic.synthetic.make_subject", lambda *a, **k: pytest.fail("generated"))
    rc = main(["synth", "--family", "femur", "--n", "3", "--out", str(tmp_path / "c"), "--quiet"])
    assert rc == 2 and "not enough disk space" in capsys.readouterr().err


# -- corrupt bundles ---------------------------------------------------------------------------------
def _refresh_digests(d: Path) -> None:
    meta = json.loads((d / MODEL_JSON).read_text())
    meta["files"] = {f: fileutil.sha256_file(d / f) for f in meta["files"]}
    meta["content_sha256"] = _content_digest(meta)
    (d / MODEL_JSON).write_text(json.dumps(meta))


def _set(path: str, value):
    def edit(meta):
        obj = meta
        keys = path.split(".")
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value

    return edit


CORRUPTIONS = [
    ("reference_grid", [1, 2, 3], "'reference_grid'"),
    ("reference_grid.spacing", ["x", 1.0, 1.0], r"reference_grid\.spacing\[0\]"),
    ("reference_grid.spacing", [0.0, 1.0, 1.0], r"reference_grid\.spacing\[0\].*positive"),
    ("reference_grid.size", [23, 19.5, 17], r"reference_grid\.size\[1\]"),
    ("reference_grid.size", [100000, 100000, 100000], r"reference_grid\.size"),
    ("architecture", "base", "'architecture'"),
    ("normalizer.std", 0.0, r"normalizer\.std.*positive"),
    ("normalizer.mean", float("nan"), r"normalizer\.mean.*finite"),
    ("n_particles", -1, "'n_particles'"),
    ("n_particles", True, "'n_particles'"),
    ("pca.mean", [[1.0, "a", 2.0]], r"pca\.mean"),
    ("pca.eigenvalues", [1.0, float("inf")], r"pca\.eigenvalues.*finite"),
    ("pca.eigenvalues", [1.0, -2.0], r"pca\.eigenvalues.*non-negative"),
    ("descriptor_kind", "pixels", "'descriptor_kind'"),
    ("files.weights.pt", "0" * 10, r"files\.weights\.pt"),
]


@pytest.mark.parametrize(
    ("field", "value", "needle"), CORRUPTIONS, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CORRUPTIONS]
)
def test_model_json_corruption_names_the_field(bundle_dir, tmp_path, field, value, needle):
    d = shutil.copytree(bundle_dir, tmp_path / "b")
    meta = json.loads((d / MODEL_JSON).read_text())
    if field.startswith("files."):
        meta["files"][field[len("files.") :]] = value
    else:
        _set(field, value)(meta)
    # a consistent digest: the schema must still catch it (NaN cannot be digested: left stale)
    meta["content_sha256"] = (
        _content_digest(meta) if "nan" not in field + repr(value) else meta["content_sha256"]
    )
    (d / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=needle):
        load_bundle(d)


def test_model_json_invalid_utf8(bundle_dir, tmp_path):
    d = shutil.copytree(bundle_dir, tmp_path / "b")
    raw = (d / MODEL_JSON).read_bytes()
    (d / MODEL_JSON).write_bytes(raw.replace(b'"format"', b'"\xff\xfeformat"', 1))
    with pytest.raises(BundleError, match="not valid UTF-8"):
        read_bundle_meta(d)


def test_nan_weights_blamed_on_the_weights(bundle_dir, tmp_path):
    d = shutil.copytree(bundle_dir, tmp_path / "b")
    state = torch.load(d / "weights.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    torch.save(state, d / "weights.pt")
    _refresh_digests(d)
    with pytest.raises(BundleError, match=rf"weights contain NaN or Inf \({key}"):
        load_bundle(d)


def test_template_particles_count_checked_at_load(bundle_dir, tmp_path):
    d = shutil.copytree(bundle_dir, tmp_path / "b")
    io.write_particles(d / "template.particles", np.zeros((10, 3)))
    meta = json.loads((d / MODEL_JSON).read_text())
    meta["files"]["template.particles"] = ""
    (d / MODEL_JSON).write_text(json.dumps(meta))
    _refresh_digests(d)
    with pytest.raises(BundleError, match=r"template\.particles has 10 points, model\.json says 64 "):
        load_bundle(d)


def _zip_with_zeros(bundle_dir: Path, path: Path, entry: str, mib: int) -> Path:
    """The bundle as a zip whose ``entry`` is replaced by ``mib`` MiB of zeros (deflated: tiny)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(bundle_dir.iterdir()):
            if f.name != entry:
                zf.write(f, arcname=f.name)
        with zf.open(entry, "w", force_zip64=True) as w:
            for _ in range(mib):
                w.write(bytes(1 << 20))
    return path


def test_zip_bomb_entry_streamed_with_bounded_memory(bundle_dir, tmp_path):
    """A 15 MiB entry (within the weights' cap; a few KiB zipped) whose digest does not match:
    refused while streaming, peak Python memory about one 1 MiB block (the old loader read it
    whole: > 15 MiB)."""
    bomb = _zip_with_zeros(bundle_dir, tmp_path / "bomb.zip", "weights.pt", 15)
    assert bomb.stat().st_size < 2 << 20
    load_bundle(make_tiny_bundle(tmp_path / "warm.zip"))  # the imports a first load does
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=r"sha256 mismatch for weights\.pt"):
            load_bundle(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_zip_entry_larger_than_the_bundle_can_hold_refused_before_inflating(bundle_dir, tmp_path):
    big = _zip_with_zeros(bundle_dir, tmp_path / "big.zip", "mean.particles", 4)
    with pytest.raises(BundleError, match=r"mean\.particles declares 4\.0 MiB, more than"):
        load_bundle(big)
    # the weights' cap comes from the architecture's parameter count (this one: ~14 MiB)
    big = _zip_with_zeros(bundle_dir, tmp_path / "big-weights.zip", "weights.pt", 32)
    with pytest.raises(BundleError, match=r"weights\.pt declares 32\.0 MiB, more than"):
        load_bundle(big)


# -- absurd grids, parse errors, intensities -------------------------------------------------------
def test_voxel_budget_names_spacing_source(tmp_path):
    pts = np.random.default_rng(0).normal(scale=20.0, size=(3, 50, 3))
    with pytest.raises(InputError, match=r"reference grid too large.*0\.01 mm \(from the image of 's0'") as e:
        reference_grid(pts, 0.01, 10.0, ids=["s0", "s1", "s2"], spacing_source="the image of 's0' (x.nrrd)")
    assert "--spacing" in str(e.value)


def test_voxel_budget_names_the_subject_with_a_1e30_coordinate():
    pts = np.random.default_rng(0).normal(scale=20.0, size=(3, 50, 3))
    pts[1, 7, 2] = 1e30
    with pytest.raises(InputError, match=r"reference grid too large.*subject 'b'"):
        reference_grid(pts, 1.0, 10.0, ids=["a", "b", "c"])


def test_train_with_0_01_mm_spacing_fails_before_allocating(cohort, tmp_path, capsys, no_expensive_step):
    rc = main(["train", str(cohort), "--out", str(tmp_path / "m"), "--spacing", "0.01", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "reference grid too large" in err and "--spacing" in err


def test_particle_parse_error_names_the_file_line(tmp_path):
    p = tmp_path / "x.particles"
    p.write_text("1 2 3\n4 5 6\n7 oops 9\n")
    with pytest.raises(InputError, match=r"line 3: 'oops' is not a number"):
        io.read_particles(p)
    p.write_text("# header\n1 2 3\n4 5\n")
    with pytest.raises(InputError, match=r"line 3: 2 values"):
        io.read_particles(p)


def test_intensity_range_warning():
    norm = IntensityNormalizer(0.0, 1000.0, 300.0, 200.0)
    rng = np.random.default_rng(0)
    with pytest.warns(IntensityRangeWarning, match="far outside the training range"):
        assert warn_if_outside_training_range(rng.uniform(0, 1, (8, 8, 8)), norm, "scaled.nrrd")
    assert not warn_if_outside_training_range(rng.uniform(0, 1000, (8, 8, 8)), norm, "ok.nrrd")


def test_output_path_error_for_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        atomic_write_text(tmp_path / "f" / "g.json", "{}")
