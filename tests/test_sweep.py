"""Sweep grids: axis parsing, deterministic names, skip / resume / new decisions, the final report."""
import json
from pathlib import Path

import pytest
import yaml

from modbal.bench import grid
from modbal.config import load_recipe
from modbal.report import sweep as sw


def test_expand_values():
    assert sw.expand_values("joint,agm") == ["joint", "agm"]
    assert sw.expand_values("0:3") == ["0", "1", "2"]
    assert sw.expand_values("0:2,7") == ["0", "1", "7"]
    with pytest.raises(sw.SweepError, match="empty range"):
        sw.expand_values("3:3")
    with pytest.raises(sw.SweepError, match="empty value"):
        sw.expand_values("a,,b")


def test_parse_axes_and_plan():
    axes = sw.parse_axes(["method=joint,agm", "seed=0:2", "fusion=concat,sum"])
    jobs = sw.plan(axes, base_fusion="concat", fixed=["train.epochs=1"])
    assert len(jobs) == 8
    assert jobs[0].name == "method-joint__seed-0__fusion-concat"
    assert jobs[0].overrides == ("train.epochs=1", "method=joint", "seed=0", "model.fusion.name=concat")
    assert jobs[1].overrides[-1] == "model.fusion={name: sum}"
    assert sw.plan(axes, "concat") == sw.plan(axes, "concat")  # deterministic
    for bad in (["method"], ["seed=0:2", "seed=1"], ["seed=1,1"]):
        with pytest.raises(sw.SweepError):
            sw.parse_axes(bad)
    assert sw.run_name([("method.alpha", "1/2")]) == "method.alpha-1_2"


def _fake_runner(calls):
    def train_run(config, run_dir, resume):
        calls.append((Path(run_dir).name, resume))
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run / "config.yaml").write_text(yaml.safe_dump(dict(config)))
        seed, method = config["seed"], config["method"]["name"]
        (run / "epochs.jsonl").write_text(json.dumps({"epoch": 0, "val/acc": 0.5}) + "\n")
        complete = not (method == "agm" and seed == 1 and not resume)
        (run / "summary.json").write_text(json.dumps({
            "dataset": "synthetic", "fusion": "concat", "method": method, "seed": seed,
            "modalities": ["fast", "slow"], "test": {"acc": 0.5 + seed / 10}, "val": {"acc": 0.5},
            "status": "complete" if complete else "failed", "error": "RuntimeError: simulated failure"}))
        if not complete:
            raise RuntimeError("simulated failure")
    return train_run


def test_sweep_skips_complete_resumes_unfinished(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid, "train_run", _fake_runner(calls))
    out = tmp_path / "grid"
    # one run already complete, one interrupted with a checkpoint
    done = out / "method-joint__seed-0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "complete", "method": "joint", "seed": 0,
                                                   "dataset": "synthetic", "fusion": "concat"}))
    partial = out / "method-agm__seed-0"
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "checkpoints" / "last.pt").write_bytes(b"x")
    (partial / "config.yaml").write_text(yaml.safe_dump(load_recipe(None, ["method=agm", "seed=0"])))
    lines = []
    res = sw.sweep(None, sw.parse_axes(["method=joint,agm", "seed=0:2"]), out, echo=lines.append)
    assert calls == [("method-joint__seed-1", False), ("method-agm__seed-0", True), ("method-agm__seed-1", False)]
    assert res["skipped"] == [str(done)]
    assert list(res["failed"]) == [str(out / "method-agm__seed-1")]
    assert "1 complete, 1 to resume, 2 new" in lines[0]
    assert (out / "report" / "report.html").exists()
    assert "| synthetic | concat | joint | 2 |" in (out / "report" / "report.md").read_text()


def test_sweep_validates_every_combination_first(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid, "train_run", _fake_runner(calls))
    with pytest.raises(ValueError, match="nope"):
        sw.sweep(None, sw.parse_axes(["method=joint,nope"]), tmp_path / "g", echo=lambda s: None)
    assert calls == []


def test_a_started_run_of_another_config_is_not_resumed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid, "train_run", _fake_runner(calls))
    run = tmp_path / "g" / "method-agm"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(load_recipe(None, ["method=agm", "seed=5"])))
    res = sw.sweep(None, sw.parse_axes(["method=joint,agm"]), tmp_path / "g", report=False, echo=lambda s: None)
    assert calls == [("method-joint", False)]
    assert "holds a run of another config" in res["failed"][str(run)]


def test_diverged_runs_are_final_and_same_configs_are_one_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid, "train_run", _fake_runner(calls))
    run = tmp_path / "g" / "method-agm"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "failed", "error": "FloatingPointError: nan"}))
    res = sw.sweep(None, sw.parse_axes(["method=joint,agm"]), tmp_path / "g", report=False, echo=lambda s: None)
    assert calls == [("method-joint", False)] and res["skipped"] == [str(run)] and not res["failed"]
    with pytest.raises(sw.SweepError, match="give the same config"):
        sw.sweep(None, sw.parse_axes(["optim.lr=0.01,1e-2"]), tmp_path / "h", echo=lambda s: None)


def test_report_groups_by_every_setting_that_differs(tmp_path):
    """An lr sweep gives one group per learning rate (it used to merge them into one mean)."""
    from modbal.report.tables import group_runs, load_runs, markdown_report

    for lr, acc in ((0.01, 0.5), (0.03, 0.9)):
        for seed in (0, 1):
            run = tmp_path / f"lr{lr}-s{seed}"
            run.mkdir()
            (run / "config.yaml").write_text(yaml.safe_dump(load_recipe(None, [f"optim.lr={lr}", f"seed={seed}"])))
            (run / "summary.json").write_text(json.dumps({"dataset": "synthetic", "fusion": "concat", "method": "joint",
                                                          "seed": seed, "status": "complete", "modalities": [],
                                                          "test": {"acc": acc + seed / 100}, "val": {"acc": acc}}))
    groups = group_runs(load_runs([tmp_path]))
    assert {k: len(v) for k, v in groups.items()} == {("synthetic", "concat", "joint (lr=0.01)"): 2,
                                                     ("synthetic", "concat", "joint (lr=0.03)"): 2}
    text = markdown_report(load_runs([tmp_path]))
    assert "4 runs in 2 groups" in text
    assert "| synthetic | concat | joint (lr=0.01) | 2 | 50.50 ± 0.71 |" in text
