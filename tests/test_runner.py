"""The generic loop, evaluation, optimizer/scheduler construction and the run directory."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from modbal.config import resolve
from modbal.methods.base import Method
from modbal.metrics.classification import accuracy, confusion_matrix, macro_f1
from modbal.train import build_optimizer, build_scheduler, evaluate, run_experiment
from modbal.train import run as run_module
from modbal.train.data import EvalBatchSampler, ShardedBatchSampler, carve_validation, make_loader

TINY = {
    "dataset": {"name": "synthetic", "num_train": 192, "num_val": 64, "num_test": 64, "num_classes": 4,
                "bayes_samples": 100, "modalities": {"a": {"dim": 3, "separation": 4.0, "label_noise": 0.3},
                                                     "b": {"dim": 12, "separation": 3.0}}},
    "model": {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8}}, "fusion": {"name": "concat"}},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


def tiny(**sections):
    cfg = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return resolve(cfg)


# -- metrics against a naive reference --------------------------------------------------------
def naive_macro_f1(preds, targets):
    classes = sorted(set(preds) | set(targets))
    scores = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(preds, targets))
        fp = sum(p == c and t != c for p, t in zip(preds, targets))
        fn = sum(p != c and t == c for p, t in zip(preds, targets))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def test_metrics_match_naive_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, c = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        preds, targets = torch.randint(c, (n,), generator=g), torch.randint(c, (n,), generator=g)
        p, t = preds.tolist(), targets.tolist()
        assert accuracy(preds, targets) == pytest.approx(sum(a == b for a, b in zip(p, t)) / n)
        assert macro_f1(preds, targets, c) == pytest.approx(naive_macro_f1(p, t))
        cm = confusion_matrix(preds, targets, c)
        assert int(cm.sum()) == n and int(cm[t[0], p[0]]) >= 1


# -- the loop fires every hook ------------------------------------------------------------------
class Recorder(Method):
    name = "recorder"

    def __init__(self):
        self.calls = []
        self.metrics = []

    def loss(self, model, inputs, targets):
        self.calls.append("loss")
        return nn.functional.cross_entropy(model(inputs), targets)

    def after_backward(self, model):
        assert any(p.grad is not None for p in model.parameters())
        self.calls.append("after_backward")

    def after_step(self, model):
        self.calls.append("after_step")

    def on_epoch_start(self, epoch):
        self.calls.append(f"on_epoch_start:{epoch}")

    def on_epoch_end(self, epoch, metrics, model, optimizer):
        self.calls.append(f"on_epoch_end:{epoch}")
        self.metrics.append(dict(metrics))

    def param_groups(self, model):
        self.calls.append("param_groups")
        return [{"params": list(model.encoders["a"].parameters()), "modality": "a", "lr_scale": 0.5},
                {"params": list(model.encoders["b"].parameters()), "modality": "b", "lr": 0.123},
                {"params": list(model.fusion.parameters())}]

    def statistics(self):
        self.calls.append("statistics")
        return {"kappa/a": 1.0, "kappa/b": 1.0}

    def state_dict(self):
        self.calls.append("state_dict")
        return {"n": len(self.calls)}

    def load_state_dict(self, state):
        pass


def test_every_hook_fires_in_order(tmp_path, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(run_module, "build_method", lambda config: recorder)
    summary = run_experiment(tiny(), tmp_path / "run")
    calls = recorder.calls
    assert calls[0] == "param_groups" and calls[1] == "on_epoch_start:0"
    per_step = ["loss", "after_backward", "after_step", "statistics"]
    steps = 192 // 32
    body = calls[2:2 + 4 * steps]
    assert body == per_step * steps
    assert calls.index("on_epoch_end:0") < calls.index("on_epoch_start:1")
    assert "state_dict" in calls and "on_epoch_end:1" in calls
    keys = set(recorder.metrics[0])
    assert keys == {"acc", "macro_f1", "loss", "mono_acc/a", "mono_acc/b", "mono_loss/a", "mono_loss/b",
                    "head_acc/a", "head_acc/b", "head_loss/a", "head_loss/b"}  # concat: per-modality heads
    assert summary["status"] == "complete" and summary["best_epoch"] in (0, 1)
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert (len(rows) == 2 * steps and rows[0]["lr/a"] == pytest.approx(0.025)
            and rows[0]["lr/b"] == pytest.approx(0.123))
    assert rows[-1]["step"] == 2 * steps and rows[0]["kappa/a"] == 1.0


def test_run_directory_contents(tmp_path):
    cfg = tiny(method={"name": "agm", "alpha": 1.0})
    run_dir = tmp_path / "r"
    summary = run_experiment(cfg, run_dir)
    for name in ("config.yaml", "steps.jsonl", "epochs.jsonl", "summary.json", "log.txt",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("checkpoints/*.tmp")) and not list(run_dir.glob("checkpoints/.*"))
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["test"] == summary["test"]
    for key in ("dataset", "method", "fusion", "seed", "modalities", "best_epoch", "val", "test", "elapsed_s"):
        assert key in on_disk
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for key in ("train/loss", "train/acc", "val/acc", "val/macro_f1", "val/loss", "val/mono_acc/a",
                "val/mono_loss/b", "time_s"):
        assert key in epochs[0]
    best = max(range(2), key=lambda i: (epochs[i]["val/acc"], -i))
    assert on_disk["best_epoch"] == best and on_disk["val"]["acc"] == epochs[best]["val/acc"]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert "kappa/a" in steps[0] and "loss" in steps[0] and "lr" in steps[0]
    # an occupied run directory is refused
    from modbal.config import ConfigError
    with pytest.raises(ConfigError, match="already holds a run"):
        run_experiment(cfg, run_dir)


def test_evaluate_mono_matches_shapley_output():
    cfg = tiny()
    data = run_module.build_data(cfg)
    model = run_module.build_model_from_config(cfg, data)
    loader = make_loader(data["val"], EvalBatchSampler(len(data["val"]), 20))
    metrics = evaluate(model, loader)
    inputs = {m: data["val"].inputs[m] for m in ("a", "b")}
    targets = data["val"].labels
    model.eval()
    with torch.no_grad():
        out = model(inputs, shapley="features")
    assert metrics["acc"] == pytest.approx(float((out.logits.argmax(-1) == targets).float().mean()))
    assert metrics["mono_acc/b"] == pytest.approx(float((out.mono[1].argmax(-1) == targets).float().mean()))
    assert metrics["mono_loss/a"] == pytest.approx(float(nn.functional.cross_entropy(out.mono[0], targets)), rel=1e-5)
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(out.logits, targets)), rel=1e-5)


def test_validation_carved_from_train_when_missing(tmp_path, synthetic_without_val):
    summary = run_experiment(tiny(train={"val_fraction": 0.25, "epochs": 1}), tmp_path / "r")
    assert summary["val_carved_from_train"] and summary["sizes"] == {"train": 144, "val": 48, "test": 64}
    train, val = carve_validation(list(range(100)), 0.2, seed=3)
    assert sorted(list(train.indices) + list(val.indices)) == list(range(100)) and len(val) == 20
    assert carve_validation(list(range(100)), 0.2, seed=3)[1].indices == val.indices


def test_optimizers_and_schedules():
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    opt = build_optimizer([{"params": [params[0]], "lr_scale": 2.0, "modality": "x"}, {"params": [params[1]]}],
                          {"name": "adamw", "lr": 0.1, "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1e-8})
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2) and opt.param_groups[1]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[0]["modality"] == "x"
    sched = build_scheduler(opt, {"schedule": "step", "step_size": 2, "gamma": 0.5}, epochs=10)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    opt = build_optimizer([{"params": params}], {"name": "sgd", "lr": 1.0, "momentum": 0.9})
    sched = build_scheduler(opt, {"schedule": "cosine", "min_lr": 0.0}, epochs=4)
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([{"params": []}], {"name": "sgd", "lr": 0.1})


def test_sampler_shards_global_batches_and_resumes():
    full = ShardedBatchSampler(10, 4, seed=1)
    full.set_epoch(3)
    batches = list(full)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    shards = []
    for r in range(2):
        s = ShardedBatchSampler(10, 4, seed=1, rank=r, world_size=2)
        s.set_epoch(3)
        shards.append(list(s))
    for i, b in enumerate(batches):
        assert shards[0][i] + shards[1][i] == b
    full.set_epoch(3, start=1)
    assert list(full) == batches[1:]
    full.set_epoch(4)
    assert list(full) != batches


def test_seeded_runs_are_identical_and_seeds_differ(tmp_path):
    a = run_experiment(tiny(train={"epochs": 1}), tmp_path / "a")
    b = run_experiment(tiny(train={"epochs": 1}), tmp_path / "b")
    c = run_experiment(tiny(train={"epochs": 1}, seed=1), tmp_path / "c")
    assert a["test"] == b["test"]
    assert a["test"] != c["test"]


def test_non_finite_loss_stops_with_message(tmp_path):
    cfg = tiny(optim={"lr": 1e6, "momentum": 0.0}, train={"epochs": 2})
    with pytest.raises(FloatingPointError):
        run_experiment(cfg, tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]


def test_bf16_autocast_deterministic_cosine(tmp_path):
    cfg = tiny(method={"name": "agm"}, optim={"schedule": "cosine", "name": "adam", "lr": 1e-3},
               train={"epochs": 2, "amp": "bf16", "deterministic": True})
    summary = run_experiment(cfg, tmp_path / "r")
    assert summary["status"] == "complete" and math.isfinite(summary["test"]["loss"])
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    epochs = [json.loads(line) for line in (tmp_path / "r" / "epochs.jsonl").read_text().splitlines()]
    assert epochs[0]["lr"] == pytest.approx(1e-3)
