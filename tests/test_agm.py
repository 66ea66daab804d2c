"""AGM against a naive re-implementation of the paper code's procedure, written here.

The reference runs the model once in train mode on the full input, then once per muted
coalition in eval mode on zeroed inputs, forms Shapley mono-modal outputs by averaging marginal
contributions over all orderings, and scales the gradient reaching each o_m with a backward hook.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _shapley_reference import permutation_mono
from torch import nn

from modbal import AGM, Joint, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.fusions.base import Fusion

DIMS = {"a": 5, "b": 7, "c": 4}


class MLPFusion(Fusion):
    def __init__(self, feature_shapes, num_classes, norm=True):
        super().__init__(feature_shapes, num_classes)
        width = sum(s[0] for s in feature_shapes.values())
        extra = [nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3)] if norm else [nn.Tanh()]
        self.body = nn.Sequential(nn.Linear(width, 12), *extra)
        self.head = nn.Linear(12, num_classes)

    def represent(self, features):
        return self.body(torch.cat([features[m] for m in self.modalities], 1))


def make_model(m_total, fusion, norm, seed=0):
    torch.manual_seed(seed)
    names = list(DIMS)[:m_total]
    if norm:
        encoders = {m: nn.Sequential(nn.Linear(DIMS[m], 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.2))
                    for m in names}
    else:
        encoders = {m: nn.Sequential(nn.Linear(DIMS[m], 6), nn.Tanh()) for m in names}
    shapes = {m: (6,) for m in names}
    head = ConcatFusion(shapes, 4) if fusion == "concat" else MLPFusion(shapes, 4, norm=norm)
    return MultimodalModel(encoders, head).double()


def batch(m_total, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = list(DIMS)[:m_total]
    return ({m: torch.randn(n, DIMS[m], generator=g, dtype=torch.float64) for m in names},
            torch.randint(4, (n,), generator=g))


class PaperReference:
    """The paper code's AGM step, naively: separate passes, permutation Shapley, hooks."""

    def __init__(self, alpha, reference="cumulative", momentum=0.9, scores="shapley"):
        self.alpha, self.reference, self.momentum, self.scores = alpha, reference, momentum, scores
        self.history = []  # s_m of every past step
        self.ema = None

    def tau(self, m_total):
        if self.reference == "fixed" or not self.history:
            return [1.0] * m_total
        if self.reference == "cumulative":
            avg = [sum(h[m] for h in self.history) / len(self.history) for m in range(m_total)]
        else:
            avg = self.ema
        mean = sum(avg) / m_total
        return [math.exp(m_total / (m_total - 1) * (mean - avg[m])) for m in range(m_total)]

    def loss(self, model, inputs, targets):
        names = list(model.modalities)
        m_total = len(names)
        model.train()
        values = {(1 << m_total) - 1: model(inputs)}
        model.eval()
        for mask in range((1 << m_total) - 1):
            values[mask] = model({m: inputs[m] if mask >> i & 1 else torch.zeros_like(inputs[m])
                                  for i, m in enumerate(names)})
        model.train()
        mono = permutation_mono(values, m_total)
        scores = []
        scored = mono if self.scores == "shapley" else [values[1 << m] for m in range(m_total)]  # f({m}) alone
        for o in scored:
            p = torch.softmax(o.detach(), 1)[torch.arange(len(targets)), targets]
            scores.append(float((-torch.log(torch.clamp(p, min=1e-8))).mean()))
        mean = sum(scores) / m_total
        ratios = [math.exp(m_total / (m_total - 1) * (mean - s)) for s in scores]
        tau = self.tau(m_total)
        kappas = [math.exp(self.alpha * (t - r)) for t, r in zip(tau, ratios)]
        self.history.append(scores)
        self.ema = (scores if self.ema is None
                    else [self.momentum * e + (1 - self.momentum) * s for e, s in zip(self.ema, scores)])
        for o, k in zip(mono, kappas):
            o.register_hook(lambda g, k=k: g * k)
        self.kappas = kappas
        return F.cross_entropy(sum(mono), targets)


def assert_grads_close(model_a, model_b, rtol=1e-5):
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        diff = (pa.grad - pb.grad).norm()
        assert diff <= rtol * pb.grad.norm() + 1e-12, f"{name}: |Δgrad| {diff:.3e} vs |grad| {pb.grad.norm():.3e}"


def run_both(m_total, fusion, norm, muting, reference="cumulative", steps=3, alpha=1.5, scores="shapley"):
    ours, theirs = make_model(m_total, fusion, norm), None
    theirs = copy.deepcopy(ours)
    agm = AGM(alpha=alpha, muting=muting, reference=reference, momentum=0.9, scores=scores)
    ref = PaperReference(alpha, reference, 0.9, scores)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        inputs, targets = batch(m_total, seed=step)
        for model, method, opt in ((ours, agm, opt_a), (theirs, ref, opt_b)):
            torch.manual_seed(100 + step)  # same dropout masks
            opt.zero_grad()
            method.loss(model, inputs, targets).backward()
        assert_grads_close(ours, theirs)
        kappa = [agm.statistics()[f"kappa/{m}"] for m in ours.modalities]
        assert kappa == pytest.approx(ref.kappas, rel=1e-9)
        opt_a.step()
        opt_b.step()
    for name, buf in ours.named_buffers():  # BatchNorm statistics only from the full pass
        torch.testing.assert_close(buf, dict(theirs.named_buffers())[name])
    return agm


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "mlp"])
def test_inputs_muting_matches_paper_code_with_batchnorm_and_dropout(m_total, fusion):
    agm = run_both(m_total, fusion, norm=True, muting="inputs")
    assert any(abs(agm.statistics()[f"kappa/{m}"] - 1) > 1e-3 for m in list(DIMS)[:m_total])


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "mlp"])
def test_features_muting_matches_paper_code_without_normalization(m_total, fusion):
    run_both(m_total, fusion, norm=False, muting="features")


@pytest.mark.parametrize("reference", ["ema", "fixed"])
def test_other_references_match_their_definition(reference):
    run_both(2, "mlp", norm=False, muting="features", reference=reference, steps=4)


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("muting,norm", [("inputs", True), ("features", False)])
def test_masked_scores_ablation_matches_its_definition(m_total, muting, norm):
    """scores="masked": s_m from f({m}) alone, the gradient still modulated through the Shapley o_m."""
    agm = run_both(m_total, "mlp", norm, muting, scores="masked")
    shapley = run_both(m_total, "mlp", norm, muting)
    assert agm.statistics()["s/a"] != pytest.approx(shapley.statistics()["s/a"], rel=1e-3)  # a real difference
    with pytest.raises(ValueError, match="Invalid scores 'mono'"):
        AGM(scores="mono")


def test_features_muting_leaves_batchnorm_statistics_to_the_full_pass():
    model = make_model(2, "mlp", norm=True)
    plain = copy.deepcopy(model)
    inputs, targets = batch(2)
    torch.manual_seed(1)
    AGM(alpha=1.0).loss(model, inputs, targets)
    torch.manual_seed(1)
    plain(inputs)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(plain.named_buffers())[name])
    assert model.training and all(m.training for m in model.modules())


def test_mono_outputs_sum_to_fused_logits_in_both_paths():
    model = make_model(3, "mlp", norm=True).eval()
    inputs, _ = batch(3)
    a = model(inputs, shapley="features")
    b = model(inputs, shapley="inputs")
    torch.testing.assert_close(a.mono.sum(0), a.logits)
    torch.testing.assert_close(a.coalitions, b.coalitions)  # eval mode: the two paths agree


class IgnoresLast(Fusion):
    """A bias-free fusion that never looks at the last modality."""

    def __init__(self, feature_shapes, num_classes):
        super().__init__(feature_shapes, num_classes)
        used = self.modalities[:-1]
        self.heads = nn.ModuleDict({m: nn.Linear(feature_shapes[m][0], num_classes, bias=False) for m in used})

    def forward(self, features):
        return sum(torch.tanh(self.heads[m](features[m])) for m in self.heads)


@pytest.mark.parametrize("muting", ["features", "inputs"])
def test_ignored_modality_gets_zero_shapley_value_and_kappa_has_no_effect(muting):
    torch.manual_seed(0)
    names = list(DIMS)
    model = MultimodalModel({m: nn.Linear(DIMS[m], 6, bias=False) for m in names},
                            IgnoresLast({m: (6,) for m in names}, 4)).double()
    inputs, targets = batch(3)
    out = model(inputs, shapley=muting)
    torch.testing.assert_close(out.mono[2], out.coalitions[0] / 3)  # φ_c = 0
    grads = []
    for kappa_c in (0.1, 10.0):
        model.zero_grad()
        from modbal.methods.agm import scale_gradient
        out = model(inputs, shapley=muting)
        scale = torch.tensor([1.3, 0.7, kappa_c], dtype=torch.float64)
        F.cross_entropy(scale_gradient(out.mono, scale).sum(0), targets).backward()
        assert model.encoders["c"].weight.grad is None or not model.encoders["c"].weight.grad.any()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2)


def test_joint_has_the_same_interface_and_plain_cross_entropy():
    model = make_model(2, "concat", norm=False)
    inputs, targets = batch(2)
    loss = Joint().loss(model, inputs, targets)
    torch.testing.assert_close(loss, F.cross_entropy(model(inputs), targets))
    Joint().after_backward(model)
    assert Joint().statistics() == {} and Joint().state_dict() == {}
