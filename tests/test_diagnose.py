"""``modbal diagnose``: through the command line on the built-in synthetic task (tiny sizes, 1 epoch).

The numbers in ``diagnosis.json`` are recomputed here from the run directories alone (summary.json,
checkpoints) and the saved test-set predictions, with this file's own statistics, product of experts
and competition-strength formula; the verdict rules are checked on hand-made intervals.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _browser import chromium, loaded_image_widths, needs_chromium
from scipy import stats

from modbal.cli import main
from modbal.diagnose import ensemble_verdict, judge, modality_verdict, overall_verdict

TINY = ["dataset.num_train=160", "dataset.num_val=64", "dataset.num_test=128", "train.batch_size=64"]
MODS = ("fast", "slow")


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose") / "out"
    argv = ["diagnose", "synthetic", *TINY, "--seeds", "2", "--epochs", "1", "--quiet", "--alpha", "1",
            "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return out, argv, code, buf.getvalue()


# -- independent recomputation -----------------------------------------------------------------
def _interval(values):
    """mean and the two-sided 95% t-interval of the mean (scipy directly)."""
    v = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return v.mean(), v.mean() - half, v.mean() + half


def _check(entry, values):
    mean, lo, hi = _interval(values)
    assert entry["values"] == pytest.approx(list(values), abs=1e-12)
    assert (entry["mean"], entry["ci_lo"], entry["ci_hi"]) == pytest.approx((mean, lo, hi), abs=1e-9)


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _runs(out):
    """{seed: (joint run dir, {m: uni-modal run dir of seed + 1000})}, found by walking OUT."""
    found = {}
    for joint in sorted((out / "joint").iterdir()):
        seed = int(re.match(r"seed(\d+)-", joint.name).group(1))
        uni = {m: [d for d in (out / "unimodal").glob(f"*/{m}-seed{seed + 1000}")] for m in MODS}
        assert all(len(v) == 1 for v in uni.values()), uni
        found[seed] = (joint, {m: v[0] for m, v in uni.items()})
    return found


def _ridge_d(x_probe, y_probe, x_eval, y_eval, alpha):
    """The competition strength as documented (ridge with free intercept, B = N·cov(Y), rank divisor)."""
    xm, ym = x_probe.mean(0), y_probe.mean(0)
    xc, yc = x_probe - xm, y_probe - ym
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ yc)
    r = (x_eval - xm) @ w + ym - y_eval
    n = len(y_eval)
    b = np.cov(y_eval.T) * n
    vals, vecs = np.linalg.eigh(b)
    keep = vals > 1e-10 * vals.max()
    b_pinv = (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T
    return float(np.trace(r.T @ r @ b_pinv)) / int(keep.sum())


def _representations(run_dir, split, keep=None):
    from modbal.report.analyze import load_trained  # loads the checkpoint; the rest is this file's

    model, _, data = load_trained(run_dir)
    rows = []
    with torch.no_grad():
        for i in range(0, len(data[split]), 50):
            items = [data[split][j] for j in range(i, min(i + 50, len(data[split])))]
            inputs = {m: torch.stack([x[m] for x, _ in items]) for m in items[0][0]}
            if keep is not None:
                inputs = {m: v if m == keep else torch.zeros_like(v) for m, v in inputs.items()}
            rows.append(model.represent(inputs).double().numpy())
    return np.concatenate(rows)


def test_cli_diagnosis_matches_a_recomputation_from_the_run_directories(diagnosed):
    out, _, code, printed = diagnosed
    assert code == 0, printed
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["verdict"]["text"] in printed and d["ensemble_verdict"] in printed
    for name in ("diagnosis.md", "diagnosis.html", "diagnosis.png", "predictions.npz"):
        assert (out / name).stat().st_size > 0
    runs = _runs(out)
    assert sorted(runs) == d["seeds"] == [0, 1]
    # nothing trained beyond the 2 joint and 2 × 2 uni-modal runs (d_m reused the uni-modal runs)
    assert len(list(out.rglob("summary.json"))) == 6
    preds = np.load(out / "predictions.npz")
    labels = preds["labels"]
    joint_acc, ens_acc = [], []
    alone = {m: [] for m in MODS}
    inside = {m: [] for m in MODS}
    head = {m: [] for m in MODS}
    strength = {m: [] for m in MODS}
    for seed, (joint, uni) in sorted(runs.items()):
        js = _summary(joint)
        assert js["method"] == "joint" and js["seed"] == seed and js["status"] == "complete"
        joint_acc.append(js["test"]["acc"])
        p = preds[f"joint-seed{seed}"]
        assert (p.argmax(1) == labels).mean() == pytest.approx(js["test"]["acc"])  # the saved outputs are the run's
        log_sum = 0.0
        fused_probe, fused_eval = _representations(joint, "val"), _representations(joint, "test")
        for m in MODS:
            us = _summary(uni[m])
            assert us["method"] == "unimodal" and us["seed"] == seed + 1000
            q = preds[f"unimodal-{m}-seed{seed + 1000}"]
            assert (q.argmax(1) == labels).mean() == pytest.approx(us["test"]["acc"])
            log_sum = log_sum + np.log(np.clip(q, 1e-12, None))
            alone[m].append(us["test"]["acc"])
            inside[m].append(js["test"][f"mono_acc/{m}"])
            head[m].append(js["test"][f"head_acc/{m}"])
            strength[m].append(_ridge_d(fused_probe, _representations(uni[m], "val", keep=m), fused_eval,
                                        _representations(uni[m], "test", keep=m), alpha=1.0))
        ens_acc.append(float((log_sum.argmax(1) == labels).mean()))
    _check(d["joint"], joint_acc)
    _check(d["ensemble"], ens_acc)
    _check(d["ensemble_gap"], [e - j for e, j in zip(ens_acc, joint_acc)])
    for m in MODS:
        r = d["per_modality"][m]
        _check(r["alone"], alone[m])
        _check(r["inside"], inside[m])
        _check(r["head"], head[m])
        _check(r["shortfall"], [a - b for a, b in zip(alone[m], inside[m])])
        _check(r["head_shortfall"], [a - b for a, b in zip(alone[m], head[m])])
        assert r["competition"]["values"] == pytest.approx(strength[m], rel=1e-6, abs=1e-9)
        assert r["verdict"] in printed and r["verdict"] in (out / "diagnosis.md").read_text()


def test_rerun_reuses_every_run(diagnosed, monkeypatch, capsys):
    out, argv, code, _ = diagnosed
    assert code == 0
    before = json.loads((out / "diagnosis.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*.pt")}
    assert len(stamps) >= 6

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("modbal.bench.grid.train_run", refuse)
    monkeypatch.setattr("modbal.train.run.run_experiment", refuse)  # d_m's concepts too
    assert main(argv) == 0
    assert "6 runs, 6 complete, 0 to resume, 0 new" in capsys.readouterr().out
    assert json.loads((out / "diagnosis.json").read_text()) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*.pt")} == stamps


def test_a_summary_without_a_number_is_named(diagnosed, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(diagnosed[0], out)
    summary = next((out / "joint").glob("seed1-*")) / "summary.json"
    data = json.loads(summary.read_text())
    data["test"]["mono_acc/slow"] = "high"
    summary.write_text(json.dumps(data))
    assert main([*diagnosed[1][:-1], str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(summary) in err and "test.mono_acc/slow" in err


def test_a_method_override_is_refused_with_one_line(tmp_path, capsys):
    assert main(["diagnose", "synthetic", "method=agm", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method=agm" in err
    assert main(["diagnose", "synthetic", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- the verdict rules on hand-made intervals --------------------------------------------------
def _s(mean, lo, hi, n=3):
    return {"n": n, "mean": mean, "ci_lo": lo, "ci_hi": hi, "values": [mean] * n}


ALONE, INSIDE = _s(0.80, 0.78, 0.82), _s(0.60, 0.57, 0.63)


def test_judge_claims_only_what_the_interval_allows():
    assert judge(_s(0.05, 0.02, 0.08)) == "positive"
    assert judge(_s(0.002, -0.004, 0.008)) == "below_margin"  # within ±1 point with confidence
    assert judge(_s(-0.05, -0.08, -0.02)) == "below_margin"
    assert judge(_s(0.05, -0.01, 0.11)) == "unclear"  # the interval includes 0
    assert judge(_s(0.04, -0.002, 0.082)) == "unclear"  # ... if only just
    assert judge(_s(0.005, 0.001, 0.02)) == "unclear"  # above 0, but the mean is under the margin
    assert judge(_s(0.005, 0.001, 0.009)) == "below_margin"  # real but negligible
    assert judge(_s(0.05, math.nan, math.nan, n=1)) == "too_few"
    assert judge(_s(0.05, 0.02, 0.08), margin=0.06) == "unclear"
    assert judge(_s(0.05, 0.02, 0.08), margin=0.1) == "below_margin"  # real, but under a 10-point margin
    assert judge(_s(0.05, 0.02, 0.08), margin=0.0) == "positive"


def test_an_under_used_modality_is_named_with_its_numbers():
    claim, text = modality_verdict("audio", ALONE, INSIDE, _s(0.20, 0.17, 0.23))
    assert claim == "positive"
    assert text == ("audio is under-used inside the joint model: alone it reaches 80.0%, inside 60.0% "
                    "(shortfall +20.0 points [+17.0, +23.0]).")


def test_a_balanced_modality_is_not_called_under_used():
    claim, text = modality_verdict("audio", ALONE, _s(0.799, 0.79, 0.81), _s(0.001, -0.004, 0.006))
    assert claim == "below_margin" and text.startswith("audio is not under-used") and "below 1 point" in text
    claim, text = modality_verdict("audio", ALONE, _s(0.85, 0.84, 0.86), _s(-0.05, -0.07, -0.03))
    assert claim == "below_margin" and "does better (85.0%) than alone (80.0%)" in text


def test_overlapping_intervals_make_no_claim():
    claim, text = modality_verdict("audio", ALONE, _s(0.75, 0.60, 0.90), _s(0.05, -0.10, 0.20))
    assert claim == "unclear" and text.startswith("audio: no claim") and "under-used" not in text
    claim, text = ensemble_verdict(_s(0.80, 0.70, 0.90), _s(0.83, 0.75, 0.91), _s(0.03, -0.02, 0.08))
    assert claim == "unclear" and "no claim" in text and "may close" not in text and "unlikely" not in text
    kind, text = overall_verdict({"audio": "unclear", "video": "below_margin"}, "unclear")
    assert kind == "inconclusive" and text == (
        "Not clear with these seeds: the intervals are too wide to tell whether audio is under-used or whether the "
        "uni-modal ensemble beats joint training. Rerun with more seeds (--seeds); finished runs are reused.")
    kind, text = overall_verdict({"audio": "unclear", "video": "positive"}, "positive")
    assert kind == "competition" and text.startswith("Yes: video is under-used")
    kind, text = overall_verdict({"audio": "unclear", "video": "below_margin"}, "positive")
    assert kind == "inconclusive" and text.startswith("Not clear with these seeds: the uni-modal ensemble beats "
                                                      "joint training, but the intervals are too wide to tell whether "
                                                      "audio is under-used.")


def test_ensemble_claims():
    claim, text = ensemble_verdict(_s(0.80, 0.79, 0.81), _s(0.86, 0.85, 0.87), _s(0.06, 0.04, 0.08))
    assert claim == "positive"
    assert text == ("The uni-modal ensemble beats joint training by +6.0 points [+4.0, +8.0] (ensemble 86.0%, "
                    "joint 80.0%): a balancing method may close this gap.")
    claim, text = ensemble_verdict(_s(0.80, 0.79, 0.81), _s(0.802, 0.79, 0.81), _s(0.002, -0.003, 0.007))
    assert claim == "below_margin" and text.startswith("Joint training already matches") and "unlikely" in text
    claim, text = ensemble_verdict(_s(0.9, 0.89, 0.91), _s(0.8, 0.79, 0.81), _s(-0.1, -0.12, -0.08))
    assert claim == "below_margin" and text.startswith("Joint training beats the uni-modal ensemble")


@pytest.mark.parametrize("claims, ensemble, kind", [
    ({"a": "positive", "b": "below_margin"}, "positive", "competition"),
    ({"a": "positive", "b": "below_margin"}, "below_margin", "underused_no_gap"),
    ({"a": "below_margin", "b": "below_margin"}, "below_margin", "no_competition"),
    ({"a": "below_margin", "b": "below_margin"}, "positive", "gap_without_underuse"),
    ({"a": "positive", "b": "unclear"}, "positive", "competition"),
    ({"a": "unclear", "b": "below_margin"}, "positive", "inconclusive"),
    ({"a": "positive", "b": "below_margin"}, "unclear", "inconclusive"),
    ({"a": "too_few", "b": "too_few"}, "too_few", "inconclusive"),
])
def test_overall_verdict(claims, ensemble, kind):
    got, text = overall_verdict(claims, ensemble)
    assert got == kind
    if "positive" in claims.values():
        assert "a is under-used" in text
    else:
        assert "is under-used inside" not in text
    if ensemble == "too_few":
        assert text.startswith("One seed gives no intervals, so no claim")


# -- the page in a real browser ----------------------------------------------------------------


@needs_chromium
def test_page_renders_in_headless_chromium(diagnosed, tmp_path):
    out = diagnosed[0]
    page = (out / "diagnosis.html").read_text()
    assert page.count("<img ") == 1 and not re.search(r'(src|href)="(?!data:)', page)  # nothing external
    assert loaded_image_widths(page, tmp_path)[0] > 500
    shot = tmp_path / "diagnosis.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1400", (out / "diagnosis.html").as_uri(), cwd=tmp_path)
    assert shot.stat().st_size > 10_000
    assert Path(out / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unimodal_runs_share_a_carved_validation_split_with_their_joint_run(synthetic_without_val, tmp_path):
    from modbal.diagnose import plan_diagnosis

    plan = plan_diagnosis("synthetic", TINY, seeds=2, epochs=1, out=tmp_path)
    for i, joint in enumerate(plan.joint):
        assert joint.config["seed"] == i and joint.config["method"] == {"name": "joint"}
        for m in MODS:
            uni = plan.unimodal[m][i].config
            assert uni["seed"] == i + 1000 and uni["method"] == {"name": "unimodal", "modality": m}
            assert uni["train"]["val_seed"] == i  # the joint run's carve-out, not the uni-modal seed's
    assert not any(tmp_path.iterdir())  # planning trains and writes nothing
