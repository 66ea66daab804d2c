"""Run directories written by hand in the documented format (docs/design.md, "The runner's files")."""
import json
import math
from pathlib import Path

import yaml

MODALITIES = ("audio", "image")


def make_run(root, dataset="synthetic", fusion="concat", method="agm", seed=0, epochs=4, steps_per_epoch=3,
             acc=0.8, complete=True, competition=None, shape=None):
    run = Path(root) / f"{dataset}-{fusion}-{method}-seed{seed}"
    run.mkdir(parents=True)
    config = {"seed": seed, "dataset": {"name": dataset}, "model": {"encoders": {"*": {"name": "mlp"}},
              "fusion": {"name": fusion}}, "method": {"name": method}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with open(run / "steps.jsonl", "w") as f:
        step = 0
        for e in range(epochs):
            for _ in range(steps_per_epoch):
                row = {"epoch": e, "step": step, "loss": 1.0 / (step + 1), "lr": 0.01}
                if method == "agm":
                    row.update({"kappa/audio": 1.0 + 0.1 * math.sin(step + seed), "kappa/image": 0.9,
                                "mono_acc/audio": 0.5, "mono_acc/image": 0.4})
                f.write(json.dumps(row) + "\n")
                step += 1
        f.write('{"epoch": 9, "step"')  # a run killed mid-write leaves a partial line
    with open(run / "epochs.jsonl", "w") as f:
        for e in range(epochs):
            row = {"epoch": e, "train/loss": 1.0, "train/acc": 0.5, "val/acc": acc * (e + 1) / epochs,
                   "val/macro_f1": 0.5, "val/loss": 1.0, "time_s": 0.1}
            for i, m in enumerate(MODALITIES):
                row[f"val/mono_acc/{m}"] = 0.3 + 0.1 * e + 0.05 * i + 0.01 * seed
                row[f"val/mono_loss/{m}"] = 1.5
            f.write(json.dumps(row) + "\n")
    if complete:
        summary = {"dataset": dataset, "method": method, "fusion": fusion, "seed": seed,
                   "modalities": list(MODALITIES), "best_epoch": epochs - 1,
                   "val": {"acc": acc, "macro_f1": acc - 0.05, "loss": 0.7},
                   "test": {"acc": acc, "macro_f1": acc - 0.05, "loss": 0.7,
                            "mono_acc/audio": 0.6, "mono_acc/image": 0.5},
                   "elapsed_s": 1.5, "status": "complete"}
        (run / "summary.json").write_text(json.dumps(summary))
    if competition is not None:
        (run / "competition.json").write_text(json.dumps({"alpha": 120.0, "scores": competition,
                                                          "concept_seeds": [1000, 1001], "shared_init": False}))
    if shape is not None:
        (run / "shape.json").write_text(json.dumps(shape))
    return run


def make_grid(root):
    """Two methods × two fusions × two seeds, one unfinished run, analyses on some runs."""
    runs = []
    for fusion in ("concat", "sum"):
        for method, base in (("joint", 0.70), ("agm", 0.78)):
            for seed in (0, 1):
                runs.append(make_run(root, fusion=fusion, method=method, seed=seed, acc=base + 0.02 * seed,
                                     competition={"audio": 0.2 + 0.1 * seed, "image": 0.6}
                                     if fusion == "concat" else None,
                                     shape={"shapley": {"audio": 0.3, "image": 0.2 + 0.01 * seed}, "cooperation": 0.05}
                                     if fusion == "concat" else None))
    runs.append(make_run(root, fusion="sum", method="agm", seed=2, complete=False))
    return runs


# -- tests -------------------------------------------------------------------------------------
import base64  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from modbal.report.html import write_report  # noqa: E402
from modbal.report.tables import (  # noqa: E402
    accuracy_table,
    find_run_dirs,
    group_runs,
    load_run,
    load_runs,
    mean_curve,
    mean_std,
    per_modality_table,
)


def test_mean_std_sample_std_and_count():
    st = mean_std([1.0, 2.0, 3.0, None, float("nan")])
    assert (st.mean, st.n) == (2.0, 3) and st.std == pytest.approx(1.0)
    assert mean_std([]).n == 0 and mean_std([]).format() == "—"
    assert mean_std([0.5]).format(100) == "50.00"


def test_load_and_group(tmp_path):
    make_grid(tmp_path)
    (tmp_path / "agm-run" / "concepts" / "audio").mkdir(parents=True)  # concept models are not runs
    (tmp_path / "agm-run" / "concepts" / "audio" / "config.yaml").write_text("seed: 0\n")
    dirs = find_run_dirs([tmp_path])
    assert len(dirs) == 9
    runs = load_runs([tmp_path])
    run = load_run(dirs[0])
    assert len(run.steps) == 12  # the truncated last line is skipped
    groups = group_runs(runs)
    assert list(groups) == sorted(groups) and len(groups) == 4
    unfinished = [r for r in runs if not r.complete]
    assert len(unfinished) == 1 and unfinished[0].key == ("synthetic", "sum", "agm")  # from config.yaml
    with pytest.raises(FileNotFoundError):
        find_run_dirs([tmp_path / "missing"])


def test_tables_aggregate_over_seeds(tmp_path):
    groups = group_runs(load_runs([make_grid(tmp_path)[0].parent]))
    acc = accuracy_table(groups)
    rows = {tuple(r[:3]): r for r in acc.rows}
    assert rows[("synthetic", "concat", "agm")][3] == "2"
    assert rows[("synthetic", "concat", "agm")][4] == "79.00 ± 1.41"   # 78 and 80
    assert rows[("synthetic", "sum", "agm")][3] == "2/3"               # one unfinished run
    comp = per_modality_table(groups, "competition")
    crow = {tuple(r[:3]): r for r in comp.rows}
    assert set(crow) == {("synthetic", "concat", "agm"), ("synthetic", "concat", "joint")}
    assert crow[("synthetic", "concat", "joint")][4:] == ["0.250 ± 0.071", "0.600 ± 0.000", "2"]
    # a run scored against a concept with its own seed is flagged
    run = next(r for r in groups[("synthetic", "concat", "joint")])
    run.competition.update(concept_seeds=[run.seed], shared_init=True)
    cell = {tuple(r[:3]): r
            for r in per_modality_table(groups, "competition").rows}[("synthetic", "concat", "joint")][-1]
    assert cell == "1/2 (shared init in 1)"
    shp = per_modality_table(groups, "shapley")
    assert {tuple(r[:3]): r for r in shp.rows}[("synthetic", "concat", "agm")][4:] == [
        "30.00 ± 0.00", "20.50 ± 0.71", "5.00 ± 0.00"]


def test_curves_from_steps_and_epochs(tmp_path):
    runs = [load_run(make_run(tmp_path, seed=s)) for s in (0, 1)]
    xs, mean, std = mean_curve(runs, "kappa/image", "steps")
    assert xs == [0, 1, 2, 3] and mean == pytest.approx([0.9] * 4)
    # a varying statistic: per-epoch mean of the steps, then mean over the two runs
    xs, mean, _ = mean_curve(runs, "kappa/audio", "steps")
    expected = [sum(1.0 + 0.1 * math.sin(step + seed) for seed in (0, 1) for step in range(3 * e, 3 * e + 3)) / 6
                for e in range(4)]
    assert mean == pytest.approx(expected)
    xs, mean, _ = mean_curve(runs, "val/mono_acc/audio", "epochs")
    assert mean[0] == pytest.approx(0.305)


def test_write_report_self_contained(tmp_path):
    make_grid(tmp_path / "runs")
    paths = write_report(load_runs([tmp_path / "runs"]), tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| synthetic | concat | agm | 2 | 79.00 ± 1.41 |" in md
    assert "Competition strength" in md and "Shapley contributions" in md
    page = paths["html"].read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "external resource in the page"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # training curves ×2 fusions, test accuracy, competition, shapley
    assert len(images) == 5
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
