"""PMR against the authors' procedure (Modal-Imbalance-PMR, ``main_Prototype_grad.py``), written here.

The reference computes prototypes as the code does (eval mode, per-sample Python loop over the
first tenth of the loader's batches, division by the class count, EMA from the code's epoch
argument), distances as sqrt(dot) in a double loop, scores as sums of softmax probabilities, the
on/off weights of the weaker modality, and the schedule "prototypes before training, then after each
epoch". For M = 3 it uses the documented generalisation ρ_m = S_m / mean of the others. No modbal
helper computes anything on its side.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _method_runs import DIMS, assert_resume_exact, plain_step, tiny_model

from modbal.methods import PMR, EpochData

C, BATCH, BATCHES = 4, 16, 10


def make_model(m_total, seed=0):
    return tiny_model(m_total, classes=C, seed=seed)


def make_loader(m_total, seed=0, scale=None):
    """BATCHES batches; every class appears 4 times in each batch (so the first tenth has them all)."""
    g = torch.Generator().manual_seed(seed)
    names = list(DIMS)[:m_total]
    scale = scale or {m: 1.0 for m in names}
    out = []
    for _ in range(BATCHES):
        y = (torch.arange(BATCH) % C)[torch.randperm(BATCH, generator=g)]
        x = {m: scale[m] * torch.randn(BATCH, DIMS[m], generator=g, dtype=torch.float64) + 0.8 * y.unsqueeze(-1)
             for m in names}
        out.append((x, y))
    return out


# -- the reference ------------------------------------------------------------------------------------
def eu_dist(x1, x2):
    d = torch.zeros(x1.shape[0], x2.shape[0], dtype=x1.dtype)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def calculate_prototype(model, loader, epoch, momentum, old=None):
    names = list(model.modalities)
    protos = {m: torch.zeros(C, 6, dtype=torch.float64) for m in names}
    count = [0] * C
    model.eval()
    with torch.no_grad():
        sample_count = 0
        for x, y in loader:
            h = {m: model.encoders[m](x[m]) for m in names}
            for c, label in enumerate(y):
                count[label] += 1
                for m in names:
                    protos[m][label, :] += h[m][c, :]
            sample_count += 1
            if sample_count >= len(loader) // 10:
                break
    for c in range(C):
        for m in names:
            protos[m][c, :] /= count[c]
    if epoch > 0:
        protos = {m: (1 - momentum) * protos[m] + momentum * old[m] for m in names}
    return protos


def train_epoch(model, opt, loader, protos, alpha, epoch, start=0, end=100):
    names = list(model.modalities)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        h = {m: model.encoders[m](x[m]) for m in names}
        out = model.fusion(h)
        sims = {m: -eu_dist(h[m], protos[m]) for m in names}
        loss = F.cross_entropy(out, y)
        if start <= epoch <= end:
            scores = {m: sum(torch.softmax(sims[m], 1)[i][y[i]] for i in range(len(y))) for m in names}
            for m in names:
                others = [scores[k] for k in names if k != m]
                ratio = scores[m] / (sum(others) / len(others))  # M = 2: S_a / S_v, as the code
                coef = alpha if ratio < 1 else 0
                loss = loss + coef * F.cross_entropy(sims[m], y)
        loss.backward()
        opt.step()


def reference_run(model, loader, epochs, alpha, momentum, make_opt, **window):
    opt = make_opt(model.parameters())
    protos = calculate_prototype(model, loader, 0, momentum)
    for epoch in range(epochs):
        train_epoch(model, opt, loader, protos, alpha, epoch, **window)
        protos = calculate_prototype(model, loader, epoch, momentum, protos)
    return protos


# -- modbal side ------------------------------------------------------------------------------------
def modbal_run(model, method, loader, epochs, make_opt):
    opt = make_opt(model.parameters())
    for epoch in range(epochs):
        method.on_epoch_start(epoch)
        method.before_epoch(model, EpochData(epoch, loader))
        model.train()
        for x, y in loader:
            plain_step(model, method, opt, x, y)
    method.before_epoch(model, EpochData(epochs, loader))  # the prototypes the reference ends with
    return method


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_pmr_matches_the_original_procedure(m_total, optim):
    ours = make_model(m_total)
    theirs = copy.deepcopy(ours)
    loader = make_loader(m_total, scale={"a": 0.3, "b": 3.0, "c": 1.5})
    epochs, alpha, momentum = 3, 1.5, 0.3
    ref_protos = reference_run(theirs, loader, epochs, alpha, momentum, OPTIMIZERS[optim])
    method = modbal_run(ours, PMR(alpha=alpha, momentum=momentum), loader, epochs, OPTIMIZERS[optim])
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    for m, proto in method.prototypes().items():
        torch.testing.assert_close(proto.double(), ref_protos[m], rtol=1e-6, atol=1e-7)
    betas = [method.statistics()[f"beta/{m}"] for m in ours.modalities]
    assert 0 < sum(b > 0 for b in betas) < m_total  # the weaker modalities only were pushed


def test_pmr_window_turns_the_prototype_loss_off():
    ours = make_model(2)
    theirs = copy.deepcopy(ours)
    loader = make_loader(2)
    reference_run(theirs, loader, 3, 2.0, 0.2, OPTIMIZERS["sgd"], start=1, end=1)
    modbal_run(ours, PMR(alpha=2.0, start_epoch=1, end_epoch=2), loader, 3, OPTIMIZERS["sgd"])
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_classes_missing_from_the_prototype_batches_are_left_out():
    model = make_model(2)
    loader = make_loader(2)
    x, y = loader[0]
    first = [({m: v[y != 3] for m, v in x.items()}, y[y != 3])] + loader[1:]  # class 3 absent at first
    method = PMR(alpha=1.0)
    method.on_epoch_start(0)
    method.before_epoch(model, EpochData(0, first))
    assert method.state_dict()["known"]["a"].tolist() == [True, True, True, False]
    loss = method.loss(model, x, y)  # batch with class 3: its samples are left out of the prototype loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    method.before_epoch(model, EpochData(1, loader))  # seen now: it gets a prototype
    assert method.state_dict()["known"]["a"].all()


def test_pmr_state_round_trip_and_errors():
    model = make_model(2)
    loader = make_loader(2)
    method = PMR(alpha=1.0)
    with pytest.raises(RuntimeError, match="before_epoch"):
        method.loss(model, *loader[0])
    method.before_epoch(model, EpochData(0, loader))
    other = PMR(alpha=1.0)
    other.load_state_dict(method.state_dict())
    x, y = loader[1]
    assert float(other.loss(model, x, y).detach()) == pytest.approx(float(method.loss(model, x, y).detach()))
    with pytest.raises(ValueError, match="PMR state must have keys"):
        other.load_state_dict({"prototypes": {}})
    for bad in ({"alpha": -1}, {"momentum": 1.0}, {"fraction": 0}, {"start_epoch": 3, "end_epoch": 2}):
        with pytest.raises(ValueError):
            PMR(**bad)


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    assert_resume_exact(tmp_path, monkeypatch, {"name": "pmr", "alpha": 1.0})  # prototypes come from the state


def test_a_sample_at_its_prototype_has_a_finite_gradient():
    # a class with one sample in the prototype batch: at the epoch's first step that sample sits
    # exactly on its prototype (distance 0, where the code's sqrt(dot) has a NaN gradient)
    model = make_model(2)
    x, y = make_loader(2)[0]
    y = y.clone()
    y[y == 3] = 2
    y[0] = 3
    method = PMR(alpha=1.0)
    method.before_epoch(model, EpochData(0, [(x, y)]))
    loss = method.loss(model, x, y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
