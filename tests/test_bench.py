"""``modbal bench``: the protocol (disjoint seeds, equal budgets, choice on validation), the table
recomputed independently from the run directories, n/a cells, resume after a kill, and the Ray and
submitit executors giving the same table as local processes. Tiny synthetic task, 1 epoch."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_study import one_thread, tiny_recipe  # noqa: F401  (one_thread: an autouse fixture)
from _tiny_study import write_study as write_tiny_study
from scipy import stats

from modbal.bench import grid
from modbal.bench.cli import exit_status
from modbal.bench.runner import run_study
from modbal.bench.study import StudyError, builtin_studies, load_study, plan_study
from modbal.cli import main

RECIPE = tiny_recipe(epochs=1)
STUDY = """
description: tiny study for the tests
recipe: tiny.yaml
fusions:
  concat: []
  early: ['model.encoders={"*": {name: identity}}']
lrs: [0.03, 0.1]
selection_seeds: [0, 1]
report_seeds: 3
budget: 2
methods:
  uni fast: [method=unimodal, method.modality=fast]
  uni slow: [method=unimodal, method.modality=slow]
  joint: [method=joint]
  AGM: {overrides: [method=agm], grid: {method.alpha: [0.5, 1.0, 1.5]}}
  MSES: [method=mses, method.patience=1]
"""
SELECTION, REPORT = [0, 1], [2, 3, 4]


def write_study(folder: Path, text: str = STUDY) -> Path:
    return write_tiny_study(folder, text, RECIPE)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny study run once from start to end (local, in this process)."""
    root = tmp_path_factory.mktemp("bench")
    study = write_study(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_study(study, root / "out", threads=1, progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return root, result


# -- an independent reading of the run directories ----------------------------------------------
def read_runs(out: Path) -> list[dict]:
    runs = []
    for summary in sorted(out.rglob("summary.json")):
        cfg = yaml.safe_load((summary.parent / "config.yaml").read_text())
        s = json.loads(summary.read_text())
        m = cfg["method"]
        label = {"unimodal": f"uni {m.get('modality')}", "joint": "joint", "agm": "AGM", "mses": "MSES"}[m["name"]]
        runs.append({"dir": summary.parent, "fusion": cfg["model"]["fusion"]["name"], "label": label,
                     "lr": cfg["optim"]["lr"], "alpha": m.get("alpha"), "seed": cfg["seed"], "val": s["val"]["acc"],
                     "test": s["test"]["acc"], "status": s["status"]})
    return runs


def recompute(out: Path) -> dict:
    """Choice on mean validation accuracy over the selection seeds, then the report seeds' test
    accuracy: mean, std, t-interval, paired t-test against joint, Holm over the methods compared."""
    runs = read_runs(out)
    table = {}
    for fusion in {r["fusion"] for r in runs}:
        rows = {}
        for label in {r["label"] for r in runs if r["fusion"] == fusion}:
            mine = [r for r in runs if (r["fusion"], r["label"]) == (fusion, label)]
            configs = {(r["lr"], r["alpha"]) for r in mine if r["seed"] in SELECTION}
            val = {c: np.mean([r["val"] for r in mine if (r["lr"], r["alpha"]) == c and r["seed"] in SELECTION])
                   for c in configs}
            best = max(sorted(configs, key=lambda c: (c[0], c[1] or 0)), key=lambda c: val[c])  # ties: grid order
            report = sorted((r for r in mine if (r["lr"], r["alpha"]) == best and r["seed"] in REPORT),
                            key=lambda r: r["seed"])
            acc = np.array([r["test"] for r in report])
            lo, hi = stats.t.interval(0.95, len(acc) - 1, loc=acc.mean(), scale=stats.sem(acc))
            rows[label] = {"configs": configs, "chosen": best, "seeds": [r["seed"] for r in report], "acc": acc,
                           "mean": acc.mean(), "std": acc.std(ddof=1), "lo": lo, "hi": hi,
                           "dirs": [r["dir"] for r in report]}
        compared = [k for k in rows if k not in ("joint",) and not k.startswith("uni")]
        raw = {}
        for k in compared:
            d = rows[k]["acc"] - rows["joint"]["acc"]
            # scipy gives nan when every difference is the same; modbal's convention: 1 if it is 0, else 0
            if np.ptp(d) > 0:
                raw[k] = stats.ttest_rel(rows[k]["acc"], rows["joint"]["acc"]).pvalue
            else:
                raw[k] = 1.0 if d[0] == 0 else 0.0
        order = sorted(compared, key=lambda k: raw[k])
        adjusted, running = {}, 0.0
        for i, k in enumerate(order):
            running = max(running, min(1.0, (len(order) - i) * raw[k]))
            adjusted[k] = running
        for k in compared:
            rows[k]["diff"] = (rows[k]["acc"] - rows["joint"]["acc"]).mean()
            rows[k]["p_holm"] = adjusted[k]
        table[fusion] = rows
    return table


def poe_accuracy(dirs) -> float:
    """Product of experts of uni-modal runs, from their checkpoints (summed log-softmax, argmax)."""
    from modbal.report.analyze import load_trained, split_loader
    from modbal.train.run import build_method

    logp, labels = 0, None
    for d in dirs:
        model, config, data = load_trained(d)
        method = build_method(config)
        with torch.no_grad():
            out = [(torch.log_softmax(model(method.prepare_inputs(x)), -1), y)
                   for x, y in split_loader(data, "test", 64)]
        logp = logp + torch.cat([o for o, _ in out]).numpy()
        labels = torch.cat([y for _, y in out]).numpy()
    return float((logp.argmax(-1) == labels).mean())


# -- tests ---------------------------------------------------------------------------------------
def test_table_equals_an_independent_recomputation_from_the_run_directories(straight):
    root, board = straight
    assert not board["failed"]
    expected = recompute(root / "out")
    groups = {g["fusion"]: g for g in board["groups"]}
    assert set(groups) == {"concat", "early"}
    for fusion, rows in expected.items():
        got = {r["label"]: r for r in groups[fusion]["rows"] if r["status"] == "ok"}
        assert set(got) == set(rows)
        for label, want in rows.items():
            r = got[label]
            # selection and report seeds are disjoint; the reported runs are the report seeds only
            assert r["seeds"] == want["seeds"] == REPORT and not set(SELECTION) & set(r["seeds"])
            assert (r["chosen"]["optim.lr"], r["chosen"].get("method.alpha")) == want["chosen"]
            assert len(want["configs"]) == r["budget"]["drawn"] == 2  # the same budget for every method
            assert r["acc"]["mean"] == pytest.approx(want["mean"])
            assert r["acc"]["std"] == pytest.approx(want["std"])
            assert (r["acc"]["ci_lo"], r["acc"]["ci_hi"]) == pytest.approx((want["lo"], want["hi"]))
            if "diff" in want:
                assert r["diff"]["mean"] == pytest.approx(want["diff"])
                assert r["diff"]["p_holm"] == pytest.approx(want["p_holm"], nan_ok=True)
        agm = next(r for r in groups[fusion]["rows"] if r["label"] == "AGM")
        assert agm["budget"] == {"drawn": 2, "space": 6}
        # the uni-modal ensemble, seed by seed, and the gap closed towards it
        ens = groups[fusion]["ensemble"]
        poe = [poe_accuracy([rows["uni fast"]["dirs"][i], rows["uni slow"]["dirs"][i]]) for i in range(3)]
        assert ens["test_acc"] == pytest.approx(poe)
        gaps = np.array(poe) - rows["joint"]["acc"]  # gap closed only where the ensemble is above joint
        lo = stats.t.interval(0.95, 2, loc=gaps.mean(), scale=stats.sem(gaps))[0] if np.ptp(gaps) else gaps[0]
        above = lo > 0
        assert ens["above_ref"] == above
        if above:
            assert agm["gap_closed"] == pytest.approx((rows["AGM"]["mean"] - rows["joint"]["mean"]) / gaps.mean())
        else:
            assert "gap_closed" not in agm
    md = (root / "out" / "leaderboard.md").read_text()
    assert f"{100 * expected['concat']['joint']['mean']:.1f} ± {100 * expected['concat']['joint']['std']:.1f}" in md
    assert "same budget of 2 configurations" in md and "report seeds [2, 3, 4]" in md
    assert "wall time for the command that wrote this page, which trained all of them" in md
    header = (root / "out" / "leaderboard.csv").read_text().splitlines()[0]
    assert header.startswith("task,fusion,method,status")
    assert (root / "out" / "leaderboard.html").read_text().count("<img ") >= 3


def test_table_only_shows_a_diverged_report_seed_without_training(straight, tmp_path):
    """A report run that stopped on non-finite values is final: ``--table-only`` shows the row's
    other seeds, names the diverged one and leaves the row out of the comparisons; nothing trains."""
    import shutil

    root, _ = straight
    study, out = write_study(tmp_path), tmp_path / "out"
    shutil.copytree(root / "out" / "runs", out / "runs")
    joint = recompute(out)["concat"]["joint"]
    summary = Path(joint["dirs"][1]) / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "failed",
                                   "error": "FloatingPointError: non-finite loss"}))
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("summary.json"))
    assert main(["bench", str(study), "--out", str(out), "--table-only", "-q"]) == 0
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("summary.json")) == before
    board = json.loads((out / "leaderboard.json").read_text())
    row = next(r for g in board["groups"] if g["fusion"] == "concat" for r in g["rows"] if r["label"] == "joint")
    assert row["status"] == "diverged" and row["reason"] == f"diverged on report seed {REPORT[1]}"
    assert row["acc"]["mean"] == pytest.approx(np.mean([joint["acc"][0], joint["acc"][2]]))
    md = (out / "leaderboard.md").read_text()
    assert f"joint (diverged on report seed {REPORT[1]})" in md
    assert "wall time for the command" not in md  # a call that trained nothing says nothing of the study's duration


def test_a_pair_a_method_cannot_serve_is_na_and_the_study_finishes(straight):
    root, board = straight
    early = next(g for g in board["groups"] if g["fusion"] == "early")
    mses = next(r for r in early["rows"] if r["label"] == "MSES")
    assert mses["status"] == "n/a" and "encoder parameters" in mses["reason"]
    assert not list((root / "out" / "runs" / "synthetic" / "early" / "mses").glob("*"))
    assert "| MSES | n/a: " in (root / "out" / "leaderboard.md").read_text()
    # the other methods of that fusion ran to the end
    assert all(r["status"] == "ok" for r in early["rows"] if r["label"] != "MSES")


def test_failed_runs_are_named_and_the_command_exits_nonzero(capsys):
    assert exit_status([]) == 0 and capsys.readouterr().err == ""
    assert exit_status(["runs/a/seed0-1", "runs/b/seed1-2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("2 runs failed") and "runs/a/seed0-1, runs/b/seed1-2" in err


def test_seed_overlap_and_short_grids_are_refused_before_any_run(tmp_path, capsys):
    study = write_study(tmp_path, STUDY.replace("report_seeds: 3", "report_seeds: [1, 2]"))
    with pytest.raises(StudyError, match=r"overlap in \[1\]"):
        load_study(study)
    assert main(["bench", str(study), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "overlap" in err
    study = write_study(tmp_path, STUDY.replace("budget: 2", "budget: 3"))
    with pytest.raises(StudyError, match="budget 3 is larger than the grids of uni fast"):
        plan_study(load_study(study), tmp_path / "o", echo=lambda s: None)
    assert not (tmp_path / "o").exists()


def _comparable(board: dict) -> dict:
    """Everything but timing (which a resumed run legitimately accumulates differently)."""
    return {(g["fusion"], r["label"]): (r["status"], r.get("chosen"), r.get("seeds"), r.get("test_acc"),
                                        r.get("macro_f1"), r.get("diff", {}).get("p_holm"), r.get("gap_closed"))
            for g in board["groups"] for r in g["rows"]}


def test_a_killed_study_resumes_without_training_a_run_twice(straight, tmp_path, monkeypatch):
    """The study's concat half (35 runs), killed mid-grid and run again: the same numbers as the
    uninterrupted study's concat cells."""
    root, reference = straight
    study = write_study(tmp_path, STUDY.replace("""  early: ['model.encoders={"*": {name: identity}}']\n""", ""))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    log = tmp_path / "killed_study.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "modbal.cli", "bench", str(study), "--out", str(out), "-q",
                                 "--threads", "1"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240  # left as soon as 12 runs are complete
        while time.time() < deadline and len(list(out.rglob("summary.json"))) < 12:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {p.parent: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert 12 <= len(before) < 35, f"the study was not killed mid-grid; its output: {log.read_text()[-2000:]}"
    trained = []
    real = grid.train_run
    monkeypatch.setattr(grid, "train_run", lambda c, d, r: (trained.append(d), real(c, d, r)))
    board = run_study(study, out, threads=1, progress=False, echo=lambda s: None)
    assert not board["failed"]
    assert len(trained) == len(set(trained)) == 35 - len(before)  # each remaining run once, nothing retrained
    assert not {Path(d) for d in trained} & set(before)
    assert all(p.stat().st_mtime_ns == before[p.parent] for p in out.rglob("summary.json") if p.parent in before)
    concat = {k: v for k, v in _comparable(reference).items() if k[0] == "concat"}
    assert _comparable(board) == concat


# -- executors: a 4-run grid gives the same table as local processes ------------------------------
def _sweep_table(out: Path, executor) -> str:
    from modbal.report.sweep import parse_axes, sweep

    (out.parent / "tiny.yaml").write_text(RECIPE)
    res = sweep(str(out.parent / "tiny.yaml"), parse_axes(["method=joint,agm", "seed=0:2"]), out, threads=1,
                executor=executor, echo=lambda s: None)
    assert not res["failed"] and len(res["runs"]) == 4
    text = (out / "report" / "report.md").read_text()
    return text[text.index("### Accuracy"):text.index("### Runs")]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    return _sweep_table(tmp_path_factory.mktemp("local") / "grid", grid.LocalExecutor(1))


def test_ray_executor_gives_the_same_table(local_table, tmp_path):
    pytest.importorskip("ray")
    assert _sweep_table(tmp_path / "grid", grid.RayExecutor(num_cpus=1)) == local_table


def test_submitit_executor_gives_the_same_table(local_table, tmp_path):
    pytest.importorskip("submitit")
    executor = grid.SubmititExecutor(tmp_path / "submitit", cluster="local", runs_per_job=2, poll_s=0.2)
    assert _sweep_table(tmp_path / "grid", executor) == local_table


def test_shipped_studies_load_and_plan(tmp_path, monkeypatch):
    """Every shipped study reads and resolves; the synthetic one validates with no n/a cell; a task
    whose data is absent is n/a with the reason, not a crash."""
    assert {"synthetic", "synthetic_competition", "avdigits", "avmnist_fsdd", "mfeat"} <= set(builtin_studies())
    for name in builtin_studies():
        study = load_study(name)
        assert study.report_seeds and not set(study.selection_seeds) & set(study.report_seeds)
    lines = []
    monkeypatch.setenv("MODBAL_MFEAT", str(tmp_path / "absent"))
    plan = plan_study(load_study("mfeat"), tmp_path, echo=lines.append)
    assert "mfeat" in plan.task_na and "absent" in plan.task_na["mfeat"] and not plan.cells
    plan = plan_study(load_study("synthetic"), tmp_path, echo=lines.append)
    # every registered method serves the synthetic task; those that take teachers (UMT, UME) get the
    # study's uni-modal runs, in a later phase
    assert plan.cells and not [(c.label, c.na) for c in plan.cells if c.na]
    assert {c.label for c in plan.cells if c.teachers} >= {"umt", "ume"}
    assert all(c.phase == 1 and set(c.teachers) == {"fast", "slow"} for c in plan.cells if c.teachers)
    assert all(len(c.candidates) == plan.budget for c in plan.cells if c.trains)
    sizes = {c.label: c.space for c in plan.cells if not c.na}
    assert any(n > plan.budget for n in sizes.values())  # a grid larger than the budget was subsampled
    # a variant row beside the registered methods, with its own overrides and the same budget
    experts = [c for c in plan.cells if c.label == "ugm experts"]
    assert len(experts) == 2  # concat and gated
    assert all(len(c.candidates) == plan.budget and c.method == "ugm" for c in experts)
    config = experts[0].config(experts[0].candidates[0], 0)
    assert (config["method"]["heads"], config["method"]["predict"]) == ("assist", "with_experts")
    # a row that brings its own fusion head runs beside the fusions it names only
    (cosine,) = [c for c in plan.cells if c.label == "mmcosine fusion"]
    assert cosine.fusion == "concat" and len(cosine.candidates) == plan.budget
    assert cosine.config(cosine.candidates[0], 0)["model"]["fusion"]["name"] == "mmcosine"


@pytest.mark.parametrize("variants, message", [
    ("variants: {ugm: [method=ugm]}", "take the label of a registered method"),
    ("variants: [method=ugm]", "variants goes with methods: all"),
    ("variants: {cosine: {overrides: [method=joint], fusions: [gated]}}", "are not fusions of this study"),
    ("variants: {cosine: {overrides: [method=joint], fusions: []}}", "must be a list of the study's fusion names"),
])
def test_variants_are_named_apart_and_go_with_methods_all(tmp_path, variants, message):
    study = write_study(tmp_path, "recipe: tiny.yaml\nlrs: [0.1]\nmethods: all\n" + variants + "\n")
    with pytest.raises(StudyError, match=message):
        plan_study(load_study(study), tmp_path / "out", echo=lambda s: None)


def test_the_benchmark_scripts_study_files_load():
    """The engine reads the older study files (their seeds become selection seeds)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "studies"
    files = sorted(folder.glob("*.yaml"))
    if not files:
        pytest.skip("no benchmarks/studies in this checkout")
    for path in files:
        study = load_study(path)
        assert study.methods and study.selection_seeds and not set(study.selection_seeds) & set(study.report_seeds)


def test_holm_and_t_interval_against_scipy():
    from modbal.bench.stats import holm, paired_t, t_interval

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=6), rng.normal(size=6)
    assert paired_t(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    s = t_interval(a)
    assert (s.lo, s.hi) == pytest.approx(stats.t.interval(0.95, 5, loc=a.mean(), scale=stats.sem(a)))
    p = [0.01, 0.04, 0.03, math.nan, 0.2]
    # Holm by hand: sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, running maximum
    assert holm(p)[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(holm(p)[3])
    assert holm(p)[4] == pytest.approx(0.2)
    assert all(x <= y for x, y in combinations(sorted(holm([0.01, 0.02, 0.5])), 2))
