"""A method that changes the weights after validation (MSES's restores) flags it, and the loop
scores the epoch on the weights it ends with: best.pt's validation accuracy is the recorded one."""
from __future__ import annotations

import json

import torch

from modbal.train import run_experiment
from modbal.train.run import build_data, build_model_from_config, read_saved_config

CONFIG = {
    "seed": 5,
    "dataset": {"name": "synthetic", "num_train": 256, "num_val": 64, "num_test": 64, "num_classes": 4,
                "bayes_samples": 100, "modalities": {"a": {"dim": 3, "separation": 4.0, "label_noise": 0.3},
                                                     "b": {"dim": 12, "separation": 3.0}}},
    "model": {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8}}, "fusion": {"name": "concat"}},
    "method": {"name": "mses", "patience": 1, "restore": "encoder"},
    "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
    "train": {"epochs": 6, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


def _epochs(run_dir):
    return [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]


def _val_accuracy(run_dir, checkpoint):
    """The checkpoint's validation accuracy, counted here: argmax of the model's logits vs labels."""
    config = read_saved_config(run_dir / "config.yaml")
    data = build_data(config)
    model = build_model_from_config(config, data)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / checkpoint, weights_only=True)["model"])
    model.eval()
    loader = torch.utils.data.DataLoader(data["val"], batch_size=17, collate_fn=data["collate_fn"])
    right = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            right += int((model(inputs).argmax(-1) == targets).sum())
            total += len(targets)
    return right / total


def test_mses_encoder_restore_best_checkpoint_scores_what_was_recorded(tmp_path):
    summary = run_experiment(CONFIG, tmp_path / "run", quiet=True)
    rows = _epochs(tmp_path / "run")
    changed = [r for r in rows if "val_before_change/acc" in r]
    # the scenario: a restore whose pre-restore score would have made its epoch the best one
    assert any(r["val_before_change/acc"] > summary["val"]["acc"] > r["val/acc"] for r in changed), rows
    assert summary["val"]["acc"] == rows[summary["best_epoch"]]["val/acc"]
    assert _val_accuracy(tmp_path / "run", "best.pt") == summary["val"]["acc"]


def test_mses_model_restore_reproduces_the_restored_epochs_metrics(tmp_path):
    config = dict(CONFIG, method={"name": "mses", "patience": 1, "restore": "model"})
    run_experiment(config, tmp_path / "run", quiet=True)
    rows = _epochs(tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert state["stopped"], "the scenario needs a stopped modality"
    for m, t in state["stopped"].items():
        best = rows[state["best_epoch"][m]]
        # the snapshot of epoch b holds its weights as validated first (before a restore of its own)
        prefix = "val_before_change/" if "val_before_change/acc" in best else "val/"
        assert "val_before_change/acc" in rows[t]
        # eval mode: validating the restored whole model again gives exactly that epoch's numbers
        assert {k[4:]: v for k, v in rows[t].items() if k.startswith("val/")} == \
            {k[len(prefix):]: v for k, v in best.items() if k.startswith(prefix)}
    assert _val_accuracy(tmp_path / "run", "last.pt") == rows[-1]["val/acc"]
