"""benchmarks/paper_claims.py: verdicts from the statistics on constructed results (fast) and a tiny
end-to-end run (slow): cohorts, training with the paper's network, evaluation, JSON, markdown."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("paper_claims", ROOT / "benchmarks" / "paper_claims.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_claims"] = mod
    spec.loader.exec_module(mod)
    return mod


def _seed(family, seed, models, gt_down, rng, n_test=9):
    """One seed's results as run_seed writes them; ``models`` name -> (RMSE offset, downstream)."""
    base = 1.0 + 0.2 * rng.random(n_test)
    return {
        "family": family,
        "seed": seed,
        "test_ids": [f"s{i}" for i in range(n_test)],
        "mean_shape": {"rmse_mm": (base + 1.0).tolist()},
        "ground_truth": gt_down,
        "models": {
            name: {
                "train_seconds": 10.0,
                "rmse_mm": (base + off + 0.01 * rng.standard_normal(n_test)).tolist(),
                "surface_mean_mm": (base * 0.9).tolist(),
                "downstream": down,
                "mode_correlation": {"pearson": [0.9, 0.5], "variance_fraction": [0.8, 0.1]},
            }
            for name, (off, down) in models.items()
        },
    }


def _down(auc, acc, r=None):
    return {"severity_auc": auc, "severity_pearson": r, "classifier_accuracy": acc, "classifier_auc": auc}


def test_verdicts_follow_the_tests_on_constructed_results(tmp_path):
    pc = _module()
    args = pc.parse_args(["--n-boot", "2000"])
    rng = np.random.default_rng(0)
    results = {
        # TL consistently 0.3 mm better than Base; predicted accuracy equal to the ground truth's
        "atrium": [
            _seed(
                "atrium",
                s,
                {"base-l2": (0.3, _down(0.8, 0.85)), "tl-l2": (0.0, _down(0.8, 0.85 + 0.01 * (s % 2)))},
                _down(0.8, 0.85),
                rng,
            )
            for s in range(5)
        ],
        # focal identical to L2 up to noise; predicted severity AUC far below the ground truth's
        "femur": [
            _seed(
                "femur",
                s,
                {"base-l2": (0.0, _down(0.4, 0.7, 0.1)), "base-focal": (0.0, _down(0.42, 0.7, 0.1))},
                _down(0.9 + 0.01 * s, 0.72, 0.6),
                rng,
            )
            for s in range(5)
        ],
    }
    stats = pc.analyse(results, args)
    verdict = {c["claim"]: c["verdict"] for c in stats["claims"]}
    tl = next(v for k, v in verdict.items() if k.startswith("atrium: TL-DeepSSM"))
    focal = next(v for k, v in verdict.items() if k.startswith("femur: focal"))
    assert tl == "established"
    assert focal == "not established"
    assert verdict[
        "atrium: tl-l2 descriptors as good as the ground-truth PDM, classifier accuracy (within ±0.1)"
    ] == ("established")
    assert verdict[
        "femur: base-l2 descriptors as good as the ground-truth PDM, severity auc (within ±0.05)"
    ] == ("contradicted")
    assert all(v == "established" for k, v in verdict.items() if "mean shape" in k)
    cell = stats["cells"]["atrium"]["tl-l2"]["rmse_mm"]
    assert cell["n"] == 5 and cell["lo"] < cell["mean"] < cell["hi"]
    tl_cmp = next(c for c in stats["comparisons"] if (c["a"], c["b"]) == ("base-l2", "tl-l2"))
    assert tl_cmp["n"] == 45 and tl_cmp["n_clusters"] == 5 and tl_cmp["ci_hi"] < 0

    # the markdown is made from the JSON alone, and --from-json reproduces it
    doc = {
        "meta": {
            "command": "python benchmarks/paper_claims.py (constructed)",
            "seconds": 60.0,
            "seeds": list(range(5)),
            "config": {k: v for k, v in vars(args).items() if k != "from_json"},
            "device": "cpu",
            "platform": "test",
            "python": "3",
            "torch": "x",
            "load": "n/a",
        },
        "results": results,
        "statistics": stats,
    }
    (tmp_path / "r.json").write_text(json.dumps(doc))
    md = tmp_path / "R.md"
    assert pc.main(["--from-json", "--json", str(tmp_path / "r.json"), "--results", str(md)]) == 0
    text = md.read_text()
    assert "**atrium: TL-DeepSSM more accurate than Base (l2 loss; paper §5.3)**: **established**" in text
    assert "Testing/test_stats.py" in text and "(constructed)" in text
    # a claim not established says how large an effect its interval still allows
    focal_line = next(x for x in text.splitlines() if x.startswith("- **femur: focal loss"))
    assert "leaves room for B better by up to" in focal_line
    tl_line = next(x for x in text.splitlines() if x.startswith("- **atrium: TL-DeepSSM"))
    assert "leaves room" not in tl_line  # established: no such clause
    assert text == pc.write_markdown(json.loads((tmp_path / "r.json").read_text()))


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    """Two seeds of a 12-subject femur cohort, Base L2 vs focal, one epoch each (~45 s)."""
    pc = _module()
    out = tmp_path / "claims"
    argv = [
        "--out-dir", str(out), "--results", str(out / "R.md"), "--families", "femur",
        "--variants", "base-l2", "base-focal", "--seeds", "2", "--n", "12", "--size", "16",
        "--spacing", "6", "--particles", "32", "--epochs", "1", "--augment", "0",
        "--permutations", "20", "--n-boot", "500", "--device", "cpu",
    ]  # fmt: skip
    assert pc.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    seeds = doc["results"]["femur"]
    assert [s["seed"] for s in seeds] == [0, 1]
    assert seeds[0]["test_ids"] != seeds[1]["test_ids"] or seeds[0]["mean_shape"] != seeds[1]["mean_shape"]
    for s in seeds:
        n = len(s["test_ids"])
        assert n >= 3 and len(s["mean_shape"]["rmse_mm"]) == n
        for m in s["models"].values():
            assert len(m["rmse_mm"]) == n and all(v > 0 for v in m["rmse_mm"])
            assert len(m["mode_correlation"]["pearson"]) >= 1
        gd = s["ground_truth"]["group_difference"][0]
        assert "hotelling_points_fdr_lt_0.05" in gd and "points_fdr_lt_0.05" in gd
    # the paper's network, whatever deepssm train's default
    assert doc["meta"]["config"]["encoder"] == "paper"
    model_json = json.loads((out / "femur" / "seed0" / "model-base-l2" / "model.json").read_text())
    assert '"encoder": "paper"' in json.dumps(model_json)
    claims = doc["statistics"]["claims"]
    assert any(c["claim"].startswith("femur: focal loss") for c in claims)
    assert all(c["verdict"] in ("established", "not established", "contradicted") for c in claims)
    assert "## femur" in (out / "R.md").read_text()
    # a rerun reuses every finished seed (no training)
    assert pc.main(argv) == 0
    # ... but never a seed made with other settings
    with pytest.raises(SystemExit, match="epochs"):
        pc.main([*argv[: argv.index("--epochs")], "--epochs", "2", *argv[argv.index("--epochs") + 2 :]])


def test_seed_major_order_runs_every_family_before_the_next_seed():
    pc = _module()
    fams = ["atrium", "femur", "cranium"]
    assert pc.parse_args([]).order == "seed"
    assert pc.run_order(fams, [0, 1], "seed") == [
        ("atrium", 0), ("femur", 0), ("cranium", 0), ("atrium", 1), ("femur", 1), ("cranium", 1)
    ]  # fmt: skip
    assert pc.run_order(fams, [0, 1], "family")[:2] == [("atrium", 0), ("atrium", 1)]
    # a run stopped after k jobs has every family within one seed of the others
    jobs = pc.run_order(fams, list(range(5)), "seed")
    for k in range(len(jobs)):
        counts = [sum(f == fam for f, _ in jobs[:k]) for fam in fams]
        assert max(counts) - min(counts) <= 1


def test_label_association_finds_the_mode_that_carries_the_group_and_the_model_that_misses_it():
    """The group is carried by the PDM's second mode; a 'network' that predicts the first mode only
    has r ≈ 1 there and ≈ 0 on mode 2, and the report names mode 2 and that r."""
    pc = _module()
    rng = np.random.default_rng(1)
    n, m = 40, 20
    d1, d2 = np.zeros((m, 3)), np.zeros((m, 3))
    d1[:, 0], d2[:10, 1] = 1.0, 1.0
    a1, a2 = 5.0 * rng.standard_normal(n), 2.0 * rng.standard_normal(n)
    f1, f2 = a1[:28] - a1[:28].mean(), a2[:28] - a2[:28].mean()
    a2[:28] -= f1 * (f1 @ f2) / (f1 @ f1)  # uncorrelated in the fit subjects: the PDM's modes are d1, d2
    shapes = a1[:, None, None] * d1 + a2[:, None, None] * d2 + 0.05 * rng.standard_normal((n, m, 3))
    abnormal = (a2 > 0).astype(float)
    pred = a1[28:, None, None] * d1 + 0.05 * rng.standard_normal((n - 28, m, 3))  # misses mode 2
    mc = pc._mode_correlation(shapes[:28], shapes[28:], pred, shapes, abnormal)
    assert int(np.argmax(mc["label_r"][:2])) == 1 and mc["label_r"][1] > max(0.6, mc["label_r"][0] + 0.3)
    assert mc["pearson"][0] > 0.95 and abs(mc["pearson"][1]) < 0.7
    # without labels: the old fields only (seeds stored before label_r keep their report)
    assert "label_r" not in pc._mode_correlation(shapes[:28], shapes[28:], pred)

    down = {"severity_auc": 0.9, "severity_pearson": None, "classifier_accuracy": 0.9}

    def seed(s, mode_corr):
        return {
            "seed": s,
            "mean_shape": {"rmse_mm": [2.0] * 3},
            "ground_truth": down,
            "models": {
                "base-l2": {
                    "train_seconds": 1.0,
                    "rmse_mm": [1.0] * 3,
                    "surface_mean_mm": [1.0] * 3,
                    "downstream": down | {"classifier_accuracy": 0.6},
                    "mode_correlation": mode_corr,
                }
            },
        }

    args = pc.parse_args(["--n-boot", "200"])
    cells = pc.analyse({"femur": [seed(0, mc), seed(1, mc)]}, args)["cells"]
    assert cells["femur"]["base-l2"]["mode_correlation"]["label_r_mean"][1] == pytest.approx(mc["label_r"][1])
    (line,) = [x for x in pc._mode_reading({"cells": cells}) if x]
    assert (
        "mode 2 in every seed" in line and f"r = {mc['pearson'][1]:.2f}" in line and "accuracy -0.30" in line
    )
    # PDM modes are per seed: where another seed's label sits on mode 1, that seed's r is mode 1's
    swapped = mc | {"label_r": [mc["label_r"][1], mc["label_r"][0], *mc["label_r"][2:]]}
    cells = pc.analyse({"femur": [seed(0, mc), seed(1, swapped)]}, args)["cells"]
    (line,) = [x for x in pc._mode_reading({"cells": cells}) if x]
    assert "modes 2, 1 in seeds 0, 1" in line
    assert f"r = {(mc['pearson'][1] + mc['pearson'][0]) / 2:.2f}" in line


def test_reused_seed_gets_the_label_association_from_disk(tmp_path):
    """A seed finished before label_r existed: the rerun fills it from the cohort and the stored test
    predictions (nothing retrained), equal to computing it fresh."""
    import SimpleITK as sitk

    from DeepSSMLogic import io
    from DeepSSMLogic.cohort import load_cohort

    pc = _module()
    seed_dir = tmp_path / "femur" / "seed0"
    rng = np.random.default_rng(0)
    base_shape = 20.0 * rng.standard_normal((32, 3))
    rows = ["id,image,particles,group,split"]
    for i in range(12):
        sid, group = f"s{i:02d}", ("normal" if i % 2 else "cam")
        shape = base_shape + rng.standard_normal((32, 3)) + (3.0 if group == "cam" else 0.0)
        io.write_particles(seed_dir / "cohort" / f"{sid}.particles", shape)
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(seed_dir / "cohort" / f"{sid}.nrrd"))
        rows.append(f"{sid},{sid}.nrrd,{sid}.particles,{group},{'test' if i >= 8 else 'train'}")
    (seed_dir / "cohort" / "cohort.csv").write_text("\n".join(rows) + "\n")
    coh = load_cohort(seed_dir / "cohort" / "cohort.csv")
    test = coh.by_split("test")
    for s in test:
        pts = io.read_particles(s.particles) + 0.3 * rng.standard_normal((32, 3))
        io.write_particles(seed_dir / "eval-base-l2" / "predictions" / f"{s.id}.particles", pts)
    arr = pc._cohort_arrays(coh, "femur")
    assert arr["abnormal_all"].tolist() == [float(i % 2 == 0) for i in range(12)]
    pred = np.stack(
        [io.read_particles(seed_dir / "eval-base-l2" / "predictions" / f"{s.id}.particles") for s in test]
    )
    fresh = pc._mode_correlation(arr["gt_fit"], arr["gt_test"], pred, arr["gt_all"], arr["abnormal_all"])
    old = {k: v for k, v in fresh.items() if k != "label_r"}
    done = {"test_ids": [s.id for s in test], "models": {"base-l2": {"mode_correlation": dict(old)}}}
    assert pc._add_label_association(done, seed_dir, "femur") is True
    assert done["models"]["base-l2"]["mode_correlation"] == fresh
    assert pc._add_label_association(done, seed_dir, "femur") is False  # already there
    done["ground_truth"] = {}
    assert pc._add_point_dimension(done, seed_dir) is True  # 3-D noise on every point
    assert done["ground_truth"]["point_variation_1d"] == 0.0
    assert pc._add_point_dimension(done, seed_dir) is False


def test_stage_validation_from_the_log_and_the_joint_stage_reading(tmp_path):
    """Per-stage best validation RMSE read from train_log.jsonl (filled into older seeds on reuse),
    and the reading that flags a TL joint stage that ended worse than the image-to-latent stage."""
    pc = _module()
    seed_dir = tmp_path / "atrium" / "seed0"
    log = seed_dir / "model-tl-l2.work" / "training" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    recs = [("ae", 3.0), ("ae", 1.0), ("tflank", 4.0), ("tflank", 2.0), ("joint", 5.0), ("joint", 2.5)]
    log.write_text("".join(json.dumps({"stage": st, "val_rmse_mm": v}) + "\n" for st, v in recs))
    assert pc._stage_val(seed_dir / "model-tl-l2") == {"ae": 1.0, "tflank": 2.0, "joint": 2.5}
    assert pc._stage_val(seed_dir / "model-base-l2") is None  # no log
    done = {"models": {"tl-l2": {}}}
    assert pc._add_stage_val(done, seed_dir) is True and pc._add_stage_val(done, seed_dir) is False
    assert done["models"]["tl-l2"]["stage_best_val_rmse_mm"]["joint"] == 2.5

    down = {"severity_auc": 0.9, "severity_pearson": None, "classifier_accuracy": 0.9}

    def seed(s, joint):
        m = {
            "train_seconds": 1.0,
            "rmse_mm": [1.0] * 3,
            "surface_mean_mm": [1.0] * 3,
            "downstream": down,
            "mode_correlation": {"pearson": [0.9], "variance_fraction": [1.0]},
            "stage_best_val_rmse_mm": {"ae": 1.0, "tflank": 2.0, "joint": joint},
        }
        return {"seed": s, "mean_shape": {"rmse_mm": [2.0] * 3}, "ground_truth": down, "models": {"tl-l2": m}}

    args = pc.parse_args(["--n-boot", "200"])
    st = pc.analyse({"atrium": [seed(0, 2.5), seed(1, 2.7), seed(2, 1.9)]}, args)
    c = st["cells"]["atrium"]["tl-l2"]
    assert c["joint_worse_than_tflank_seeds"] == 2 and c["stage_best_val_rmse_mm"]["joint"]["n"] == 3
    (line,) = [x for x in pc._stage_reading(st) if x]
    assert "2 of 3 seeds" in line and "2.00 → 2.37 mm" in line
    assert any(
        "image-to-latent (T-flank) 2.00" in x for x in pc._stage_lines(st["cells"]["atrium"], ["tl-l2"])
    )
    # a joint stage that helped on average: no such line
    st = pc.analyse({"atrium": [seed(0, 1.5), seed(1, 1.6)]}, args)
    assert not [x for x in pc._stage_reading(st) if x]


def test_point_variation_dimension_explains_when_hotelling_and_norm_p_values_coincide():
    """Where each point moves along one direction across subjects, the point-wise Hotelling T² and
    the norm statistic give identical permutation p-values; with 3-D scatter they do not. The
    report reads the fraction of such points (filled into older seeds on reuse)."""
    from DeepSSMLogic.analysis.groups import hotelling_pointwise, permutation_test

    pc = _module()
    rng = np.random.default_rng(0)
    n, m = 16, 40
    base = rng.normal(size=(m, 3))
    direction = rng.normal(size=(m, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    amount = rng.normal(size=(n, m, 1)) * rng.uniform(0.5, 3.0, size=(1, m, 1))
    amount[: n // 2] += 0.8  # a group difference along each point's direction
    one_d = base + amount * direction
    three_d = one_d + rng.normal(scale=0.7, size=one_d.shape)
    assert pc.point_variation_one_dimensional(one_d) == 1.0
    assert pc.point_variation_one_dimensional(three_d) == 0.0
    for pts, same in ((one_d, True), (three_d, False)):
        a, b = pts[: n // 2], pts[n // 2 :]
        h = hotelling_pointwise(a, b, n_permutations=200, seed=1)
        q = permutation_test(a, b, n_permutations=200, seed=1)
        assert np.allclose(h.p_values, q.p_values) is same
    seeds = [{"ground_truth": {"point_variation_1d": 1.0}, "models": {}}]
    assert any("one-dimensional at 100 %" in x for x in pc._group_table(seeds, [], 200))


def test_focal_reading_names_the_threshold_and_the_weight_at_the_models_error(tmp_path):
    """Focal models carry the c the heuristic chose (filled from model.json into older seeds); the
    reading gives eq. 7's weight at the held-out RMSE and flags a loss that stopped teaching."""
    pc = _module()
    seed_dir = tmp_path / "atrium" / "seed0"
    for name, loss in (("base-focal", "focal"), ("base-l2", "l2")):
        (seed_dir / f"model-{name}").mkdir(parents=True)
        focal = {"a": 10.0, "c": 8.0, "a_latent": None, "c_latent": None}
        summary = {"config": {"loss": loss}, "focal": focal}
        (seed_dir / f"model-{name}" / "model.json").write_text(json.dumps({"training_summary": summary}))
    done = {"models": {"base-focal": {}, "base-l2": {}}}
    assert pc._add_focal(done, seed_dir) is True and pc._add_focal(done, seed_dir) is False
    assert done["models"]["base-focal"]["focal"]["c"] == 8.0 and "focal" not in done["models"]["base-l2"]

    down = {"severity_auc": 0.9, "severity_pearson": None, "classifier_accuracy": 0.9}

    def seed(s, c, rmse):
        m = {
            "train_seconds": 1.0,
            "rmse_mm": [rmse] * 3,
            "surface_mean_mm": [1.0] * 3,
            "downstream": down,
            "mode_correlation": {"pearson": [0.9], "variance_fraction": [1.0]},
            "focal": {"a": 10.0, "c": c, "a_latent": None, "c_latent": None},
        }
        return {
            "seed": s,
            "mean_shape": {"rmse_mm": [3.0] * 3},
            "ground_truth": down,
            "models": {"base-focal": m},
        }

    args = pc.parse_args(["--n-boot", "200"])
    st = pc.analyse({"atrium": [seed(0, 8.0, 2.0), seed(1, 9.0, 2.0)]}, args)
    assert st["cells"]["atrium"]["base-focal"]["focal"]["c"] == 8.5
    (line,) = [x for x in pc._focal_reading(st) if x]
    assert "c = 8.50 mm" in line and "weight 5.9e-29" in line and "stopped teaching" in line
    st = pc.analyse({"femur": [seed(0, 0.4, 0.3), seed(1, 0.4, 0.3)]}, args)
    (line,) = [x for x in pc._focal_reading(st) if x]
    assert "weight 2.7e-01" in line and "stopped teaching" not in line


def test_finished_only_leaves_out_a_seed_that_lacks_models_of_this_grid(tmp_path):
    """A seed finished by a --grid claims run is not finished for --grid full: --finished-only must
    skip it rather than train its missing models."""
    pc = _module()
    seed_dir = tmp_path / "cranium" / "seed0"
    seed_dir.mkdir(parents=True)
    (seed_dir / "seed.json").write_text(json.dumps({"models": {"base-l2": {}}}))
    assert pc.seed_finished(seed_dir, "cranium", pc.parse_args(["--grid", "claims"])) is True
    assert pc.seed_finished(seed_dir, "cranium", pc.parse_args(["--grid", "full"])) is False
    assert pc.seed_finished(tmp_path / "cranium" / "seed1", "cranium", pc.parse_args([])) is False
