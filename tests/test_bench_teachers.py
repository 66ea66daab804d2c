"""``modbal bench`` with methods that take the study's uni-modal runs as teachers (UMT, UME): the
teachers of every run are the uni-modal runs of the same seed at the uni-modal rows' configuration
chosen on validation (read back from the runs' config.yaml and recomputed here from the run
directories), the table's numbers and costs recomputed from the run directories, nothing trained
twice on a rerun, a killed dependent run resumed alone, and the cells that cannot get teachers n/a
with the reason. Tiny synthetic task, 1 epoch."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_study import one_thread, tiny_recipe  # noqa: F401  (one_thread: an autouse fixture)
from _tiny_study import write_study as write_tiny_study

from modbal.bench import grid
from modbal.bench.grid import config_key
from modbal.bench.leaderboard import leaderboard
from modbal.bench.runner import run_study
from modbal.bench.study import Choice, bind_teachers, load_study, plan_study, selection_jobs
from modbal.config import load_yaml, resolve

RECIPE = tiny_recipe(epochs=2)
UNI = """
  uni fast: [method=unimodal, method.modality=fast]
  uni slow: [method=unimodal, method.modality=slow]
"""
STUDY = """
recipe: tiny.yaml
lrs: [0.01, 0.1]
selection_seeds: [0, 1]
report_seeds: 2
budget: 2
methods:{uni}
  joint: [method=joint]
  UMT: {{overrides: [method=umt], grid: {{method.alpha: [0.5, 2.0]}}}}
  UME: [method=ume]
"""
SELECTION, REPORT = [0, 1], [2, 3]


def write_study(folder: Path, text: str) -> Path:
    return write_tiny_study(folder, text, RECIPE)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    study = write_study(root, STUDY.format(uni=UNI))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        board = run_study(study, root / "out", threads=1, progress=False, echo=lambda s: None, html=False)
    finally:
        torch.set_num_threads(threads)
    return study, root / "out", board


# -- an independent reading of the run directories ----------------------------------------------
def read_runs(out: Path) -> list[dict]:
    runs = []
    for path in sorted(out.rglob("config.yaml")):
        cfg = yaml.safe_load(path.read_text())
        s = json.loads((path.parent / "summary.json").read_text())
        m = cfg["method"]
        runs.append({"dir": path.parent.resolve(), "method": m["name"], "modality": m.get("modality"),
                     "teachers": m.get("teachers"), "alpha": m.get("alpha"), "lr": cfg["optim"]["lr"],
                     "epochs": cfg["train"]["epochs"], "seed": cfg["seed"], "val": s["val"]["acc"],
                     "test": s["test"]["acc"], "elapsed": s["elapsed_s"], "status": s["status"]})
    return runs


def best(runs: list[dict], keys: tuple[str, ...]) -> tuple:
    """The configuration with the best mean validation accuracy over the selection seeds (ties: grid order)."""
    configs = sorted({tuple(r[k] for k in keys) for r in runs if r["seed"] in SELECTION})
    mean = {c: np.mean([r["val"] for r in runs if tuple(r[k] for k in keys) == c and r["seed"] in SELECTION])
            for c in configs}
    return max(configs, key=lambda c: mean[c])


# -- tests ---------------------------------------------------------------------------------------
def test_teachers_are_the_uni_modal_runs_of_the_same_seed_at_their_chosen_configuration(study_run):
    _, out, board = study_run
    assert not board["failed"]
    runs = read_runs(out)
    assert all(r["status"] == "complete" for r in runs)
    uni = {m: [r for r in runs if r["method"] == "unimodal" and r["modality"] == m] for m in ("fast", "slow")}
    chosen_lr = {m: best(rs, ("lr",))[0] for m, rs in uni.items()}
    teacher_of = {(m, r["seed"]): r["dir"] for m, rs in uni.items() for r in rs if r["lr"] == chosen_lr[m]}
    for name in ("umt", "ume"):
        mine = [r for r in runs if r["method"] == name]
        assert {r["seed"] for r in mine} == set(SELECTION + REPORT)
        for r in mine:
            assert set(r["teachers"]) == {"fast", "slow"}
            for m, path in r["teachers"].items():
                assert Path(path) == teacher_of[(m, r["seed"])]
                teacher = yaml.safe_load((Path(path) / "config.yaml").read_text())
                assert teacher["method"] == {"name": "unimodal", "modality": m} and teacher["seed"] == r["seed"]
            # the run directory's key is the hash of its config, teachers included
            saved = resolve(load_yaml((r["dir"] / "config.yaml").read_text()))
            assert r["dir"].name == f"seed{r['seed']}-{config_key(saved)}"
    # the selection runs of the dependent methods used selection-seed teachers, whose configuration
    # was chosen on validation over the selection seeds only (the report runs played no part)
    rows = {r["label"]: r for r in board["groups"][0]["rows"]}
    assert rows["uni fast"]["chosen"]["optim.lr"] == chosen_lr["fast"]
    assert rows["UMT"]["teachers"] == rows["UME"]["teachers"] == {"fast": "uni fast", "slow": "uni slow"}


def test_table_of_umt_and_ume_recomputed_from_the_run_directories(study_run):
    _, out, board = study_run
    runs = read_runs(out)
    rows = {r["label"]: r for r in board["groups"][0]["rows"]}
    joint = [r for r in runs if r["method"] == "joint"]
    joint_lr = best(joint, ("lr",))[0]
    joint_test = {r["seed"]: r["test"] for r in joint if r["lr"] == joint_lr and r["seed"] in REPORT}
    uni_dirs = {r["dir"] for r in runs if r["method"] == "unimodal"}
    uni_cost = sum(r["elapsed"] for r in runs if r["method"] == "unimodal")
    for label, name, keys in (("UMT", "umt", ("lr", "alpha")), ("UME", "ume", ("lr", "alpha"))):
        mine = [r for r in runs if r["method"] == name]
        row = rows[label]
        assert row["status"] == "ok"
        pick = best(mine, keys)
        report = sorted((r for r in mine if tuple(r[k] for k in keys) == pick and r["seed"] in REPORT),
                        key=lambda r: r["seed"])
        assert [r["seed"] for r in report] == row["seeds"] == REPORT
        acc = np.array([r["test"] for r in report])
        assert row["acc"]["mean"] == pytest.approx(acc.mean()) and row["acc"]["std"] == pytest.approx(acc.std(ddof=1))
        assert row["diff"]["mean"] == pytest.approx(np.mean([r["test"] - joint_test[r["seed"]] for r in report]))
        # costs: its own runs (selection and report) plus every run of its teacher rows
        own = [r for r in mine if r["seed"] in SELECTION or tuple(r[k] for k in keys) == pick]
        assert row["runs"] == len(own) + len(uni_dirs) and row["teacher_runs"] == len(uni_dirs)
        assert row["train_s"] == pytest.approx(sum(r["elapsed"] for r in own) + uni_cost)
    # UMT: its learning rates × its alpha grid, the same budget as every method
    assert rows["UMT"]["budget"] == {"drawn": 2, "space": 4} and set(rows["UMT"]["chosen"]) == {"optim.lr",
                                                                                               "method.alpha"}
    # UME trains nothing: no learning rate to try, one configuration, one epoch per run
    assert rows["UME"]["budget"] == {"drawn": 1, "space": 1} and rows["UME"]["chosen"] == {}
    assert {r["epochs"] for r in runs if r["method"] == "ume"} == {1}
    assert {r["epochs"] for r in runs if r["method"] != "ume"} == {2}
    md = (out / "leaderboard.md").read_text()
    assert "| UME | teachers: uni fast, uni slow | 1 of 1 |" in md
    assert f"| {rows['UMT']['runs']} ({len(uni_dirs)} teachers') |" in md
    assert "include those rows' runs" in md


def test_a_rerun_trains_nothing_and_a_killed_dependent_run_is_resumed_alone(study_run, monkeypatch):
    study, out, board = study_run
    trained = []
    real = grid.train_run
    monkeypatch.setattr(grid, "train_run", lambda c, d, r: (trained.append((d, r)), real(c, d, r)))
    again = run_study(study, out, threads=1, progress=False, echo=lambda s: None, html=False)
    assert trained == []
    per_call = ("wall_s_this_call", "trained_this_call", "paths")
    same = {k: v for k, v in again.items() if k not in per_call}
    assert json.dumps(same, sort_keys=True, default=str) == json.dumps(
        {k: v for k, v in board.items() if k not in per_call}, sort_keys=True, default=str)
    assert again["trained_this_call"] == 0
    # a UMT report run killed before it finished (its summary gone, its config and checkpoints left)
    umt = next(r for r in read_runs(out) if r["method"] == "umt" and r["seed"] == REPORT[0])
    (umt["dir"] / "summary.json").unlink()
    run_study(study, out, threads=1, progress=False, echo=lambda s: None, html=False)
    assert [(Path(d).resolve(), resume) for d, resume in trained] == [(umt["dir"], True)]


def test_cells_without_teachers_to_use_are_na_with_the_reason(tmp_path):
    """No uni-modal method in the study (the check runs before any training), two on one modality
    (ambiguous, unless the study names them), and teachers whose configuration was never chosen."""
    lines = []
    plan = plan_study(load_study(write_study(tmp_path / "a", STUDY.format(uni=""))), tmp_path / "o", echo=lines.append)
    cells = {c.label: c for c in plan.cells}
    for label in ("UMT", "UME"):
        assert "no 'unimodal' method on 'fast'" in cells[label].na
        assert any(line.startswith(f"n/a: synthetic / concat / {label}: needs the study's uni-modal runs")
                   for line in lines)
    assert cells["joint"].na is None and not (tmp_path / "o").exists()
    uni = UNI + "  uni fast 2: [method=unimodal, method.modality=fast, train.epochs=1]\n"
    plan = plan_study(load_study(write_study(tmp_path / "b", STUDY.format(uni=uni))), tmp_path / "o", echo=lines.append)
    assert "several uni-modal methods on 'fast' (uni fast, uni fast 2)" in next(
        c for c in plan.cells if c.label == "UMT").na
    named = STUDY.format(uni=uni).replace(
        "UME: [method=ume]", "UME: {overrides: [method=ume], teachers: {fast: uni fast 2, slow: uni slow}}")
    plan = plan_study(load_study(write_study(tmp_path / "c", named)), tmp_path / "o", echo=lines.append)
    ume = next(c for c in plan.cells if c.label == "UME")
    assert ume.na is None and ume.teachers == {"fast": "uni fast 2", "slow": "uni slow"} and ume.phase == 1
    # a teacher row that diverged under every configuration: its dependents are n/a, and run nothing
    choices = {(c.task, c.fusion, c.label): Choice([], {"optim.lr": 0.1}) for c in plan.cells}
    choices[("synthetic", "concat", "uni slow")] = Choice([], None, "diverged under every configuration")
    dependents = [c for c in plan.cells if c.teachers]
    bind_teachers(plan, choices, dependents)
    assert all("uni slow (diverged under every configuration)" in c.blocked for c in dependents)
    assert not selection_jobs(plan, dependents)
    rows = {r["label"]: r for r in leaderboard(plan, choices)["groups"][0]["rows"]}
    assert rows["UME"]["status"] == "n/a" and "uni slow" in rows["UME"]["reason"]


def test_teachers_do_not_change_the_other_runs(tmp_path):
    """The ordinary cells plan the same run directories (the same keys) with and without methods that
    take teachers, so adding them to a study reuses every finished run."""
    def planned(text, folder):
        plan = plan_study(load_study(write_study(tmp_path / folder, text)), tmp_path / "o", echo=lambda s: None)
        return {c.label: [job.run_dir for *_, job in selection_jobs(plan, [c])] for c in plan.cells if not c.teachers}

    without = STUDY.format(uni=UNI).split("  UMT:")[0]
    assert planned(STUDY.format(uni=UNI), "with") == planned(without, "without")
