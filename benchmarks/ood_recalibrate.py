"""OOD calibration rules side by side (issue 13), recomputed from stored component values.

Reads what ``benchmarks/uncertainty_study.py`` saved in ``--study`` folders (``uncertainty_study.json``:
the component values of every evaluated image and of the validation split; the bundles'
``model.json["ood"]``: the leave-one-out intensity distances of the training images) and prints
the flag rates (clean / strong / pure noise / other anatomy) and the threshold per rule:

* ``v1``: every component's median and scale from the validation split; threshold = the validation
  scores' 99th percentile, at least 3 (OOD calibration version 1);
* ``+loo``: v1 with the intensity component scaled on the training images left out one at a time;
* ``+null``: v1 with the threshold at least :func:`DeepSSMLogic.ood.null_threshold`;
* ``v2``: both (what ``ood.calibrate`` does now, version 2).

It also prints which component gives each flagged clean image its score.

    python benchmarks/ood_recalibrate.py --study /tmp/oodcal/s0 /tmp/oodcal/s1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SETS = ("clean", "strong", "noise", "other", "moderate", "mild")
RULES = ("v1", "+loo", "+null", "v2")


def calibration(rule: str, validation: dict[str, list[float]], meta: dict[str, Any]) -> Any:
    from DeepSSMLogic import ood

    names = list(validation)
    rows = [{c: validation[c][i] for c in names} for i in range(len(validation[names[0]]))]
    ref = meta.get("extra", {}).get("reference", {})
    refs = {c: v["values"] for c, v in ref.items()} if rule in ("+loo", "v2") else None
    intensity = ood.IntensityReference.from_dict(meta["intensity"])
    cal = ood.calibrate(rows, intensity, int(meta["n_modes"]), references=refs)
    if rule in ("v1", "+loo"):  # the version-1 threshold: the validation quantile with the floor
        scores = [cal.assess(r)["score"] for r in rows]
        cal.threshold = max(float(np.quantile(scores, cal.quantile)), ood.MIN_THRESHOLD)
    return cal


def evaluate(study: Path, method: str, rule: str) -> dict[str, Any]:
    res = json.loads((study / "uncertainty_study.json").read_text())[method]
    meta = json.loads((study / f"model-{method}" / "model.json").read_text())["ood"]
    comps = res["components"]
    cal = calibration(rule, comps["validation"], meta)
    out: dict[str, Any] = {"threshold": cal.threshold}
    for s in SETS:
        if s not in comps:  # studies before the moderate/mild sets were saved
            out[s] = None
            continue
        verdicts = [cal.assess(v) for v in comps[s]]
        out[s] = float(np.mean([v["flag"] for v in verdicts]))
        if s == "clean":
            out["clean_flagged"] = [
                {
                    "image": i,
                    "score": round(v["score"], 2),
                    "by": max(cal.zscores(comps[s][i]).items(), key=lambda kv: kv[1])[0],
                }
                for i, v in enumerate(verdicts)
                if v["flag"]
            ]
            out["clean_max_score"] = max(v["score"] for v in verdicts)
        if s == "strong":
            out["strong_min_score"] = min(v["score"] for v in verdicts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", nargs="+", required=True, type=Path)
    p.add_argument("--methods", nargs="+", default=["none", "variance"])
    args = p.parse_args(argv)
    print(
        "| study | method | rule | threshold | clean | max clean score | strong | pure noise | other anatomy "
        "| min strong score | moderate (level 2) | mild (level 1) | flagged clean (image score component) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.0%}"

    for study in args.study:
        for m in args.methods:
            for rule in RULES:
                r = evaluate(study, m, rule)
                flagged = "; ".join(f"#{f['image']} {f['score']} {f['by']}" for f in r["clean_flagged"])
                print(
                    f"| {study} | {m} | {rule} | {r['threshold']:.2f} | {pct(r['clean'])} | "
                    f"{r['clean_max_score']:.2f} | {pct(r['strong'])} | {pct(r['noise'])} | {pct(r['other'])} | "
                    f"{r['strong_min_score']:.1f} | {pct(r['moderate'])} | {pct(r['mild'])} | {flagged or '-'} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
