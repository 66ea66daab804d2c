"""AGM with the authors' safety clip, against their training step transcribed here.

The transcription follows the AGM code's loop (CREMA-D for M = 2, UR-Funny for M = 3): one
train-mode pass, the muted passes in eval mode on zeroed inputs, the literal mono-modal formulas,
backward hooks whose scale only changes inside the modulation window (1-based epochs, inclusive
ends; outside it the hooks keep the last scale), κ = exp(α·min(τ − r, cap)) with τ from the
cumulative mean of the scores before this batch, and after backward a clip of the total gradient
norm only when an element of the classification layer's weight gradient leaves [−t, t]. Nothing
here uses modbal's helpers; the two trainings are compared parameter by parameter after each step.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modbal import AGM, MultimodalModel
from modbal.fusions import ConcatFusion, SumFusion

DIMS = {"a": 5, "v": 7, "t": 4}
EPOCHS, STEPS = 4, 3  # the code's epochs 1..4; modulation window epochs 2..3 (modbal: [1, 3))
STARTS, ENDS = 2, 3


class AuthorsAGM:
    """The AGM code's step with its hooks, κ, cumulative scores, window and conditional clip."""

    def __init__(self, names, alpha, cap, clip_at, clip_norm, prob_floor):
        self.names, self.alpha, self.cap = names, alpha, cap
        self.clip_at, self.clip_norm, self.prob_floor = clip_at, clip_norm, prob_floor
        self.scale = {m: 1.0 for m in names}  # the hooks' scales: changed only by update_scale
        self.train_score = {m: 0.0 for m in names}
        self.iteration = 0
        self.log = []

    def mono_outputs(self, model, inputs):
        def f(*kept):
            return model({m: inputs[m] if m in kept else torch.zeros_like(inputs[m]) for m in self.names})
        model.train()
        total = f(*self.names)
        model.eval()
        if len(self.names) == 2:
            a, v = self.names
            pad_v, pad_a = f(a), f(v)
            model.train()
            return {a: 0.5 * (total - pad_a + pad_v), v: 0.5 * (total - pad_v + pad_a)}
        a, v, t = self.names
        pad_a, pad_v, pad_t = f(v, t), f(a, t), f(a, v)
        only_a, only_v, only_t = f(a), f(v), f(t)
        model.train()
        return {
            t: (total - pad_t + only_t) / 3 + (pad_v - only_v + pad_a - only_a) / 6,
            a: (total - pad_a + only_a) / 3 + (pad_v - only_v + pad_t - only_t) / 6,
            v: (total - pad_v + only_v) / 3 + (pad_a - only_a + pad_t - only_t) / 6,
        }

    def score(self, out, label):
        p = torch.softmax(out.detach(), 1)[torch.arange(len(label)), label]
        if self.prob_floor is not None:
            p = torch.where(p < self.prob_floor, torch.full_like(p, self.prob_floor), p)
        return float((-torch.log(p)).mean())

    def step(self, model, head_weights, optimizer, inputs, label, epoch):
        self.iteration += 1
        m_total = len(self.names)
        mono = self.mono_outputs(model, inputs)
        for m, o in mono.items():
            o.register_hook(lambda g, m=m: g * self.scale[m])  # the scale in force at backward time
        loss = F.cross_entropy(sum(mono.values()), label)
        s = {m: self.score(mono[m], label) for m in self.names}
        mean_s = sum(s.values()) / m_total
        mean_train = sum(self.train_score.values()) / m_total
        coeff = {}
        for m in self.names:
            ratio = math.exp((mean_s - s[m]) * m_total / (m_total - 1))
            optimal = math.exp((mean_train - self.train_score[m]) * m_total / (m_total - 1))
            gap = optimal - ratio if self.cap is None else min(optimal - ratio, self.cap)
            coeff[m] = math.exp(self.alpha * gap)
        capped = self.cap is not None and STARTS <= epoch <= ENDS and any(
            math.exp((mean_train - self.train_score[m]) * m_total / (m_total - 1))
            - math.exp((mean_s - s[m]) * m_total / (m_total - 1)) > self.cap for m in self.names)
        for m in self.names:
            self.train_score[m] = self.train_score[m] * (self.iteration - 1) / self.iteration + s[m] / self.iteration
        if STARTS <= epoch <= ENDS:
            self.scale = dict(coeff)
        optimizer.zero_grad()
        loss.backward()
        grad_max = max(float(w.grad.max()) for w in head_weights)
        grad_min = min(float(w.grad.min()) for w in head_weights)
        head_ids = {id(w) for w in head_weights}
        others = max(float(p.grad.abs().max()) for p in model.parameters() if id(p) not in head_ids)
        total = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))
        clipped = grad_max > self.clip_at or grad_min < -self.clip_at
        if clipped:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=self.clip_norm)
        self.log.append({"epoch": epoch, "clipped": clipped, "total": total, "others": others, "capped": capped,
                         "scale": dict(self.scale), "head_max": grad_max, "head_min": grad_min})
        optimizer.step()


def make_model(m_total, fusion):
    """A small model whose gradients are large enough for the clip; the encoders' first layers are
    shrunk and the head enlarged, so that on some steps an encoder gradient leaves [−t, t] while the
    head's does not (a threshold test on the wrong tensor then decides differently)."""
    torch.manual_seed(0)
    names = list(DIMS)[:m_total]
    encoders = {m: nn.Sequential(nn.Linear(DIMS[m], 6), nn.ReLU(), nn.Linear(6, 6)) for m in names}
    shapes = {m: (6,) for m in names}
    head = ConcatFusion(shapes, 4) if fusion == "concat" else SumFusion(shapes, 4)
    model = MultimodalModel(encoders, head).double()
    with torch.no_grad():
        for m in names:
            model.encoders[m][0].weight.mul_(0.5)
        for w in head_weights_of(model, fusion):
            w.mul_(4.0)
    return model


def head_weights_of(model, fusion):
    """The classification layer's weights, read off the test's own model (not via modbal)."""
    if fusion == "concat":
        return [model.fusion.head.weight]
    return [model.fusion.heads[m].weight for m in model.modalities]


def batches(m_total):
    """Input scales that vary from step to step, so the clip fires on some steps and not on others."""
    g = torch.Generator().manual_seed(1)
    names = list(DIMS)[:m_total]
    scales = [0.5, 40.0, 3.0, 0.3, 20.0, 1.0]
    out = []
    for i in range(EPOCHS * STEPS):
        x = {m: scales[(i + j) % len(scales)] * torch.randn(16, DIMS[m], generator=g, dtype=torch.float64)
             for j, m in enumerate(names)}
        out.append((x, torch.randint(4, (16,), generator=g)))
    return out


CASES = {  # M, fusion, α, cap, clip threshold t, clip norm, probability floor
    "M2 concat, CREMA-D (cap 10, clip 1)": (2, "concat", 1.5, 10.0, 1.0, 1.0, 1e-8),
    "M2 sum, AV-MNIST (no cap, clip 1)": (2, "sum", 2.5, None, 1.0, 1.0, 1e-8),
    "M3 concat, UR-Funny (cap 7, clip 5)": (3, "concat", 4.0, 7.0, 5.0, 5.0, None),
    "M3 sum, UR-Funny (cap 7, clip 5)": (3, "sum", 4.0, 7.0, 5.0, 5.0, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_updates_match_the_authors_step(case):
    m_total, fusion, alpha, cap, clip_at, clip_norm, floor = CASES[case]
    ours = make_model(m_total, fusion)
    theirs = copy.deepcopy(ours)
    ref = AuthorsAGM(list(ours.modalities), alpha, cap, clip_at, clip_norm, floor)
    agm = AGM(alpha=alpha, cap=cap, start_epoch=STARTS - 1, end_epoch=ENDS, hold_last=True,
              clip_grad_norm=clip_norm, clip_when_head_grad_exceeds=clip_at, muting="inputs",
              prob_floor=floor if floor is not None else 1e-300)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    data = batches(m_total)
    for epoch in range(1, EPOCHS + 1):
        agm.on_epoch_start(epoch - 1)
        for step in range(STEPS):
            inputs, label = data[(epoch - 1) * STEPS + step]
            loss = agm.loss(ours, inputs, label)
            opt_ours.zero_grad()
            loss.backward()
            agm.after_backward(ours)
            opt_ours.step()
            ref.step(theirs, head_weights_of(theirs, fusion), opt_theirs, inputs, label, epoch)
            stats = agm.statistics()
            assert [stats[f"kappa/{m}"] for m in ours.modalities] == pytest.approx(
                [ref.log[-1]["scale"][m] for m in ours.modalities], rel=1e-7)  # the scale the hooks applied
            assert stats["clipped"] == float(ref.log[-1]["clipped"] and ref.log[-1]["total"] > clip_norm)
            for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12,
                                           msg=lambda m, name=name, e=epoch, s=step: f"{name}, epoch {e} step {s}: {m}")
    log = ref.log
    # the scenario exercises every branch a wrong implementation could get wrong
    assert any(r["clipped"] and r["total"] > clip_norm for r in log), "the clip never acted"
    assert any(not r["clipped"] and r["total"] > clip_norm for r in log), "unconditional clipping would not differ"
    assert any(not r["clipped"] and r["others"] > clip_at for r in log), "a test on other tensors would not differ"
    before = [r["scale"] for r in log if r["epoch"] < STARTS]
    inside = [r["scale"] for r in log if STARTS <= r["epoch"] <= ENDS]
    after = [r["scale"] for r in log if r["epoch"] > ENDS]
    assert all(s == {m: 1.0 for m in ours.modalities} for s in before)
    assert all(s == inside[-1] for s in after) and any(abs(k - 1) > 0.05 for k in inside[-1].values())
    if m_total == 3:  # UR-Funny's cap 7 at α = 4 binds here; CREMA-D's cap 10 is not reached in 12 steps
        assert any(r["capped"] for r in log), "the cap never bound"


def test_output_weights_are_the_classification_layer():
    shapes = {"a": (3,), "b": (2, 2)}
    concat, summed = ConcatFusion(shapes, 5), SumFusion(shapes, 5)
    assert [w is concat.head.weight for w in concat.output_weights()] == [True]
    assert [w.shape for w in summed.output_weights()] == [(5, 3), (5, 4)]
    assert all(w is summed.heads[m].weight for w, m in zip(summed.output_weights(), "ab"))


def test_clip_needs_a_fusion_with_output_weights_and_a_norm():
    class Plain(nn.Module):
        def forward(self, features):
            return features["a"] + features["b"]

    model = MultimodalModel({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}, Plain())
    agm = AGM(clip_grad_norm=1.0, clip_when_head_grad_exceeds=1.0)
    inputs = {"a": torch.randn(5, 3), "b": torch.randn(5, 2)}
    agm.loss(model, inputs, torch.randint(4, (5,))).backward()
    with pytest.raises(TypeError, match="Plain has no output_weights"):
        agm.after_backward(model)
    with pytest.raises(ValueError, match="needs clip_grad_norm"):
        AGM(clip_when_head_grad_exceeds=1.0)
    with pytest.raises(ValueError, match="clip_when_head_grad_exceeds"):
        AGM(clip_grad_norm=1.0, clip_when_head_grad_exceeds=0.0)


@pytest.mark.parametrize("head_grad, clipped", [
    ([0.5, -2.0], True),    # only a negative element leaves [−1, 1]: the code's test is two-sided
    ([1.5, -0.2], True),
    ([1.0, -1.0], False),   # on the boundary: inside
])
def test_threshold_test_on_hand_set_gradients(head_grad, clipped):
    """The decision alone, with gradients set by hand: large encoder gradients never trigger it."""
    torch.manual_seed(0)
    model = MultimodalModel({"a": nn.Linear(3, 2), "b": nn.Linear(2, 2)}, ConcatFusion({"a": (2,), "b": (2,)}, 2))
    agm = AGM(clip_grad_norm=1.0, clip_when_head_grad_exceeds=1.0)
    agm.loss(model, {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}, torch.randint(2, (4,))).backward()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    model.encoders["a"].weight.grad.fill_(3.0)  # total norm well above 1 in every case
    model.fusion.head.weight.grad = torch.tensor([head_grad, [0.0, 0.0]]).repeat(1, 2)
    before = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    agm.after_backward(model)
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert float(after) == pytest.approx(1.0 if clipped else float(before), rel=1e-5)
    assert agm.statistics()["clipped"] == float(clipped)
