"""MMPareto against the authors' training step (MMPareto_ICML2024, code/MMPareto.py), written here.

The reference keeps its own uni-modal heads, backpropagates each loss separately with
``backward(retain_graph=True)``, clones the encoder gradients and zeroes them, as the original
does; solves the two-vector min-norm problem with its own closed form; then backpropagates the sum
and overwrites each encoder tensor's gradient. No modbal helper computes anything on its side.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from _method_runs import assert_ddp_matches_single, assert_resume_exact, plain_step, random_batch, tiny_model
from _shapley_reference import permutation_mono
from torch import nn

from modbal import METHODS, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods.base import method_modules
from modbal.methods.mmpareto import MMPareto

C = 4


def make_model(m_total, fusion="concat", norm=True, seed=0):
    return tiny_model(m_total, classes=C, norm=norm, act=nn.ReLU if norm else nn.Tanh,
                      fusion=ConcatFusion if fusion == "concat" else MLPFusion, seed=seed)


def batch(m_total, n=12, seed=0):
    return random_batch(m_total, n, seed, classes=C)


# -- the reference: the original training step, naively ------------------------------------------
def min_norm_2(v1v1, v1v2, v2v2):
    """MinNormSolver._min_norm_element_from2: weight of the first vector."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def naive_shapley_mono(model, h, x):
    """o_m by averaging marginal contributions over all orderings; muted modalities get the
    encoder's output on one zero sample (eval mode); muted coalitions run the fusion in eval mode."""
    names = list(model.modalities)
    n = len(names)
    model.encoders.eval()
    z = {m: model.encoders[m](torch.zeros_like(x[m][:1])).expand_as(h[m]) for m in names}
    model.encoders.train()
    values = {}
    for mask in range(1 << n):
        feats = {m: h[m] if mask >> i & 1 else z[m] for i, m in enumerate(names)}
        model.fusion.train(mask == (1 << n) - 1)
        values[mask] = model.fusion(feats)
    model.fusion.train()
    return permutation_mono(values, n)


class OriginalStep:
    def __init__(self, model, heads, gamma=1.5, lr=0.05):
        self.model, self.heads, self.gamma = model, heads, gamma  # heads: None = Shapley outputs
        params = list(model.parameters()) + ([] if heads is None else list(heads.parameters()))
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
        self.cos = {}

    def step(self, x, y):
        model, names = self.model, list(self.model.modalities)
        self.opt.zero_grad()
        h = {m: model.encoders[m](x[m]) for m in names}
        out = model.fusion(h)
        outs = ([self.heads[m](h[m]) for m in names] if self.heads is not None else naive_shapley_mono(model, h, x))
        losses = [F.cross_entropy(out, y)] + [F.cross_entropy(o, y) for o in outs]
        grads = []  # grads[k][m]: list of encoder m's tensor gradients of loss k
        for loss in losses:
            loss.backward(retain_graph=True)
            grads.append({m: [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                              for p in model.encoders[m].parameters()] for m in names})
            self.opt.zero_grad()
        weights = {}
        for i, m in enumerate(names):
            both, uni = grads[0][m], grads[1 + i][m]
            flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
            cos = F.cosine_similarity(flat(both), flat(uni), dim=0)
            self.cos[m] = float(cos)
            if cos > 0:
                weights[m] = (0.5, 0.5)
            else:
                dot = lambda u, v: sum(float((a * b).sum()) for a, b in zip(u, v))  # noqa: E731
                c = min_norm_2(dot(both, both), dot(both, uni), dot(uni, uni))
                weights[m] = (c, 1 - c)
        sum(losses).backward()
        for i, m in enumerate(names):
            for j, p in enumerate(model.encoders[m].parameters()):
                # the original takes ‖p.grad‖ of the summed backward: with separate heads that is
                # ‖g_mm + g_uni‖; with Shapley outputs modbal defines it so (the other modalities'
                # uni-modal losses also reach this encoder through the shared zero-sample share)
                three_norm = torch.norm(grads[0][m][j] + grads[1 + i][m][j])
                new_grad = 2 * weights[m][0] * grads[0][m][j] + 2 * weights[m][1] * grads[1 + i][m][j]
                diff = three_norm / torch.norm(new_grad)
                p.grad = diff * new_grad * self.gamma if diff > 1 else new_grad * self.gamma
        self.opt.step()


# -- modbal side ------------------------------------------------------------------------------------
def run_both(m_total, heads="separate", fusion="concat", norm=True, steps=4, gamma=1.5, lr=0.05):
    ours = make_model(m_total, fusion, norm)
    method = MMPareto(gamma=gamma, heads=heads)
    theirs = copy.deepcopy(ours)
    method.attach(ours)
    ref_heads = None
    if heads == "separate":
        ref_heads = nn.ModuleDict({m: nn.Linear(6, C).double() for m in ours.modalities})
        for m in ours.modalities:  # same initial weights, read once
            ref_heads[m].load_state_dict(method_modules(ours)[m].linear.state_dict())
    ref = OriginalStep(theirs, ref_heads, gamma, lr)
    opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    conflicts = 0
    for step in range(steps):
        x, y = batch(m_total, seed=step)
        plain_step(ours, method, opt, x, y)
        ref.step(x, y)
        stats = method.statistics()
        for m in ours.modalities:
            assert stats[f"cos/{m}"] == pytest.approx(ref.cos[m], rel=1e-6, abs=1e-9)
        conflicts += sum(ref.cos[m] <= 0 for m in ours.modalities)
        for name, p in theirs.named_parameters():
            torch.testing.assert_close(dict(ours.named_parameters())[name], p, rtol=1e-9, atol=1e-11)
        if ref_heads is not None:
            for m in ours.modalities:
                torch.testing.assert_close(method_modules(ours)[m].linear.weight, ref_heads[m].weight)
    return conflicts


@pytest.mark.parametrize("m_total", [2, 3])
def test_separate_heads_match_the_original_step(m_total):
    conflicts = run_both(m_total, steps=5, lr=0.3)
    assert conflicts > 0  # the min-norm branch was exercised, not only (½, ½)


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "mlp"])
def test_shapley_outputs_match_the_step_with_naive_shapley(m_total, fusion):
    run_both(m_total, heads="shapley", fusion=fusion, norm=False, steps=4, lr=0.3)


def test_two_vector_min_norm_is_the_minimiser():
    from modbal.methods.mmpareto import min_norm_weight
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u, v = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
        c = min_norm_weight(float(u @ u), float(u @ v), float(v @ v))
        grid = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
        best = min(float((t * u + (1 - t) * v).norm()) for t in grid)
        assert float((c * u + (1 - c) * v).norm()) <= best + 1e-9


def test_adam_runs_and_registered():
    assert isinstance(METHODS.create("mmpareto", gamma=1.5), MMPareto)
    model = make_model(2)
    method = MMPareto()
    method.attach(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        plain_step(model, method, opt, *batch(2, seed=step))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_round_trip_continues_identically():
    """Save model, heads, optimizer and method state after two steps; a fresh copy restored from
    them continues with identical updates."""
    def train(model, method, opt, steps):
        for step in steps:
            plain_step(model, method, opt, *batch(2, seed=step))

    model, method = make_model(2), MMPareto()
    method.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, method, opt, range(2))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    train(model, method, opt, range(2, 4))

    fresh, restored = make_model(2, seed=5), MMPareto()
    restored.attach(fresh)
    fresh.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    restored.load_state_dict(saved["method"])
    train(fresh, restored, opt2, range(2, 4))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_clear_errors():
    with pytest.raises(ValueError, match="Invalid gamma"):
        MMPareto(gamma=0)
    with pytest.raises(ValueError, match="Invalid heads"):
        MMPareto(heads="mono")
    early = MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion({"a": (5,), "b": (7,)}, C)).double()
    with pytest.raises(ValueError, match="MMPareto acts on each modality's encoder parameters"):
        MMPareto(heads="shapley").loss(early, *batch(2))
    with pytest.raises(RuntimeError, match="attach"):
        MMPareto().loss(make_model(2), *batch(2))


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    assert_resume_exact(tmp_path, monkeypatch, {"name": "mmpareto"})


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    assert_ddp_matches_single(tmp_path, {"name": "mmpareto"},
                              ("cos/a", "cos/b", "weight_mm/a", "weight_mm/b", "loss_uni/a"))
