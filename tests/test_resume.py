"""A training process killed mid-epoch (SIGKILL) and resumed ends exactly where an
uninterrupted run with the same seed ends: same weights, same metrics, same log records."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from modbal.cli import main
from modbal.config import load_recipe
from modbal.train import run_experiment

RECIPE = {
    "seed": 3,
    "dataset": {"name": "synthetic", "num_train": 256, "num_val": 64, "num_test": 64, "num_classes": 4,
                "bayes_samples": 100, "modalities": {"a": {"dim": 3, "separation": 4.0, "label_noise": 0.3},
                                                     "b": {"dim": 12, "separation": 3.0}}},
    # dropout: the resumed run must also restore the RNG to draw the same masks
    "model": {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8, "dropout": 0.2}},
              "fusion": {"name": "concat"}},
    "method": {"name": "agm", "alpha": 1.5},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "step", "step_size": 1, "gamma": 0.7},
    "train": {"epochs": 3, "batch_size": 32, "device": "cpu", "checkpoint_every": 5, "tensorboard": False},
}
KILL_AT_STEP = 12  # 8 steps per epoch: checkpoints at steps 5, 8 (epoch end) and 10; killed in epoch 1

KILLER = textwrap.dedent("""
    import os, signal, sys
    import modbal.methods.agm as agm
    original = agm.AGM.after_step
    def after_step(self, model):
        original(self, model)
        if self._count == {kill}:
            os.kill(os.getpid(), signal.SIGKILL)
    agm.AGM.after_step = after_step
    from modbal.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _rows(path, drop=("time_s",)):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    reference = run_experiment(load_recipe(recipe), tmp_path / "reference")

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER.replace("{kill}", str(KILL_AT_STEP)), "train", str(recipe),
                           "--run-dir", str(killed), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "summary.json").exists()
    ckpt = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["loop"]["global_step"] == 10 and ckpt["loop"]["epoch"] == 1 and ckpt["loop"]["step_in_epoch"] == 2
    assert len(_rows(killed / "steps.jsonl")) == KILL_AT_STEP - 1  # records past the checkpoint exist…

    assert main(["train", "--resume", "--run-dir", str(killed), "--quiet"]) == 0
    resumed = json.loads((killed / "summary.json").read_text())
    # …and are replaced: the logs read as one uninterrupted run
    assert _rows(killed / "steps.jsonl") == _rows(tmp_path / "reference" / "steps.jsonl")
    assert _rows(killed / "epochs.jsonl") == _rows(tmp_path / "reference" / "epochs.jsonl")
    assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"]
    assert resumed["best_epoch"] == reference["best_epoch"]
    a = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    assert a["method"]["count"] == b["method"]["count"] and torch.equal(a["method"]["running"], b["method"]["running"])
    # a finished run resumes to its summary without training again
    assert main(["train", "--resume", "--run-dir", str(killed), "--quiet"]) == 0
    assert "resumed at epoch 1, step 10" in (killed / "log.txt").read_text()


@pytest.mark.parametrize("options", [{}, {"restore": "encoder", "freeze": "remove"}])
def test_mses_run_resumes_after_an_encoder_stopped(tmp_path, monkeypatch, options):
    """The runner's resume order (method state → param groups → setup → optimizer state) works
    once MSES has stopped a modality (default: its best-epoch snapshot restored and its gradients
    zeroed; "remove": its optimizer group emptied), and the run ends as an uninterrupted one."""
    from modbal.methods.mses import MSES

    recipe = dict(RECIPE, method={"name": "mses", "patience": 2, **options},
                  optim={"name": "sgd", "lr": 0.2, "momentum": 0.9},
                  train={**RECIPE["train"], "epochs": 8, "checkpoint_every": 0})
    recipe["model"] = {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8}}, "fusion": {"name": "concat"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    reference = run_experiment(load_recipe(path), tmp_path / "reference")
    interrupt_at = 5
    stopped_early = [r for r in _rows(tmp_path / "reference" / "steps.jsonl")
                     if r["epoch"] < interrupt_at and (r.get("stopped/a") or r.get("stopped/b"))]
    assert stopped_early, "the scenario needs an encoder stopped before the interruption"

    class Interrupted(Exception):
        pass

    original = MSES.on_epoch_start

    def on_epoch_start(self, epoch):
        if epoch == interrupt_at:
            raise Interrupted
        original(self, epoch)

    monkeypatch.setattr(MSES, "on_epoch_start", on_epoch_start)
    with pytest.raises(Interrupted):
        run_experiment(load_recipe(path), tmp_path / "killed")
    monkeypatch.setattr(MSES, "on_epoch_start", original)
    resumed = run_experiment(None, tmp_path / "killed", resume=True)
    assert resumed["test"] == reference["test"] and resumed["epochs"] == reference["epochs"]
    a = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
