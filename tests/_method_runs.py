"""Scaffolding shared by the method and runner tests: the tiny models and recipes they train, a run
interrupted at a chosen hook, and torchrun with two CPU ranks (gloo).

Runner-level checks: a run interrupted mid-epoch and resumed ends exactly where an uninterrupted run
ends (:func:`assert_resume_exact`); two ranks train like one process (:func:`assert_ddp_matches_single`).
Nothing here computes an expected value of a method: the reference transcriptions stay in the tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from torch import nn

from modbal import MultimodalModel
from modbal.cli import main
from modbal.config import load_recipe
from modbal.fusions import ConcatFusion
from modbal.registry import METHODS
from modbal.train import run_experiment

# input width of each modality of the tiny models (a model of M modalities takes the first M)
DIMS = {"a": 5, "b": 7, "c": 4}


def tiny_model(m_total: int, *, width: int | dict[str, int] = 6, classes: int = 4, norm: bool = False,
               act: type[nn.Module] = nn.Tanh, fusion: Any = ConcatFusion, seed: int = 0,
               **fusion_kw: Any) -> MultimodalModel:
    """A float64 model on the first ``m_total`` modalities of :data:`DIMS`: per modality
    Linear(DIMS[m], width) [BatchNorm1d] act, then ``fusion``; the same weights for the same seed."""
    torch.manual_seed(seed)
    names = list(DIMS)[:m_total]
    widths = width if isinstance(width, dict) else dict.fromkeys(names, width)
    encoders = {m: nn.Sequential(nn.Linear(DIMS[m], widths[m]), *([nn.BatchNorm1d(widths[m])] if norm else []), act())
                for m in names}
    return MultimodalModel(encoders, fusion({m: (widths[m],) for m in names}, classes, **fusion_kw)).double()


def random_batch(m_total: int, n: int = 10, seed: int = 0, classes: int = 4,
                 scales: tuple[float, ...] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A float64 batch of standard normal inputs for the first ``m_total`` modalities of :data:`DIMS`
    (modality i times ``scales[i]``, when given) and uniform labels, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, DIMS[m], generator=g, dtype=torch.float64) for m in list(DIMS)[:m_total]}
    if scales is not None:
        x = {m: v * scales[i] for i, (m, v) in enumerate(x.items())}
    return x, torch.randint(classes, (n,), generator=g)


def plain_step(model: nn.Module, method: Any, optimizer: torch.optim.Optimizer, inputs: dict, targets) -> torch.Tensor:
    """One step of the plain training loop of :mod:`modbal.methods.base`: the method's loss, backward,
    ``after_backward``, the optimizer's step. Returns the loss."""
    loss = method.loss(model, inputs, targets)
    optimizer.zero_grad()
    loss.backward()
    method.after_backward(model)
    optimizer.step()
    return loss


def synthetic(num_train: int = 128, num_val: int = 32, num_test: int = 32, bayes_samples: int = 50) -> dict:
    """The runner tests' dataset: 4 classes, ``a`` (3 dims, well separated, 30 % label noise) and ``b`` (12 dims)."""
    return {"name": "synthetic", "num_train": num_train, "num_val": num_val, "num_test": num_test, "num_classes": 4,
            "bayes_samples": bayes_samples, "modalities": {"a": {"dim": 3, "separation": 4.0, "label_noise": 0.3},
                                                           "b": {"dim": 12, "separation": 3.0}}}


def mlp_model(dropout: float | None = None) -> dict:
    """The runner tests' model: an MLP encoder per modality (hidden 16, out 8) and concatenation."""
    encoder = {"name": "mlp", "hidden": [16], "out_dim": 8, **({} if dropout is None else {"dropout": dropout})}
    return {"encoders": {"*": encoder}, "fusion": {"name": "concat"}}


def recipe(method: dict, dropout: float = 0.2) -> dict:
    return {
        "seed": 3,
        "dataset": synthetic(192, 64, 64, bayes_samples=100),
        "model": mlp_model(dropout),
        "method": method,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 3, "batch_size": 32, "device": "cpu", "checkpoint_every": 4, "tensorboard": False},
    }


def write_recipe(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Interrupted(Exception):
    """Raised by a patched hook: the run stops there, as if killed after its last checkpoint."""


def run_interrupted(monkeypatch, cls: type, hook: str, stop: Callable[..., bool], config: Any, run_dir: Path) -> None:
    """Run ``config`` into ``run_dir`` with ``cls.<hook>`` raising :class:`Interrupted` instead of running
    when ``stop(self, *args)`` is true; the hook is restored afterwards."""
    original = getattr(cls, hook)

    def patched(self, *args, **kwargs):
        if stop(self, *args):
            raise Interrupted
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, hook, patched)
    with pytest.raises(Interrupted):
        run_experiment(config, run_dir)
    monkeypatch.setattr(cls, hook, original)


def steps(run_dir: Path) -> list[dict]:
    """The run's ``steps.jsonl`` records without their timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def last_checkpoints(run_a: Path, run_b: Path) -> tuple[dict, dict]:
    return tuple(torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (run_a, run_b))


def assert_same_weights(a: dict, b: dict) -> None:
    """Every tensor of the model state ``b`` is equal, bit for bit, in ``a``."""
    for key, value in b.items():
        assert torch.equal(a[key], value), key


def assert_resume_exact(tmp_path, monkeypatch, method: dict, stop_after: int = 10) -> None:
    """Run ``method`` 3 epochs of 6 steps; interrupt a second run after ``stop_after`` steps (its last
    checkpoint is at step 8, inside epoch 1), resume it, and compare weights, logs and metrics."""
    path = write_recipe(tmp_path, recipe(method))
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
    assert steps(tmp_path / "stopped") == steps(tmp_path / "reference")
    a, b = last_checkpoints(tmp_path / "stopped", tmp_path / "reference")
    assert_same_weights(a["model"], b["model"])


def torchrun(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (one thread per process), its output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def train_single_and_ddp(tmp_path, config: dict) -> tuple[dict, dict]:
    """The summaries of ``config`` trained in one process (``single``) and by two ranks (``ddp``)."""
    path = write_recipe(tmp_path, config)
    single = run_experiment(load_recipe(path), tmp_path / "single")
    proc = torchrun("-m", "modbal.cli", "train", str(path), "--run-dir", str(tmp_path / "ddp"), "--quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    return single, ddp


def assert_same_steps_and_weights(tmp_path, keys: Callable[[dict], tuple[str, ...]], count: int | None) -> None:
    """``single`` and ``ddp`` logged the same ``keys(row)`` at every step (``count`` steps, when given,
    else more than 12) and ended with the same weights (float tolerance)."""
    a, b = steps(tmp_path / "single"), steps(tmp_path / "ddp")
    assert len(a) == len(b)
    assert len(a) == count if count is not None else len(a) > 12
    for ra, rb in zip(a, b):
        for key in keys(ra):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    wa, wb = (c["model"] for c in last_checkpoints(tmp_path / "single", tmp_path / "ddp"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)


def assert_ddp_matches_single(tmp_path, method: dict, statistics: tuple[str, ...]) -> None:
    """Train ``method`` in one process and under torchrun with two gloo ranks (no dropout, so the
    shards compute exactly the single-process batch): same statistics per step, same weights."""
    config = recipe(method, dropout=0.0)
    config["train"].update(epochs=2, checkpoint_every=0)
    train_single_and_ddp(tmp_path, config)
    assert_same_steps_and_weights(tmp_path, lambda row: (*statistics, "loss", "acc"), 2 * 192 // 32)
