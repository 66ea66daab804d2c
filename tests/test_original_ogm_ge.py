"""modbal's OGM-GE against a transcription of the authors' procedure (OGM-GE_CVPR2022 ``main.py``,
``train_epoch``), written out in this file: own-head outputs, summed true-class scores, the ratio,
Eq. (10) as their code computes it, conv-weights-only scaling, the inclusive 0-based window, the
GE noise std. Nothing here computes an expected value with modbal; modbal only builds the model
and runs its method. M = 3 is compared with a transcription of modbal's documented rule (ρ_m =
s_m / mean of the others), since the original has two modalities only."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from torch import nn

from modbal.fusions.concat import ConcatFusion
from modbal.fusions.sum import SumFusion
from modbal.methods import OGMGE
from modbal.model import MultimodalModel

C, D, SIDE = 4, 4, 6


class ConvEncoder(nn.Module):
    """Conv → BatchNorm → ReLU → conv → pool: its only tensors with 2+ dims are 4-D conv weights."""

    def __init__(self, channels: int = 3, out: int = D) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(),
                                 nn.Conv2d(channels, out, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_shape = (out,)

    def forward(self, x):
        return self.net(x)


def build(fusion: str, modalities=("audio", "visual"), channels: int = 3, width: int = D,
          seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    encoders = {m: ConvEncoder(channels, width) for m in modalities}
    shapes = {m: (width,) for m in modalities}
    fusions = {"concat": ConcatFusion, "sum": SumFusion, "mlp": MLPFusion}
    return MultimodalModel(encoders, fusions[fusion](shapes, C)).double()


def batches(modalities, n: int, batch: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, C, (batch,), generator=g)
        inputs = {}
        for i, m in enumerate(modalities):
            x = torch.randn(batch, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
            x[:, 0, :2, :2] += (1.5 / (i + 1)) * y.view(-1, 1, 1).double()  # the first modality dominates
            inputs[m] = x
        out.append((inputs, y))
    return out


# -- the original, transcribed -------------------------------------------------------------------
def own_head_outputs(model, feats, modalities):
    """``out_a = mm(a, W[:, :d].T) + b/M`` (concat) or ``fc_x(a)`` (sum) for each modality; for a
    fusion without heads, the AGM code's ``0.5*(total − pad_other + pad_self)`` (M = 2)."""
    fusion = model.fusion
    if isinstance(fusion, ConcatFusion):
        w, b, d = fusion.head.weight, fusion.head.bias, feats[modalities[0]].shape[1]
        return {m: feats[m] @ w[:, i * d:(i + 1) * d].T + b / len(modalities) for i, m in enumerate(modalities)}
    if isinstance(fusion, SumFusion):
        return {m: feats[m] @ fusion.heads[m].weight.T + fusion.heads[m].bias for m in modalities}
    a, v = modalities
    with torch.no_grad():
        for enc in model.encoders.values():
            enc.eval()
        zero = {m: model.encoders[m](torch.zeros(1, 1, SIDE, SIDE, dtype=torch.float64)) for m in modalities}
        for enc in model.encoders.values():
            enc.train()
        total = fusion(feats)
        pad_visual_out = fusion({a: feats[a], v: zero[v].expand_as(feats[v])})  # visual muted
        pad_audio_out = fusion({a: zero[a].expand_as(feats[a]), v: feats[v]})
    return {a: 0.5 * (total - pad_audio_out + pad_visual_out), v: 0.5 * (total - pad_visual_out + pad_audio_out)}


def fused_logits(model, feats, modalities):
    fusion = model.fusion
    if isinstance(fusion, ConcatFusion):
        return torch.cat([feats[m] for m in modalities], 1) @ fusion.head.weight.T + fusion.head.bias
    if isinstance(fusion, SumFusion):
        return sum(feats[m] @ fusion.heads[m].weight.T + fusion.heads[m].bias for m in modalities)
    return fusion(feats)


def true_class_scores(outs, y):
    """``score_a = sum([softmax(out_a)[i][label[i]] for i in range(B)])`` for each modality."""
    scores = {}
    for m, out in outs.items():
        probs = F.softmax(out.detach(), 1)
        scores[m] = float(sum(probs[i][y[i]] for i in range(out.size(0))))
    return scores


def original_coefficients(score, alpha):
    """Eq. (10) as the authors' code: only the dominant modality is scaled, by 1 − tanh(α·ρ)."""
    relu, tanh = (lambda x: max(x, 0.0)), math.tanh
    if len(score) == 2:
        (a, score_a), (v, score_v) = score.items()
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            return {v: 1 - tanh(alpha * relu(ratio_v)), a: 1.0}
        return {a: 1 - tanh(alpha * relu(ratio_a)), v: 1.0}
    coeff = {}  # modbal's documented M > 2 rule: each modality against the mean of the others
    for m, s in score.items():
        rho = s / (sum(t for k, t in score.items() if k != m) / (len(score) - 1))
        coeff[m] = 1 - tanh(alpha * rho) if rho > 1 else 1.0
    return coeff


def original_step(model, opt, inputs, y, epoch, alpha, starts, ends, modalities):
    """One step of ``train_epoch`` (OGM mode: GE noise off)."""
    opt.zero_grad()
    feats = {m: model.encoders[m](inputs[m]) for m in modalities}
    out = fused_logits(model, feats, modalities)
    outs = own_head_outputs(model, feats, modalities)
    loss = F.cross_entropy(out, y)
    loss.backward()
    coeff = original_coefficients(true_class_scores(outs, y), alpha)
    if starts <= epoch <= ends:
        for name, parms in model.named_parameters():
            layer = name.split(".")[1] if name.startswith("encoders.") else ""
            for m in modalities:
                if m == layer and len(parms.grad.size()) == 4:
                    parms.grad *= coeff[m]
    opt.step()
    return coeff


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


# -- the comparisons -----------------------------------------------------------------------------
@pytest.mark.parametrize("fusion, modalities", [
    ("concat", ("audio", "visual")), ("sum", ("audio", "visual")), ("mlp", ("audio", "visual")),
    ("concat", ("audio", "visual", "text")),
])
def test_training_matches_the_original_step_by_step(fusion, modalities):
    model = build(fusion, modalities)
    selected = {n for n, p in model.named_parameters() if n.startswith("encoders.") and p.dim() >= 2}
    assert selected == {n for n, p in model.named_parameters() if n.startswith("encoders.") and p.dim() == 4}
    reference = copy.deepcopy(model)
    opt, ref_opt = sgd(model), sgd(reference)
    alpha, start, end = 0.8, 1, 3  # modbal [1, 3) is the original's starts=1, ends=2 (inclusive, 0-based)
    method = OGMGE(alpha=alpha, ge=False, start_epoch=start, end_epoch=end)
    data = batches(modalities, 2)
    seen = {"scaled": set(), "unscaled_in_window": set()}
    for epoch in range(4):
        method.on_epoch_start(epoch)
        for inputs, y in data:
            coeff = original_step(reference, ref_opt, inputs, y, epoch, alpha, start, end - 1, modalities)
            opt.zero_grad()
            method.loss(model, inputs, y).backward()
            method.after_backward(model)
            opt.step()
            inside = start <= epoch < end
            for m, k in coeff.items():
                assert method.statistics()[f"coef/{m}"] == pytest.approx(k if inside else 1.0, rel=1e-9)
                if inside:
                    seen["scaled" if k < 1 else "unscaled_in_window"].add(m)
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"epoch {epoch}: {name}")
            for (name, b), c in zip(model.named_buffers(), reference.buffers()):
                torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)
    assert seen["scaled"] and seen["unscaled_in_window"]  # ρ on both sides of 1 were exercised


def test_scores_heads_and_shapley_fallback_are_what_auto_picks():
    inputs, y = batches(("audio", "visual"), 1)[0]
    for fusion, source in (("concat", "head"), ("sum", "head"), ("mlp", "mono")):
        model = build(fusion)
        reference = copy.deepcopy(model)  # BatchNorm statistics move in train mode: a copy for each side
        with torch.no_grad():
            feats = {m: reference.encoders[m](inputs[m]) for m in ("audio", "visual")}
            outs = own_head_outputs(reference, feats, ("audio", "visual"))
        method = OGMGE(alpha=1.0, ge=False)
        method.loss(model, inputs, y)
        for m in ("audio", "visual"):
            expected = true_class_scores(outs, y)[m]
            assert method.statistics()[f"score/{m}"] == pytest.approx(expected, rel=1e-9), (fusion, m)
            assert f"{source}_acc/{m}" in method.statistics()


def test_ge_noise_std_is_the_gradient_std_plus_1e8_on_conv_weights_only():
    modalities = ("audio", "visual")
    big = build("concat", channels=64, width=64)  # second conv weight: 64·64·3·3 = 36,864 elements
    inputs, y = batches(modalities, 1, batch=64)[0]
    joint = copy.deepcopy(big)
    feats = {m: joint.encoders[m](inputs[m]) for m in modalities}
    F.cross_entropy(fused_logits(joint, feats, modalities), y).backward()
    outs = own_head_outputs(joint, {m: f.detach() for m, f in feats.items()}, modalities)
    coeff = original_coefficients(true_class_scores(outs, y), 0.5)
    method = OGMGE(alpha=0.5, ge=True, seed=3)
    method.loss(big, inputs, y).backward()
    method.after_backward(big)
    checked = 0
    for (name, p), (_, q) in zip(big.named_parameters(), joint.named_parameters()):
        if not name.startswith("encoders.") or p.dim() != 4:
            assert torch.equal(p.grad, q.grad), name  # biases, BatchNorm, fusion: no scale, no noise
            continue
        m = name.split(".")[1]
        noise = p.grad - coeff[m] * q.grad
        std = float(q.grad.std()) + 1e-8  # the original: std of the unscaled gradient + 1e-8
        if p.numel() >= 30000:
            assert float(noise.std()) == pytest.approx(std, rel=0.03), name
            assert abs(float(noise.mean())) < 0.03 * std, name
            checked += 1
        else:
            assert float(noise.std()) == pytest.approx(std, rel=0.2), name
    assert checked == 2  # one such weight per encoder


def test_renamed_variants_are_refused_with_the_new_name():
    with pytest.raises(ValueError, match="renamed 'smooth'"):
        OGMGE(variant="paper")
    with pytest.raises(ValueError, match="renamed 'original'"):
        OGMGE(variant="code")
