"""Uni-modal assistance against the MMPareto code's uniform baseline (``code/uniform_baseline.py``),
written here: the model returns the fused output and one output per separate linear head on each
pooled encoder feature, the loss is L_mm + Σ_m w_m·L_m, one plain backward. The reference keeps its
own heads (same initial weights) and computes every loss itself.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from torch import nn

from modbal import METHODS, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods import UniModalAssist
from modbal.methods.base import method_modules

DIMS = {"a": 5, "b": 7, "c": 4}
C = 4


def make_model(m_total, fusion="concat", seed=0):
    torch.manual_seed(seed)
    names = list(DIMS)[:m_total]
    encoders = {m: nn.Sequential(nn.Linear(DIMS[m], 6), nn.BatchNorm1d(6), nn.ReLU()) for m in names}
    shapes = {m: (6,) for m in names}
    head = ConcatFusion(shapes, C) if fusion == "concat" else MLPFusion(shapes, C)
    return MultimodalModel(encoders, head).double()


def batch(m_total, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({m: torch.randn(n, DIMS[m], generator=g, dtype=torch.float64) for m in list(DIMS)[:m_total]},
            torch.randint(C, (n,), generator=g))


def uniform_baseline_step(model, heads, opt, x, y, weights, fused_weight):
    names = list(model.modalities)
    opt.zero_grad()
    h = {m: model.encoders[m](x[m]) for m in names}
    out = model.fusion(h)
    loss = fused_weight * F.cross_entropy(out, y)
    for m in names:
        loss = loss + weights[m] * F.cross_entropy(heads[m](h[m]), y)
    loss.backward()
    opt.step()


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("fusion", ["concat", "mlp"])
@pytest.mark.parametrize("weights", ["uniform", "custom"])
def test_unimodal_assist_matches_the_uniform_baseline(m_total, optim, fusion, weights):
    ours = make_model(m_total, fusion)
    theirs = copy.deepcopy(ours)
    names = list(ours.modalities)
    if weights == "uniform":
        w, fused, method = {m: 1.0 for m in names}, 1.0, UniModalAssist()
    else:
        w = {m: 0.3 + 0.5 * i for i, m in enumerate(names)}
        fused, method = 0.7, UniModalAssist(weights=w, fused_weight=0.7)
    method.attach(ours)
    heads = nn.ModuleDict({m: nn.Linear(6, C).double() for m in names})
    for m in names:  # same initial weights, read once
        heads[m].load_state_dict(method_modules(ours)[m].linear.state_dict())
    opt_ours = OPTIMIZERS[optim](method.param_groups(ours)[0]["params"])
    opt_theirs = OPTIMIZERS[optim](list(theirs.parameters()) + list(heads.parameters()))
    for step in range(4):
        x, y = batch(m_total, seed=step)
        loss = method.loss(ours, x, y)
        opt_ours.zero_grad()
        loss.backward()
        method.after_backward(ours)
        opt_ours.step()
        uniform_baseline_step(theirs, heads, opt_theirs, x, y, w, fused)
    for (name, p), q in zip(ours.named_parameters(), [*theirs.parameters(), *heads.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    stats = method.statistics()
    assert set(stats) == {"loss/fused", *(f"loss/{m}" for m in names), *(f"coef/{m}" for m in names)}
    assert {m: stats[f"coef/{m}"] for m in names} == w


def test_heads_are_part_of_the_model_and_its_state():
    model = make_model(2)
    method = METHODS.create("unimodal_assist")
    method.attach(model)
    method.attach(model)  # idempotent
    keys = [k for k in model.state_dict() if k.startswith("method_modules.")]
    assert keys == ["method_modules.a.linear.weight", "method_modules.a.linear.bias",
                    "method_modules.b.linear.weight", "method_modules.b.linear.bias"]
    assert sum(p.numel() for p in method.param_groups(model)[0]["params"]) == sum(p.numel() for p in model.parameters())
    fresh = make_model(2)
    with pytest.raises(RuntimeError, match="method.attach"):
        method.loss(fresh, *batch(2))
    method.attach(fresh)
    fresh.load_state_dict(model.state_dict())


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="weights"):
        UniModalAssist(weights=-1)
    with pytest.raises(ValueError, match="fused_weight"):
        UniModalAssist(fused_weight=float("nan"))
    with pytest.raises(ValueError, match=r"unknown \['z'\], missing \['b'\]"):
        UniModalAssist(weights={"a": 1.0, "z": 2.0}).attach(make_model(2))


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    from _method_runs import assert_resume_exact
    assert_resume_exact(tmp_path, monkeypatch, {"name": "unimodal_assist", "weights": {"a": 0.5, "b": 2.0}})
