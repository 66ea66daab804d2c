"""ReconBoost against the authors' training loop (huacong/ReconBoost, train.py ``main`` and
models/dynamic_net.py ``DynamicNet``, without pre-trained encoders), written here.

The reference keeps its own list of ensemble members, its own shared head and boost rate, builds a
fresh SGD for each boosting phase (the trained modality's encoder and the head) and each
rectification phase (every member, the head and η), and computes the boosting and reconcilement
losses with its own one-hot arithmetic. No modbal helper computes anything on its side.
"""
import copy

import _method_runs as runs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modbal import MultimodalModel
from modbal.config import load_recipe
from modbal.fusions import ConcatFusion
from modbal.methods.base import StepContext, method_modules
from modbal.methods.reconboost import ReconBoost
from modbal.train import evaluate_run, run_experiment

C, D, LR = 4, 6, 0.05


def make_model(m_total, seed=0):
    return runs.tiny_model(m_total, width=D, classes=C, seed=seed)


def batches(m_total, epoch, count=2, n=10):
    g = torch.Generator().manual_seed(100 + epoch)
    return [({m: torch.randn(n, runs.DIMS[m], generator=g, dtype=torch.float64) for m in list(runs.DIMS)[:m_total]},
             torch.randint(C, (n,), generator=g)) for _ in range(count)]


class Original:
    """train.py's stages over per-epoch batch lists (schedule: modalities in order, round robin)."""

    def __init__(self, encoders, head, boost_rate, w1, w2, alpha, live):
        self.encoders, self.head, self.boost_rate = encoders, head, boost_rate
        self.w1, self.w2, self.alpha, self.live = w1, w2, alpha, live
        self.models_name = []  # DynamicNet.models_name

    def model(self, name, x):
        return self.head(self.encoders[name](x[name]))  # model.fc = net_ensemble.head

    def forward(self, x, mask_model=None):
        prediction = None
        with torch.no_grad():
            for name in self.models_name:
                if name == mask_model:
                    continue
                pred = self.model(name, x)
                prediction = pred if prediction is None else prediction + pred
        return None if prediction is None else self.boost_rate * prediction

    def forward_grad(self, x):
        return self.boost_rate * sum(self.model(name, x) for name in self.models_name)

    def stage(self, stage, epochs_per_stage, correct_epoch, data_of_epoch, first_epoch):
        names = list(self.encoders)
        model_name = names[stage % len(names)]
        pre_model_name = names[(stage - 1) % len(names)]
        params = list(self.encoders[model_name].parameters()) + list(self.head.parameters())
        optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
        epoch = first_epoch
        for _ in range(epochs_per_stage):
            for x, lbl in data_of_epoch(epoch):
                out_join = self.forward(x, mask_model=model_name)
                if out_join is None:  # c0: a constant (B, 1) column, softmax 1
                    out_join = torch.full((lbl.shape[0], 1), 0.37, dtype=torch.float64)
                out_obj = self.model(model_name, x)
                target = torch.zeros(lbl.shape[0], C, dtype=torch.float64).scatter_(1, lbl.view(-1, 1), 1)
                boosting = (-self.w1 * (target * out_obj.log_softmax(1)).mean(-1)
                            + self.w2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1))
                for p in params:
                    p.grad = None
                if stage == 0:
                    loss = boosting
                else:
                    pre_out_obj = self.model(pre_model_name, x)
                    current = out_obj if self.live else out_obj.detach()
                    ga = F.mse_loss(current.softmax(1), pre_out_obj.detach().softmax(1))
                    loss = boosting + self.alpha * ga
                loss.mean().backward()
                optimizer.step()
            epoch += 1
        if model_name in self.models_name:
            self.models_name.remove(model_name)
        self.models_name.append(model_name)
        params = [p for name in self.models_name for p in self.encoders[name].parameters()]
        optimizer_correct = torch.optim.SGD(params + list(self.head.parameters()) + [self.boost_rate], LR,
                                            momentum=0.9, weight_decay=5e-4)
        for _ in range(correct_epoch):
            for x, lbl in data_of_epoch(epoch):
                loss = F.cross_entropy(self.forward_grad(x), lbl)
                optimizer_correct.zero_grad()
                loss.backward()
                optimizer_correct.step()
            epoch += 1
        return epoch


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("reconcile", ["detached", "live"])
def test_updates_match_the_original_stages(m_total, reconcile):
    per_stage, correct, stages = 2, 1, 4
    ours = make_model(m_total)
    method = ReconBoost(epochs_per_stage=per_stage, correct_epochs=correct, alpha=0.5, reconcile=reconcile,
                        hidden=5)
    method.attach(ours)
    head = method_modules(ours)["head"]
    eta = nn.Parameter(head.boost_rate.detach().clone())
    ref = Original(copy.deepcopy(ours.encoders), copy.deepcopy(head.mlp), eta, 5.0, 1.0, 0.5, reconcile == "live")
    opt = torch.optim.SGD(ours.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    epoch = 0
    for stage in range(stages):
        for _ in range(per_stage + correct):
            for i, (x, y) in enumerate(batches(m_total, epoch)):
                method.train_step(ours, x, y, StepContext(opt, epoch=epoch, step_in_epoch=i, steps_per_epoch=2), 0)
            epoch += 1
        ref.stage(stage, per_stage, correct, lambda e: batches(m_total, e), epoch - per_stage - correct)
        for m in ours.modalities:
            for p, q in zip(ours.encoders[m].parameters(), ref.encoders[m].parameters()):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
        for p, q in zip(head.mlp.parameters(), ref.head.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(head.boost_rate, ref.boost_rate, rtol=1e-9, atol=1e-11)
    # the test-time output is the ensemble of the members
    x, _ = batches(m_total, 99)[0]
    with torch.no_grad():
        torch.testing.assert_close(method.predict(ours, x).logits, ref.forward(x), rtol=1e-9, atol=1e-11)


def test_the_released_reconcilement_term_changes_no_gradient():
    """'detached' equals alpha = 0 in its updates; 'live' does not."""
    finals = {}
    for name, kwargs in {"off": {"alpha": 0.0}, "detached": {}, "live": {"reconcile": "live"}}.items():
        model = make_model(2)
        method = ReconBoost(epochs_per_stage=1, correct_epochs=0, hidden=5, **kwargs)
        method.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        for epoch in range(3):
            for i, (x, y) in enumerate(batches(2, epoch)):
                method.train_step(model, x, y, StepContext(opt, epoch=epoch, step_in_epoch=i), 0)
        finals[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(finals["off"], finals["detached"])
    assert not torch.allclose(finals["off"], finals["live"])


def test_options_state_and_unsupported_models():
    method = ReconBoost(epochs_per_stage=2, correct_epochs=1)
    assert [method.stage_of(e) for e in range(4)] == [(0, False), (0, False), (0, True), (1, False)]
    assert method.members(("a", "b"), 2) == ["a"] and method.members(("a", "b"), 3) == ["a"]
    assert method.members(("a", "b"), 5) == ["a", "b"]
    method.epoch = 7
    copy_ = ReconBoost()
    copy_.load_state_dict(method.state_dict())
    assert copy_.epoch == 7
    with pytest.raises(ValueError, match="epoch"):
        copy_.load_state_dict({"epoch": -1})
    with pytest.raises(ValueError, match="reconcile"):
        ReconBoost(reconcile="on")
    with pytest.raises(ValueError, match="epochs_per_stage"):
        ReconBoost(epochs_per_stage=0)
    uneven = MultimodalModel({"a": nn.Linear(5, 6), "b": nn.Linear(7, 8)}, ConcatFusion({"a": (6,), "b": (8,)}, C))
    with pytest.raises(ValueError, match=r"reconboost trains one classifier head shared .* same size"):
        ReconBoost().attach(uneven)


RECIPE = {
    "seed": 5,
    "dataset": runs.synthetic(),
    "model": runs.mlp_model(dropout=0.2),
    "method": {"name": "reconboost", "epochs_per_stage": 2, "correct_epochs": 1, "hidden": 16, "reconcile": "live"},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    # 4 batches per epoch; stage 1 is epochs 3-5, its boosting phase epochs 3 and 4
    "train": {"epochs": 6, "batch_size": 32, "device": "cpu", "checkpoint_every": 3, "tensorboard": False},
}


def test_resume_in_the_middle_of_a_stage_is_exact(tmp_path, monkeypatch):
    path = runs.write_recipe(tmp_path, RECIPE)
    reference = run_experiment(load_recipe(path), tmp_path / "reference")

    # the last checkpoint: step 18, two batches into epoch 4
    runs.run_interrupted(monkeypatch, ReconBoost, "train_step",
                         lambda self, model, inputs, targets, step, *_: step.epoch == 4 and step.step_in_epoch == 3,
                         load_recipe(path), tmp_path / "killed")
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["loop"]["epoch"] == 4 and saved["loop"]["step_in_epoch"] == 2 and saved["method"]["epoch"] == 4
    resumed = run_experiment(None, tmp_path / "killed", resume=True)
    assert runs.steps(tmp_path / "killed") == runs.steps(tmp_path / "reference")
    assert {r["stage"] for r in runs.steps(tmp_path / "reference")} == {0.0, 1.0}
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]
    # the best epoch's ensemble (its members) is what the test split and `modbal eval` score
    assert evaluate_run(tmp_path / "reference") == reference["test"]
    best = torch.load(tmp_path / "reference" / "checkpoints" / "best.pt", weights_only=True)
    assert best["method"]["epoch"] == reference["best_epoch"]
    a, b = runs.last_checkpoints(tmp_path / "killed", tmp_path / "reference")
    runs.assert_same_weights(a["model"], b["model"])
