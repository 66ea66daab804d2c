"""Runner-level checks shared by the method tests: a run interrupted mid-epoch and resumed ends
exactly where an uninterrupted run ends; two CPU ranks (torchrun, gloo) train like one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from modbal.cli import main
from modbal.config import load_recipe
from modbal.registry import METHODS
from modbal.train import run_experiment


def recipe(method: dict, dropout: float = 0.2) -> dict:
    return {
        "seed": 3,
        "dataset": {"name": "synthetic", "num_train": 192, "num_val": 64, "num_test": 64, "num_classes": 4,
                    "bayes_samples": 100, "modalities": {"a": {"dim": 3, "separation": 4.0, "label_noise": 0.3},
                                                         "b": {"dim": 12, "separation": 3.0}}},
        "model": {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8, "dropout": dropout}},
                  "fusion": {"name": "concat"}},
        "method": method,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 3, "batch_size": 32, "device": "cpu", "checkpoint_every": 4, "tensorboard": False},
    }


class Interrupted(Exception):
    pass


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in path.read_text().splitlines()]


def assert_resume_exact(tmp_path, monkeypatch, method: dict, stop_after: int = 10) -> None:
    """Run ``method`` 3 epochs of 6 steps; interrupt a second run after ``stop_after`` steps (its last
    checkpoint is at step 8, inside epoch 1), resume it, and compare weights, logs and metrics."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(method)))
    reference = run_experiment(load_recipe(path), tmp_path / "reference")

    cls = METHODS.get(method["name"])
    original, calls = cls.after_step, []

    def after_step(self, model):
        original(self, model)
        calls.append(1)
        if len(calls) == stop_after:
            raise Interrupted

    monkeypatch.setattr(cls, "after_step", after_step)
    try:
        run_experiment(load_recipe(path), tmp_path / "stopped")
        raise AssertionError("the run was not interrupted")
    except Interrupted:
        pass
    monkeypatch.setattr(cls, "after_step", original)
    ckpt = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["loop"]["epoch"] == 1 and ckpt["loop"]["step_in_epoch"] == 2
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "stopped"), "--quiet"]) == 0
    resumed = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"]
    assert _rows(tmp_path / "stopped" / "steps.jsonl") == _rows(tmp_path / "reference" / "steps.jsonl")
    a = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


def assert_ddp_matches_single(tmp_path, method: dict, statistics: tuple[str, ...]) -> None:
    """Train ``method`` in one process and under torchrun with two gloo ranks (no dropout, so the
    shards compute exactly the single-process batch): same statistics per step, same weights."""
    path = tmp_path / "recipe.yaml"
    config = recipe(method, dropout=0.0)
    config["train"].update(epochs=2, checkpoint_every=0)
    path.write_text(yaml.safe_dump(config))
    single = run_experiment(load_recipe(path), tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "modbal.cli", "train", str(path), "--run-dir", str(tmp_path / "ddp"), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    a, b = _rows(tmp_path / "single" / "steps.jsonl"), _rows(tmp_path / "ddp" / "steps.jsonl")
    assert len(a) == len(b) == 2 * 192 // 32
    for ra, rb in zip(a, b):
        for key in (*statistics, "loss", "acc"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    wa = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)
