"""UGM (under-use gap modulation) against the per-step rule of docs/research/balance-gap-plan.md,
written out here: its own heads, the Shapley mono-modal outputs summed by hand over coalitions of
the model's fusion (muted modalities get the encoder's feature of an all-zero sample, the fusion
runs in eval mode), the gaps' moving average, the clipped coefficients, and the gradient scaling
as o_m' = κ_m·o_m + (1 − κ_m)·stop_gradient(o_m); and the round-2 options of the plan: the accuracy
gap acc(u_m) − acc(o_m) (argmax) and κ_m as the weight of each head's loss beside an unscaled fused
loss. Nothing here calls modbal's Shapley, AGM or UGM helpers for an expected value.
"""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from _method_runs import DIMS, plain_step, random_batch, tiny_model
from torch import nn

from modbal import METHODS, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods import UGM
from modbal.methods.base import method_modules

C = 4
FEATURE = 6


def make_model(m_total, fusion="concat"):
    """Per modality Linear(DIMS[m], 6) and tanh, then concatenation or a one-hidden-layer MLP; float64."""
    return tiny_model(m_total, width=FEATURE, classes=C, fusion=ConcatFusion if fusion == "concat" else MLPFusion)


def batch(m_total, seed=0):
    return random_batch(m_total, n=12, seed=seed, classes=C)


def shapley_by_hand(model, x):
    """o_m = Σ_{S ∌ m} |S|!(M−|S|−1)!/M!·(f(S ∪ {m}) − f(S)) + f(∅)/M, with f(S) the fusion on the
    real features of S and the zero-sample features of the others."""
    names = list(model.modalities)
    n = len(names)
    real = {m: model.encoders[m](x[m]) for m in names}
    zero = {m: model.encoders[m](torch.zeros(1, DIMS[m], dtype=torch.float64)).expand_as(real[m]) for m in names}

    def f(coalition):
        feats = {m: real[m] if m in coalition else zero[m] for m in names}
        if len(coalition) == n:
            return model.fusion(feats)
        model.fusion.eval()
        out = model.fusion(feats)
        model.fusion.train()
        return out

    mono = []
    for m in names:
        others = [k for k in names if k != m]
        total = f(()) / n
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in itertools.combinations(others, size):
                total = total + weight * (f((*s, m)) - f(s))
        mono.append(total)
    return real, mono


class PlanStep:
    """The plan's per-step rule, for one model and its own heads."""

    def __init__(self, model, heads, alpha, beta, momentum, kappa_max, assist, gauge="loss", target="fused_gradient"):
        self.model, self.heads = model, heads
        self.alpha, self.beta, self.momentum, self.kappa_max, self.assist = alpha, beta, momentum, kappa_max, assist
        self.gauge, self.target = gauge, target
        self.gaps = [0.0] * len(model.modalities)
        self.kappa = None

    def loss(self, x, y):
        names = list(self.model.modalities)
        h, mono = shapley_by_hand(self.model, x)
        head_logits = [self.heads[m](h[m] if self.assist else h[m].detach()) for m in names]
        head_losses = [F.cross_entropy(u, y) for u in head_logits]
        if self.gauge == "loss":
            d = [F.cross_entropy(o, y).item() - u.item() for o, u in zip(mono, head_losses)]
        else:  # the fraction of the batch the head gets right minus the fraction o_m gets right
            d = [sum(int(a) == int(b) for a, b in zip(u.argmax(1), y)) / len(y)
                 - sum(int(a) == int(b) for a, b in zip(o.argmax(1), y)) / len(y) for u, o in zip(head_logits, mono)]
        self.batch_gaps = d
        self.gaps = [self.momentum * g + (1 - self.momentum) * dm for g, dm in zip(self.gaps, d)]
        mean = sum(self.gaps) / len(self.gaps)
        self.kappa = [min(max(math.exp(self.alpha * (g - mean)), 1 / self.kappa_max), self.kappa_max)
                      for g in self.gaps]
        if self.target == "head_loss":  # κ (plain floats: no gradient) weights the heads; fused loss unscaled
            fused = self.model.fusion(h)
            return F.cross_entropy(fused, y) + self.beta * sum(k * u for k, u in zip(self.kappa, head_losses))
        scaled = [k * o + (1 - k) * o.detach() for k, o in zip(self.kappa, mono)]
        return F.cross_entropy(sum(scaled), y) + self.beta * sum(head_losses)


def reference_heads(method, model):
    """The test's own linear heads, starting from the method's initial weights (read once)."""
    heads = nn.ModuleDict({m: nn.Linear(FEATURE, C).double() for m in model.modalities})
    for m in model.modalities:
        heads[m].load_state_dict(method_modules(model)[m].linear.state_dict())
    return heads


def steps_against_the_plan(m_total, fusion, steps, lr, options, **choices):
    """``steps`` SGD steps of modbal's UGM beside the test's transcription of the plan, from the same
    weights: loss, gaps and κ must agree at every step and the weights at the end. Returns every
    step's κ and batch gaps (the transcription's)."""
    ours = make_model(m_total, fusion)
    method = UGM(**choices, **options)
    method.attach(ours)
    theirs = copy.deepcopy(ours)
    del theirs.method_modules
    plan_choices = {k: v for k, v in choices.items() if k in ("gauge", "target")}
    plan = PlanStep(theirs, reference_heads(method, ours), assist=choices["heads"] == "assist", **plan_choices,
                    **options)
    opt_ours = torch.optim.SGD(method.param_groups(ours)[0]["params"], lr=lr, momentum=0.9)
    opt_theirs = torch.optim.SGD([*theirs.parameters(), *plan.heads.parameters()], lr=lr, momentum=0.9)
    names = list(ours.modalities)
    kappas, gaps = [], []
    for step in range(steps):
        x, y = batch(m_total, seed=step)
        loss = plain_step(ours, method, opt_ours, x, y)
        opt_theirs.zero_grad()
        expected = plan.loss(x, y)
        expected.backward()
        opt_theirs.step()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        stats = method.statistics()
        assert [stats[f"gap/{m}"] for m in names] == pytest.approx(plan.gaps, rel=1e-9, abs=1e-12)
        assert [stats[f"coef/{m}"] for m in names] == pytest.approx(plan.kappa, rel=1e-9)
        kappas += plan.kappa
        gaps += plan.batch_gaps
    for (name, p), q in zip(ours.named_parameters(), [*theirs.parameters(), *plan.heads.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    return kappas, gaps


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "mlp"])
@pytest.mark.parametrize("heads", ["probe", "assist"])
def test_ugm_steps_match_the_plan(m_total, fusion, heads):
    options = {"alpha": 8.0, "beta": 0.7, "momentum": 0.6, "kappa_max": 1.2}
    kappas, _ = steps_against_the_plan(m_total, fusion, 5, 0.1, options, heads=heads)
    # the rule was exercised: coefficients away from 1, and the clip reached
    assert max(abs(k - 1) for k in kappas) > 0.05
    assert any(math.isclose(k, 1.2) or math.isclose(k, 1 / 1.2) for k in kappas)


@pytest.mark.parametrize("m_total", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "mlp"])
@pytest.mark.parametrize("gauge, heads, target", [("accuracy", "probe", "fused_gradient"),
                                                  ("accuracy", "assist", "head_loss"), ("loss", "assist", "head_loss")])
def test_round_two_options_steps_match_the_plan(m_total, fusion, gauge, heads, target):
    """Round 2: V3 (accuracy gauge, probe heads), V4 (accuracy gauge, κ weighting the assisting
    heads' losses) and κ from the loss gauge weighting the heads (where κ must be kept out of the
    gradient) against the transcription, over several SGD steps."""
    options = {"alpha": 10.0, "beta": 0.7, "momentum": 0.6, "kappa_max": 4.0}
    kappas, gaps = steps_against_the_plan(m_total, fusion, 6, 0.2, options, heads=heads, gauge=gauge, target=target)
    # gaps of both signs occurred, and κ moved visibly away from 1
    assert min(gaps) < 0 < max(gaps)
    assert max(abs(k - 1) for k in kappas) > 0.2


def test_head_loss_target_leaves_the_fused_gradient_to_joint_training():
    """With κ weighting the heads, the fused loss's gradient is joint training's whatever κ is."""
    x, y = batch(3)
    model = make_model(3, "mlp")
    method = UGM(alpha=10.0, momentum=0.0, gauge="accuracy", target="head_loss", heads="assist", beta=0.0)
    method.attach(model)
    for step in range(3):
        method.loss(model, *batch(3, seed=step + 1))
    assert any(abs(method.statistics()[f"coef/{m}"] - 1) > 0.2 for m in "abc")
    method.loss(model, x, y).backward()
    joint = make_model(3, "mlp")
    F.cross_entropy(joint(x), y).backward()
    for p, q in zip(model.encoders.parameters(), joint.encoders.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"gauge": "ce"}, "Invalid gauge 'ce'; allowed values: loss, accuracy"),
    ({"target": "heads"}, "Invalid target 'heads'; allowed values: fused_gradient, head_loss"),
    ({"target": "head_loss"}, r"target='head_loss' needs heads='assist' \(got heads='probe'\)"),
    ({"target": "head_loss", "heads": "probe", "gauge": "accuracy"}, "target='head_loss' needs heads='assist'"),
])
def test_bad_round_two_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UGM(**kwargs)


def test_probe_heads_leave_the_encoders_to_the_fused_gradient():
    x, y = batch(2)
    grads = {}
    for heads in ("probe", "assist"):
        model = make_model(2)
        method = UGM(heads=heads, alpha=0.0)
        method.attach(model)
        method.loss(model, x, y).backward()
        grads[heads] = model.encoders["a"][0].weight.grad.clone()
    fused = make_model(2)
    F.cross_entropy(fused(x), y).backward()  # alpha = 0: joint training's gradient, plus the heads
    torch.testing.assert_close(grads["probe"], fused.encoders["a"][0].weight.grad)
    assert not torch.allclose(grads["assist"], grads["probe"])


@pytest.mark.parametrize("m_total", [2, 3])
def test_with_experts_adds_each_heads_log_probabilities(m_total):
    model = make_model(m_total, "mlp")
    method = UGM(predict="with_experts")
    method.attach(model)
    assert method.predicts and not UGM().predicts
    model.eval()
    x, _ = batch(m_total, seed=4)
    with torch.no_grad():
        out = method.predict(model, x)
        heads = method_modules(model)
        expected = model.fusion({m: model.encoders[m](x[m]) for m in model.modalities})
        for m in model.modalities:
            expected = expected + torch.log_softmax(heads[m].linear(model.encoders[m](x[m])), dim=-1)
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert out.mono.shape == (m_total, *expected.shape)
    torch.testing.assert_close(out.mono.sum(0), expected, rtol=1e-10, atol=1e-10)


def test_until_epoch_stops_the_modulation_and_state_round_trips():
    model = make_model(3)
    method = UGM(alpha=2.0, until_epoch=1)
    method.attach(model)
    for step in range(3):
        method.loss(model, *batch(3, seed=step)).backward()
    assert any(abs(method.statistics()[f"coef/{m}"] - 1) > 1e-6 for m in "abc")
    copy_ = UGM(alpha=2.0, until_epoch=1)
    copy_.load_state_dict(method.state_dict())
    for other in (method, copy_):
        other.on_epoch_start(1)
        other.loss(model, *batch(3, seed=9))
    assert method.statistics() == copy_.statistics()
    assert all(method.statistics()[f"coef/{m}"] == 1.0 for m in "abc")
    assert method.state_dict()["count"] == 4 and method.state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="state must have keys"):
        UGM().load_state_dict({"gaps": None})
    with pytest.raises(ValueError, match=r"gaps of shape \(2,\) do not match modalities \('a', 'b', 'c'\)"):
        UGM().load_state_dict({**method.state_dict(), "gaps": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"ugm was used with modalities \['a', 'b', 'c'\], now got \['a', 'b'\]"):
        other = make_model(2)
        method.attach(other)
        method.loss(other, *batch(2))


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -1}, "Invalid alpha: -1"), ({"beta": float("nan")}, "Invalid beta: nan"),
    ({"momentum": 1.0}, "Invalid momentum: 1.0"), ({"kappa_max": 0.5}, "Invalid kappa_max: 0.5"),
    ({"heads": "both"}, "Invalid heads 'both'; allowed values: probe, assist"),
    ({"predict": "experts"}, "Invalid predict 'experts'; allowed values: fused, with_experts"),
    ({"until_epoch": 0}, "Invalid until_epoch: 0"), ({"alpha": True}, "Invalid alpha: True"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UGM(**kwargs)


def test_a_model_without_encoder_parameters_is_refused():
    early = MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion({"a": (5,), "b": (7,)}, C))
    with pytest.raises(ValueError, match=r"ugm acts on each modality's encoder parameters, but the encoders of "
                                         r"\['a', 'b'\] have none"):
        METHODS.create("ugm").attach(early)


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    from _method_runs import assert_resume_exact
    assert_resume_exact(tmp_path, monkeypatch, {"name": "ugm", "alpha": 2.0, "heads": "assist",
                                                "predict": "with_experts", "until_epoch": 2})


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    from _method_runs import assert_ddp_matches_single
    assert_ddp_matches_single(tmp_path, {"name": "ugm", "alpha": 2.0},
                              ("gap/a", "gap/b", "coef/a", "coef/b"))


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process_with_accuracy_gauge_and_head_loss(tmp_path):
    from _method_runs import assert_ddp_matches_single
    assert_ddp_matches_single(tmp_path, {"name": "ugm", "alpha": 10.0, "gauge": "accuracy", "target": "head_loss",
                                         "heads": "assist", "predict": "with_experts"},
                              ("gap/a", "gap/b", "coef/a", "coef/b"))
