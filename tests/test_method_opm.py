"""OPM against the authors' training step (BML_TPAMI2024: ``Classifier.forward``, ``calcu_q``,
``Modality_drop.execute_drop``, ``train``), written here.

The reference scores each modality from the concatenation head's slice with detached weights and
half the bias (or from its own head / a naive Shapley output), computes q and θ with its own
formulas, masks, rescales, drops all-masked samples, and trains on the fused cross-entropy. It
reads random numbers from a generator seeded like modbal's, in the order modbal documents: one
uniform for the batch decision, then a B × M uniform table for the keep masks. One deliberate
difference: the original's custom backward returns θ as θ's gradient, and since its q is built
from undetached scores that sends a stray gradient into the encoders; the reference, like modbal,
treats the scores as constants.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from _method_runs import assert_ddp_matches_single, assert_resume_exact, plain_step, random_batch, tiny_model
from _shapley_reference import permutation_mono
from torch import nn

from modbal import METHODS, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.fusions.sum import SumFusion
from modbal.methods.opm import OPM

WIDTH = {"a": 6, "b": 4, "c": 5}  # unequal feature widths: θ weighs them
C = 4


def make_model(m_total, fusion="concat", seed=0):
    head = {"concat": ConcatFusion, "sum": SumFusion, "mlp": MLPFusion}[fusion]
    return tiny_model(m_total, width=WIDTH, classes=C, norm=True, act=nn.ReLU, fusion=head, seed=seed)


def batch(m_total, n=16, seed=0):
    return random_batch(m_total, n, seed, classes=C, scales=(1, 2, 3))


# -- the reference --------------------------------------------------------------------------------
def reference_outputs(model, h, x, kind):
    names = list(model.modalities)
    if kind == "concat":  # t_m = h_m · W[:, cols_m]ᵀ + b / M, weights detached
        w, b = model.fusion.head.weight.detach(), model.fusion.head.bias.detach()
        start, outs = 0, []
        for m in names:
            outs.append(h[m] @ w[:, start:start + WIDTH[m]].T + b / len(names))
            start += WIDTH[m]
        return outs
    if kind == "sum":
        return [model.fusion.heads[m](h[m]) for m in names]
    n = len(names)  # naive Shapley, every coalition in eval mode
    model.encoders.eval()
    z = {m: model.encoders[m](torch.zeros_like(x[m][:1])).expand_as(h[m]) for m in names}
    model.encoders.train()
    values = {mask: model.fusion({m: h[m] if mask >> i & 1 else z[m] for i, m in enumerate(names)})
              for mask in range(1 << n)}
    return permutation_mono(values, n)


def calcu_q(perf, q_base, lam):
    q = []
    for m, s in enumerate(perf):
        others = [p for k, p in enumerate(perf) if k != m]
        ratio = math.tanh(max(s / (sum(others) / len(others)) - 1, 0.0))
        q.append(min(max(q_base * (1 + lam * ratio) if ratio > 0 else 0.0, 0.0), 1.0))
    return q


class OriginalStep:
    def __init__(self, model, kind, q_base, lam, p_exe, seed, lr):
        self.model, self.kind, self.q_base, self.lam, self.p_exe = model, kind, q_base, lam, p_exe
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.executed = []

    def step(self, x, y):
        model, names = self.model, list(self.model.modalities)
        self.opt.zero_grad()
        h = {m: model.encoders[m](x[m]) for m in names}
        with torch.no_grad():
            t = reference_outputs(model, {m: v.detach() for m, v in h.items()}, x, self.kind)
        perf = [float(sum(torch.softmax(o, 1)[i][int(y[i])] for i in range(len(y)))) for o in t]
        q = calcu_q(perf, self.q_base, self.lam)
        exe = float(torch.rand((), generator=self.gen, dtype=torch.float64)) < self.p_exe
        self.executed.append(exe)
        if exe:
            u = torch.rand((len(y), len(names)), generator=self.gen, dtype=torch.float64)
            d = [WIDTH[m] for m in names]
            theta = sum(dm * qm for dm, qm in zip(d, q)) / sum(d)
            mask = torch.stack([(u[:, k] < 1 - q[k]).double() for k in range(len(names))], 1)  # B × M
            flag = mask.sum(1) > 0  # samples with at least one modality left
            feats = {m: (h[m] * mask[:, k:k + 1] / (1 - theta))[flag] for k, m in enumerate(names)}
            out, y = model.fusion(feats), y[flag]
        else:
            out = model.fusion(h)
        F.cross_entropy(out, y).backward()
        self.opt.step()
        self.q = q


def run_both(m_total, fusion="concat", steps=5, scores="auto", q_base=0.5, lam=0.5, p_exe=0.7, lr=0.1):
    ours = make_model(m_total, fusion)
    theirs = copy.deepcopy(ours)
    method = OPM(q_base=q_base, lam=lam, p_exe=p_exe, scores=scores, seed=7)
    method.on_epoch_start(6)  # after the warm-up
    kind = fusion if scores != "shapley" and fusion != "mlp" else "shapley"
    ref = OriginalStep(theirs, kind, q_base, lam, p_exe, 7, lr)
    opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x, y = batch(m_total, seed=step)
        plain_step(ours, method, opt, x, y)
        ref.step(x, y)
        stats = method.statistics()
        assert [stats[f"q/{m}"] for m in ours.modalities] == pytest.approx(ref.q, rel=1e-9, abs=1e-12)
        assert stats["executed"] == float(ref.executed[-1])
        for name, p in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], p, rtol=1e-9, atol=1e-11, msg=name)
    assert any(ref.executed) and not all(ref.executed)
    assert max(ref.q) > 0
    return method


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_matches_the_original_step_with_head_scores(m_total, fusion):
    run_both(m_total, fusion)


@pytest.mark.parametrize("m_total", [2, 3])
def test_matches_the_step_with_shapley_scores_on_a_nonlinear_fusion(m_total):
    run_both(m_total, "mlp")


def test_warm_up_epochs_train_like_joint():
    ours, plain = make_model(2), make_model(2)
    method = OPM(seed=0)
    method.on_epoch_start(5)  # the original drops only once epoch > 5
    x, y = batch(2)
    torch.manual_seed(0)
    loss = method.loss(ours, x, y)
    torch.manual_seed(0)
    torch.testing.assert_close(loss, F.cross_entropy(plain(x), y))
    assert method.statistics() == {"executed": 0.0}


def test_state_round_trip_continues_identically():
    def train(model, method, opt, steps):
        for step in steps:
            plain_step(model, method, opt, *batch(2, seed=step))

    model, method = make_model(2), OPM(p_exe=0.5)
    method.on_epoch_start(7)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, method, opt, range(3))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    train(model, method, opt, range(3, 7))

    fresh, restored = make_model(2, seed=3), OPM(p_exe=0.5)
    fresh.load_state_dict(saved["model"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=0.01)
    opt2.load_state_dict(saved["opt"])
    restored.load_state_dict(saved["method"])
    train(fresh, restored, opt2, range(3, 7))
    for name, p in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], p, rtol=0, atol=0, msg=name)


def test_identity_encoders_drop_input_modalities_and_errors_are_clear():
    early = MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion({"a": (5,), "b": (7,)}, C)).double()
    method = OPM(p_exe=1.0, seed=1, start_epoch=0)
    method.loss(early, *batch(2)).backward()
    assert method.statistics()["executed"] == 1.0
    assert isinstance(METHODS.create("opm", q_base=0.4), OPM)
    with pytest.raises(ValueError, match="Invalid q_base"):
        OPM(q_base=1.5)
    with pytest.raises(ValueError, match="Invalid p_exe"):
        OPM(p_exe=-0.1)
    with pytest.raises(TypeError, match="OPM scores='heads'"):
        OPM(scores="heads", start_epoch=0).loss(make_model(2, "mlp"), *batch(2))
    with pytest.raises(ValueError, match="OPM state must have keys"):
        OPM().load_state_dict({"epoch": 1})


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    assert_resume_exact(tmp_path, monkeypatch, {"name": "opm", "start_epoch": 1, "p_exe": 0.8})


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    assert_ddp_matches_single(tmp_path, {"name": "opm", "start_epoch": 0, "seed": 5},
                              ("q/a", "q/b", "score/a", "executed", "kept/a", "kept/b"))
