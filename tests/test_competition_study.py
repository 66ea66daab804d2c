"""benchmarks/competition_study.py: its tables from hand-made run directories (no training)."""
import json
from pathlib import Path

import pytest
import yaml
from _benchmark_script import load_benchmark_script
from scipy import stats


@pytest.fixture(scope="module")
def study():
    return load_benchmark_script("competition_study")


def write_run(root: Path, method: str, lr: float, seed: int, val: float, test: float, d: dict, phi: dict,
              analyzed: bool = True) -> Path:
    run = root / f"{method}-lr{lr}-seed{seed}"
    run.mkdir(parents=True)
    config = {"dataset": {"name": "toy"}, "model": {"fusion": {"name": "concat"}}, "method": {"name": method},
              "optim": {"lr": lr}, "seed": seed}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "summary.json").write_text(json.dumps({
        "status": "complete", "seed": seed, "val": {"acc": val},
        "test": {"acc": test, "mono_acc/a": 0.5, "mono_acc/b": 0.4}}))
    if analyzed:
        concepts = {m: [{"run_dir": f"c/{m}-{k}", "seed": k, "test_acc": 0.6} for k in (1000, 1001)] for m in d}
        (run / "competition.json").write_text(json.dumps({
            "scores_by_concept_seed": d, "concept_seeds": [1000, 1001], "alpha": 120.0, "concepts": concepts}))
        (run / "shape.json").write_text(json.dumps({"shapley": phi, "cooperation": 0.0}))
    return run


@pytest.mark.filterwarnings("ignore:Precision loss")  # constant made-up scores in a Welch test
def test_tables_select_on_validation_and_compare_at_matched_lrs(tmp_path, study, capsys):
    d_joint = {0: [0.80, 0.82], 1: [0.84, 0.86], 2: [0.81, 0.85]}
    d_agm = {0: [0.70, 0.72], 1: [0.75, 0.73], 2: [0.69, 0.71]}
    for seed in range(3):
        # lr 0.1 has the better test accuracy but the worse validation accuracy: 0.01 must be kept
        write_run(tmp_path, "joint", 0.01, seed, 0.9, 0.5, {"a": [0.5, 0.5], "b": d_joint[seed]},
                  {"a": 0.3 + seed / 50, "b": 0.1 - seed / 70})
        write_run(tmp_path, "joint", 0.1, seed, 0.8, 0.99, {"a": [0.1, 0.1], "b": [0.1, 0.1]}, {"a": 0.1, "b": 0.3})
        write_run(tmp_path, "agm", 0.01, seed, 0.7, 0.6, {"a": [0.2, 0.2], "b": [0.2 + seed / 100, 0.21]},
                  {"a": 0.2, "b": 0.2})
        write_run(tmp_path, "agm", 0.1, seed, 0.85, 0.55, {"a": [0.6, 0.6], "b": d_agm[seed]},
                  {"a": 0.25 + seed / 40, "b": 0.2 + seed / 30})
    assert study.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith(("| concat | joint |", "| concat | agm |"))}
    assert rows["joint"][2:5] == ["0.01", "3", "50.0 ± 0.0"]
    assert rows["agm"][2:5] == ["0.1", "3", "55.0 ± 0.0"]
    d_b = [x for s in range(3) for x in d_joint[s]]
    assert rows["joint"][8] == f"{sum(d_b) / 6:.3f} ± {stats.tstd(d_b):.3f}"
    # Δd_b = d_b(joint) − d_b(agm) at lr 0.01, over the run means, with Welch's p
    mean_joint = [sum(v) / 2 for v in d_joint.values()]
    line = next(x for x in out.splitlines() if x.startswith("| concat | 0.01 |"))
    mean_agm = [(0.2 + s / 100 + 0.21) / 2 for s in range(3)]
    p = stats.ttest_ind(mean_joint, mean_agm, equal_var=False).pvalue
    assert line.split("|")[6].strip() == f"{(sum(mean_joint) - sum(mean_agm)) / 3:+.3f} ({p:.2g})"
    # stability: within-run std of d_b, mean over joint's and agm's selected runs
    within = [stats.tstd(v) for v in [*d_joint.values(), *d_agm.values()]]
    stab = next(x for x in out.splitlines() if x.startswith("| concat | b |"))
    assert stab.split("|")[4].strip() == f"{sum(within) / 6:.3f}"
    assert "| a only | 6 |" in out and "| all (run, modality) | 12 |" in out


def test_a_run_without_scores_is_named(tmp_path, study, capsys):
    write_run(tmp_path, "joint", 0.01, 0, 0.9, 0.5, {"a": [0.5]}, {"a": 0.3}, analyzed=False)
    assert study.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "competition.json" in err and "joint-lr0.01-seed0" in err and "--analyze" in err
