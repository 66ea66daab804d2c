"""G-Blending against the paper's procedure and the released weighted loss, written here.

The released code (facebookresearch/VMZ, ``add_weighted_loss``) trains a fused head and one linear
head per modality on the pooled encoder features with L = Σ_k w_k·CE_k. The weights come from the
paper's estimate, transcribed here: from the current checkpoint, each branch alone (a modality's
encoder and head; the encoders and the fusion) is copied and trained for n epochs on its own loss
with a fresh optimizer; its mean training and validation losses before and after give
ΔG = L^V_0 − L^V_n, ΔO = (L^V_n − L^T_n) − (L^V_0 − L^T_0), w ∝ max(ΔG, 0)/ΔO², Σ w = 1.
Offline: once before training; online: before every n-th epoch. No modbal helper computes anything
on the reference's side.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _method_runs import DIMS, assert_resume_exact, tiny_model
from torch import nn

from modbal.methods import EpochData, GBlending
from modbal.methods.base import method_modules

C = 3


def make_model(m_total, seed=0):
    return tiny_model(m_total, classes=C, seed=seed)


def make_loader(m_total, batches, seed):
    g = torch.Generator().manual_seed(seed)
    names = list(DIMS)[:m_total]
    noise = {"a": 0.5, "b": 2.0, "c": 1.0}
    out = []
    for _ in range(batches):
        y = torch.randint(C, (8,), generator=g)
        out.append(({m: noise[m] * torch.randn(8, DIMS[m], generator=g, dtype=torch.float64) + y.unsqueeze(-1)
                     for m in names}, y))
    return out


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def adamw(params):  # its defaults hold a setting its constructor does not take
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)


# -- the reference ------------------------------------------------------------------------------------
def branch(model, heads, k):
    if k == "fused":
        return (lambda x: model.fusion({m: model.encoders[m](x[m]) for m in model.modalities}),
                [*model.encoders.parameters(), *model.fusion.parameters()])
    return (lambda x: heads[k](model.encoders[k](x[k]))), [*model.encoders[k].parameters(), *heads[k].parameters()]


def mean_loss(nets, forward, loader):
    for net in nets:
        net.eval()
    with torch.no_grad():
        total = sum(float(F.cross_entropy(forward(x), y, reduction="sum")) for x, y in loader)
    for net in nets:
        net.train()
    return total / sum(len(y) for _, y in loader)


def estimate(model, heads, train, val, n, make_opt):
    raw = []
    for k in ["fused", *model.modalities]:
        net, hs = copy.deepcopy(model), copy.deepcopy(heads)
        forward, params = branch(net, hs, k)
        opt = make_opt(params)  # fresh, the run's optimizer class and settings
        lt0, lv0 = mean_loss([net, hs], forward, train), mean_loss([net, hs], forward, val)
        for _ in range(n):
            for x, y in train:
                opt.zero_grad()
                F.cross_entropy(forward(x), y).backward()
                opt.step()
        lt1, lv1 = mean_loss([net, hs], forward, train), mean_loss([net, hs], forward, val)
        gain, overfit = lv0 - lv1, (lv1 - lt1) - (lv0 - lt0)
        raw.append(max(gain, 0.0) / overfit ** 2)
    return [w / sum(raw) for w in raw]


def reference_run(model, heads, train, val, epochs, n, online, make_opt):
    opt = make_opt([*model.parameters(), *heads.parameters()])
    weights = None
    for epoch in range(epochs):
        if weights is None or (online and epoch % n == 0):
            weights = estimate(model, heads, train, val, n, make_opt)
        for x, y in train:
            opt.zero_grad()
            h = {m: model.encoders[m](x[m]) for m in model.modalities}
            outs = [model.fusion(h), *(heads[m](h[m]) for m in model.modalities)]
            sum(w * F.cross_entropy(o, y) for w, o in zip(weights, outs)).backward()
            opt.step()
    return weights


@pytest.mark.parametrize("m_total,mode,make_opt", [(2, "offline", sgd), (2, "online", sgd), (3, "offline", sgd),
                                                   (2, "online", adam), (2, "online", adamw)],
                         ids=["2-offline", "2-online", "3-offline", "2-online-adam", "2-online-adamw"])
def test_gblend_matches_the_paper_procedure(m_total, mode, make_opt):
    ours = make_model(m_total)
    theirs = copy.deepcopy(ours)
    train, val = make_loader(m_total, 4, seed=1), make_loader(m_total, 2, seed=2)
    n, epochs = 2, 3
    method = GBlending(mode=mode, epochs=n)
    method.attach(ours)
    heads = nn.ModuleDict({m: nn.Linear(6, C).double() for m in ours.modalities})
    for m in ours.modalities:
        heads[m].load_state_dict(method_modules(ours)[m].linear.state_dict())
    ref_weights = reference_run(theirs, heads, train, val, epochs, n, mode == "online", make_opt)

    opt = make_opt(method.param_groups(ours)[0]["params"])
    seen = []
    for epoch in range(epochs):
        method.on_epoch_start(epoch)
        method.before_epoch(ours, EpochData(epoch, train, val, optimizer=opt))
        seen.append(method.weights())
        for x, y in train:
            loss = method.loss(ours, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert list(method.weights().values()) == pytest.approx(ref_weights, rel=1e-7)
    assert sum(ref_weights) == pytest.approx(1.0) and len(set(ref_weights)) == len(ref_weights)
    assert (seen[2] != seen[0]) == (mode == "online")  # online: re-estimated at epoch n = 2
    for (name, p), q in zip(ours.named_parameters(), [*theirs.parameters(), *heads.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=name)


def test_state_round_trip_and_errors():
    model = make_model(2)
    method = GBlending(epochs=1)
    method.attach(model)
    train, val = make_loader(2, 2, seed=1), make_loader(2, 1, seed=2)
    with pytest.raises(ValueError, match="EpochData.optimizer and EpochData.val_loader"):
        method.before_epoch(model, EpochData(0, train))
    method.before_epoch(model, EpochData(0, train, val, optimizer=sgd(model.parameters())))
    other = GBlending(epochs=1)
    other.load_state_dict(method.state_dict())
    assert other.weights() == method.weights()
    other.before_epoch(model, EpochData(1, train, val, optimizer=sgd(model.parameters())))  # offline: no new estimate
    assert other.weights() == method.weights()
    with pytest.raises(ValueError, match="3 weights"):
        GBlending().load_state_dict({"modalities": ["a"], "weights": [0.2, 0.3, 0.5], "estimate": {}})
    for bad in ({"mode": "sometimes"}, {"epochs": 0}):
        with pytest.raises(ValueError):
            GBlending(**bad)


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    assert_resume_exact(tmp_path, monkeypatch, {"name": "gblend", "mode": "online", "epochs": 1})
