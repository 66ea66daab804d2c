"""MLA against the authors' training step and test-time fusion (Multimodal-Learning-with-Alternating-
Unimodal-Adaptation, main.py ``train_epoch``/``valid`` with ``--gs_flag``, utils.py ``GSPlugin``), written here.

The reference runs every encoder once on the batch, then for each modality in turn applies the
shared ``fc_out`` head, backpropagates, optionally modifies the head's weight gradient as the
plug-in does (with its parameter-name test made to match, and the scalar r·k denominator of the
paper's OWM update where the released line divides by the outer product k·r), steps and zeroes.
Its test-time weights come from its own entropy functions. No modbal helper computes anything on
its side.
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
from modbal.methods.mla import MLA
from modbal.train import run_experiment

C, D = 4, 6


def make_model(m_total, seed=0):
    return runs.tiny_model(m_total, width=D, classes=C, norm=True, act=nn.ReLU, seed=seed)


def batch(m_total, n=10, seed=0):
    return runs.random_batch(m_total, n, seed, classes=C)


# -- the reference ------------------------------------------------------------------------------
class Plugin:
    """GSPlugin.before_update, the name test matching ``fc_out.weight``."""

    def __init__(self):
        self.P = torch.eye(D, dtype=torch.float64)
        self.exp_count = 0

    def before_update(self, fc, feature, batch_index, len_dataloader):
        lamda = batch_index / len_dataloader + 1
        alpha = 1.0 * 0.1 ** lamda
        if self.exp_count != 0:
            for n, w in fc.named_parameters():
                if n == "weight":
                    r = torch.mean(feature.detach(), 0, True)
                    k = torch.mm(self.P, torch.t(r))
                    self.P = self.P - torch.mm(k, torch.t(k)) / (alpha + torch.mm(r, k))
                    self.P = self.P / torch.norm(self.P, p="fro")
                    w.grad.data = torch.mm(w.grad.data, torch.t(self.P))


class OriginalMLA:
    def __init__(self, encoders, fc, projection, lr=0.1):
        self.encoders, self.fc = encoders, fc
        self.opt = torch.optim.SGD(list(encoders.parameters()) + list(fc.parameters()), lr=lr, momentum=0.9,
                                   weight_decay=1e-4)
        self.plugin = Plugin() if projection else None

    def train_batch(self, x, y, batch_step, len_dataloader):
        self.opt.zero_grad()
        feats = [self.encoders[m](x[m]) for m in self.encoders]  # the model's forward: every encoder at once
        for feat in feats:
            loss = F.cross_entropy(self.fc(feat), y)
            loss.backward()
            if self.plugin is not None:
                self.plugin.before_update(self.fc, feat, batch_step, len_dataloader)
            self.opt.step()
            self.opt.zero_grad()
            if self.plugin is not None:
                self.plugin.exp_count += 1


def entropy_per_sample(out):
    p = F.softmax(out, dim=1)
    return -torch.sum(p * torch.log(p), dim=1)


def entropy_released(out):
    p = F.softmax(out, dim=0)
    return -torch.sum(p * torch.log(p))


def gate(entropies):
    top = entropies[0]
    for e in entropies[1:]:
        top = torch.maximum(top, e)
    raw = [torch.exp(top - e) for e in entropies]
    total = sum(raw)
    return [r / total for r in raw]


# -- the comparison ------------------------------------------------------------------------------
@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("projection", [False, True])
def test_updates_match_the_original_step(m_total, projection):
    ours = make_model(m_total)
    method = MLA(projection=projection)
    method.attach(ours)
    head = method_modules(ours)["head"].linear
    theirs_enc = copy.deepcopy(ours.encoders)
    fc = nn.Linear(D, C).double()
    fc.load_state_dict(head.state_dict())
    ref = OriginalMLA(theirs_enc, fc, projection)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ours.train()
    batches = 3
    for epoch in range(2):
        for i in range(batches):
            x, y = batch(m_total, seed=10 * epoch + i)
            ctx = StepContext(opt, epoch=epoch, step_in_epoch=i, steps_per_epoch=batches)
            for k in range(method.substeps(ours)):
                method.train_step(ours, x, y, ctx, k)
            ref.train_batch(x, y, i, batches)
            for m in ours.modalities:
                for p, q in zip(ours.encoders[m].parameters(), theirs_enc[m].parameters()):
                    torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(head.weight, fc.weight, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(head.bias, fc.bias, rtol=1e-10, atol=1e-12)
    assert method.updates == 2 * batches * m_total
    if projection:
        torch.testing.assert_close(method.projector, ref.plugin.P, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(method.projector, torch.eye(D, dtype=torch.float64) / D ** 0.5)
    else:
        assert method.projector is None


@pytest.mark.parametrize("m_total", [2, 3])
def test_test_time_fusion_matches_the_original(m_total):
    model = make_model(m_total)
    x, _ = batch(m_total, n=9, seed=5)
    model.eval()
    for weights in ("entropy", "entropy_batch", "fixed"):
        method = MLA(fusion_weights=weights)
        method.attach(model)
        fc = method_modules(model)["head"].linear
        with torch.no_grad():
            outs = [fc(model.encoders[m](x[m])) for m in model.modalities]
            if weights == "entropy":
                w = gate([entropy_per_sample(o) for o in outs])
                expected = sum(o * wi.unsqueeze(1) for o, wi in zip(outs, w))
            elif weights == "entropy_batch":
                w = gate([entropy_released(o) for o in outs])
                expected = sum(o * wi for o, wi in zip(outs, w))
            else:
                expected = sum(o / m_total for o in outs)
            got = method.predict(model, x)
        torch.testing.assert_close(got.logits, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.mono.sum(0), got.logits)
    # per-sample weights differ between samples; the released ones do not
    with torch.no_grad():
        per_sample = MLA().predict(model, x).mono / torch.stack(outs)
    assert per_sample[0, :, 0].std() > 1e-6


def test_fixed_weights_and_state_round_trip():
    model = make_model(2)
    method = MLA(fusion_weights="fixed", weights={"a": 0.3, "b": 0.7})
    method.attach(model)
    x, _ = batch(2)
    model.eval()
    with torch.no_grad():
        fc = method_modules(model)["head"].linear
        expected = 0.3 * fc(model.encoders["a"](x["a"])) + 0.7 * fc(model.encoders["b"](x["b"]))
        torch.testing.assert_close(method.predict(model, x).logits, expected)
    trained = MLA(projection=True)
    trained.attach(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(2):
        for k in range(2):
            trained.train_step(model, *batch(2, seed=i), StepContext(opt, step_in_epoch=i, steps_per_epoch=2), k)
    copy_ = MLA(projection=True)
    copy_.load_state_dict(trained.state_dict())
    assert copy_.updates == 4 and torch.equal(copy_.projector, trained.projector)
    with pytest.raises(ValueError, match="unknown keys"):
        copy_.load_state_dict({"updates": 1, "P": None})
    with pytest.raises(ValueError, match="square"):
        copy_.load_state_dict({"updates": 1, "projector": torch.zeros(2, 3)})


def test_refuses_models_it_cannot_train():
    torch.manual_seed(0)
    uneven = MultimodalModel({"a": nn.Linear(5, 6), "b": nn.Linear(7, 8)}, ConcatFusion({"a": (6,), "b": (8,)}, C))
    with pytest.raises(ValueError, match=r"mla trains one classifier head shared .* same size"):
        MLA().attach(uneven)
    identity = MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion({"a": (6,), "b": (6,)}, C))
    with pytest.raises(ValueError, match="have none"):
        MLA().attach(identity)
    with pytest.raises(ValueError, match="fusion_weights"):
        MLA(fusion_weights="mean")
    with pytest.raises(ValueError, match=r"exactly the modalities"):
        MLA(fusion_weights="fixed", weights={"a": 1.0}).attach(make_model(2))


# -- through the runner: a run interrupted between two modalities' steps resumes exactly ------------
RECIPE = {
    "seed": 2,
    "dataset": runs.synthetic(),
    "model": runs.mlp_model(dropout=0.2),
    "method": {"name": "mla", "projection": True},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    # 4 batches per epoch, 2 updates each: checkpoints after updates 3 (between a's and b's step of batch 2), 6, …
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "checkpoint_every": 3, "tensorboard": False},
}


def test_resume_between_the_modalities_steps_is_exact(tmp_path, monkeypatch):
    path = runs.write_recipe(tmp_path, RECIPE)
    reference = run_experiment(load_recipe(path), tmp_path / "reference")
    assert "loss/a" in runs.steps(tmp_path / "reference")[0]
    assert reference["val"]["acc"] > 0.25

    # stopped before the 5th update: the last checkpoint is the mid-batch one after update 3
    runs.run_interrupted(monkeypatch, MLA, "train_step", lambda self, *args: self.updates == 4, load_recipe(path),
                         tmp_path / "killed")
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["loop"]["substep"] == 1 and saved["loop"]["step_in_epoch"] == 1
    assert saved["method"]["updates"] == 3
    resumed = run_experiment(None, tmp_path / "killed", resume=True)
    assert runs.steps(tmp_path / "killed") == runs.steps(tmp_path / "reference")
    assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"]
    a, b = runs.last_checkpoints(tmp_path / "killed", tmp_path / "reference")
    runs.assert_same_weights(a["model"], b["model"])
    assert torch.equal(a["method"]["projector"], b["method"]["projector"])
