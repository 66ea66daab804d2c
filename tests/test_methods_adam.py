"""What gradient modulation (AGM, OGM-GE) changes under SGD and under Adam.

Adam's update is m̂/(√v̂ + ε) with m̂, v̂ running averages of g and g²: a constant positive
multiplier c on a parameter's gradient cancels (up to ε), whereas SGD's update scales by c. What
survives Adam: changes of the multiplier over time (until v̂ re-adapts, ~1/(1−β₂) steps) and
changes of gradient *direction* — in AGM, the re-weighting of coalition paths inside parameters
shared by several mono-modal outputs (non-linear fusion, muted zero-point features).
See docs/baselines.md, "Modulation under adaptive optimizers".
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from torch import nn

from modbal.fusions.concat import ConcatFusion
from modbal.methods.agm import AGM
from modbal.methods.ogm_ge import OGMGE
from modbal.model import MultimodalModel

C = 3
LR = 1e-3


class Enc(nn.Module):
    def __init__(self, d_in: int, d_out: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)
        self.out_shape = (d_out,)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def make(fusion: str, bias: bool):
    torch.manual_seed(0)
    enc = {"a": Enc(5, bias=bias), "b": Enc(4, bias=bias)}
    shapes = {m: (8,) for m in enc}
    fus = ConcatFusion(shapes, C) if fusion == "concat" else MLPFusion(shapes, C)
    model = MultimodalModel(enc, fus).double()  # float64: updates compared without rounding noise
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, C, (48,), generator=g)
    inputs = {"a": torch.randn(48, 5, generator=g, dtype=torch.float64),
              "b": torch.randn(48, 4, generator=g, dtype=torch.float64)}
    inputs["a"][:, 0] += 2.0 * y  # a is the informative, dominant modality
    # a few joint steps so the mono-modal outputs differ and κ, k are far from 1
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(inputs), y).backward()
        opt.step()
    return model, inputs, y


def one_step(model, inputs, y, method, optimizer: str):
    """Gradients and the first optimizer update of ``method`` (None: joint) on a copy of ``model``."""
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = (torch.optim.SGD(model.parameters(), lr=LR) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=LR))
    loss = F.cross_entropy(model(inputs), y) if method is None else method.loss(model, inputs, y)
    loss.backward()
    if method is not None:
        method.after_backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return grads, {n: p.detach() - before[n] for n, p in model.named_parameters()}


# -- the optimizer fact ----------------------------------------------------------------------------
def test_constant_gradient_scale_sgd_scales_adam_cancels():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(200, generator=g) for _ in range(20)]
    c = 0.3
    finals = {}
    for name, factory in [("sgd", lambda p: torch.optim.SGD([p], lr=LR, momentum=0.9)),
                          ("adam", lambda p: torch.optim.Adam([p], lr=LR))]:
        for scale in (1.0, c):
            p = nn.Parameter(torch.zeros(200))
            opt = factory(p)
            for grad in grads:
                p.grad = scale * grad
                opt.step()
            finals[name, scale] = p.detach().clone()
    torch.testing.assert_close(finals["sgd", c], c * finals["sgd", 1.0])  # SGD: displacement × c
    torch.testing.assert_close(finals["adam", c], finals["adam", 1.0], rtol=1e-5, atol=1e-9)  # Adam: same


def test_changing_scale_survives_adam_until_second_moment_adapts():
    """A drop of the multiplier from 1 to c shrinks Adam's step to ≈ c at first; the step recovers as
    v̂ forgets the old gradient scale (time constant 1/(1 − β₂) = 1000 steps)."""
    c = 0.2
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=LR)
    steps = []
    for t in range(6000):
        p.grad = torch.ones(1) * (1.0 if t < 2000 else c)
        before = float(p.detach())
        opt.step()
        steps.append(before - float(p.detach()))
    assert steps[1999] == pytest.approx(LR, rel=1e-3)
    assert steps[2060] == pytest.approx(c * LR, rel=0.1)  # m̂ has adapted, v̂ not yet
    assert steps[5999] > 0.8 * LR  # v̂ has (mostly) adapted: the multiplier is cancelled again


# -- OGM-GE -------------------------------------------------------------------------------------
def test_ogm_dominant_encoder_step_scaled_under_sgd_unchanged_under_adam():
    model, inputs, y = make("concat", bias=True)
    method = OGMGE(alpha=1.0, ge=False)
    g_ogm, sgd_ogm = one_step(model, inputs, y, method, "sgd")
    k = method.statistics()["coef/a"]
    assert k < 0.9 and method.statistics()["coef/b"] == 1.0
    _, sgd_joint = one_step(model, inputs, y, None, "sgd")
    _, adam_joint = one_step(model, inputs, y, None, "adam")
    _, adam_ogm = one_step(model, inputs, y, OGMGE(alpha=1.0, ge=False), "adam")
    for n in sgd_joint:
        scale = k if n.startswith("encoders.a.") and n.endswith("weight") else 1.0  # default: weight tensors
        torch.testing.assert_close(sgd_ogm[n], scale * sgd_joint[n], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(adam_ogm[n], adam_joint[n], rtol=1e-4, atol=1e-3 * LR)  # no effect (up to ε)


# -- AGM --------------------------------------------------------------------------------------------
def test_agm_linear_late_fusion_is_a_per_block_gradient_scale():
    """Concat head, zero-centred muted features (bias-free encoders: enc(0) = 0): o_m = W_m x_m + b/2,
    so AGM multiplies encoder m's and head block W_m's gradients by κ_m and the shared bias's by
    (κ_a + κ_b)/2. Under SGD those are the step ratios; under Adam all of it cancels."""
    model, inputs, y = make("concat", bias=False)
    agm = AGM(alpha=2.0, reference="fixed")
    g_agm, sgd_agm = one_step(model, inputs, y, agm, "sgd")
    ka, kb = agm.statistics()["kappa/a"], agm.statistics()["kappa/b"]
    assert ka < 0.8 and kb > 1.2
    g_joint, sgd_joint = one_step(model, inputs, y, None, "sgd")
    expected = {"encoders.a.lin.weight": ka, "encoders.b.lin.weight": kb, "fusion.head.bias": (ka + kb) / 2}
    for n, k in expected.items():
        torch.testing.assert_close(g_agm[n], k * g_joint[n], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(sgd_agm[n], k * sgd_joint[n], rtol=1e-4, atol=1e-10)
    w_agm, w_joint = g_agm["fusion.head.weight"], g_joint["fusion.head.weight"]
    torch.testing.assert_close(w_agm[:, :8], ka * w_joint[:, :8], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(w_agm[:, 8:], kb * w_joint[:, 8:], rtol=1e-4, atol=1e-8)
    _, adam_agm = one_step(model, inputs, y, AGM(alpha=2.0, reference="fixed"), "adam")
    _, adam_joint = one_step(model, inputs, y, None, "adam")
    for n in adam_joint:
        torch.testing.assert_close(adam_agm[n], adam_joint[n], rtol=1e-4, atol=1e-3 * LR)  # up to ε


def _cosine(u, v):
    return float(F.cosine_similarity(u.flatten(), v.flatten(), dim=0))


@pytest.mark.parametrize("fusion, bias", [("mlp", False), ("concat", True)])
def test_agm_changes_gradient_direction_where_coalitions_share_parameters(fusion, bias):
    """Non-linear fusion: shared fusion weights get Σ_S c_S ∂f(S)/∂θ with coalition weights c_S set
    by κ (½(κ_a+κ_b) on f(a,b), ½(κ_a−κ_b) on f(a,∅), ...), not a multiple of the joint gradient.
    Encoders with a bias (enc(0) ≠ 0) likewise get a κ_a − κ_b weighted zero-point term. A direction
    change survives Adam: its first update differs from joint training's."""
    model, inputs, y = make(fusion, bias=bias)
    agm = AGM(alpha=2.0, reference="fixed")
    g_agm, _ = one_step(model, inputs, y, agm, "adam")
    assert abs(agm.statistics()["kappa/a"] - agm.statistics()["kappa/b"]) > 0.4
    g_joint, adam_joint = one_step(model, inputs, y, None, "adam")
    _, adam_agm = one_step(model, inputs, y, AGM(alpha=2.0, reference="fixed"), "adam")
    # (an encoder's weight sees no zero-point term: ∂enc(0)/∂W = 0; its bias does)
    name = "fusion.body.0.weight" if fusion == "mlp" else "encoders.a.lin.bias"
    assert _cosine(g_agm[name], g_joint[name]) < 0.999  # not a rescaled joint gradient
    changed = (adam_agm[name] - adam_joint[name]).abs() > 0.5 * LR  # sign flips of Adam's first step
    assert changed.any()
