"""What the authors' code of OGM-GE, MSLR and MSES reads and scales, written out for the tests that
compare modbal with it (tests/test_original_*.py). Independent of modbal's methods: it reads the
fusion's parameters directly.

- A modality's own output: ``out_a = audio_cls(a)`` for the additive model (modbal's ``sum``
  fusion), ``mm(a, W[:, :d].T) + b/2`` for a concatenation head (``concat``; b/M for M
  modalities), and, for a fusion without per-modality heads, the AGM code's
  ``0.5*(total_out − pad_audio_out + pad_visual_out)`` (M = 2; the muted modality's feature is
  its encoder applied to zeros in eval mode).
- A modality's own parameters: ``'audio_net' in layer or 'audio_cls' in layer``: the encoder and
  its own head (for a concatenation head, the weight's columns of that modality).
"""
from __future__ import annotations

import torch
from torch import nn

from modbal.fusions.concat import ConcatFusion
from modbal.fusions.sum import SumFusion


def _blocks(model, feats):
    widths = [feats[m].shape[1] for m in model.modalities]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return {m: slice(a, a + w) for m, a, w in zip(model.modalities, starts, widths)}


def own_outputs(model, feats, zero_inputs=None):
    """Each modality's own output from its features (``zero_inputs``: one all-zero input per
    modality, needed for fusions without heads)."""
    fusion, mods = model.fusion, model.modalities
    if isinstance(fusion, ConcatFusion):
        w, b, cols = fusion.head.weight, fusion.head.bias, _blocks(model, feats)
        return {m: feats[m] @ w[:, cols[m]].T + b / len(mods) for m in mods}
    if isinstance(fusion, SumFusion):
        return {m: feats[m] @ fusion.heads[m].weight.T + fusion.heads[m].bias for m in mods}
    assert len(mods) == 2, "the AGM code's mono-modal formula is for two modalities"
    a, v = mods
    training = {m: model.encoders[m].training for m in mods}
    for m in mods:
        model.encoders[m].eval()
    zero = {m: model.encoders[m](zero_inputs[m]) for m in mods}
    for m in mods:
        model.encoders[m].train(training[m])
    fusion_training = fusion.training
    total = fusion(feats)
    fusion.eval()
    pad_visual_out = fusion({a: feats[a], v: zero[v].expand_as(feats[v])})
    pad_audio_out = fusion({a: zero[a].expand_as(feats[a]), v: feats[v]})
    fusion.train(fusion_training)
    return {a: 0.5 * (total - pad_audio_out + pad_visual_out), v: 0.5 * (total - pad_visual_out + pad_audio_out)}


def scale_own_gradients(model, modality, factor):
    """``params.grad = params.grad * coeff`` for the encoder's and the own head's parameters."""
    for p in model.encoders[modality].parameters():
        p.grad = p.grad * factor
    fusion = model.fusion
    if isinstance(fusion, SumFusion):
        for p in fusion.heads[modality].parameters():
            p.grad = p.grad * factor
    elif isinstance(fusion, ConcatFusion):
        width = fusion.feature_shapes[modality][0]
        start = sum(fusion.feature_shapes[m][0] for m in model.modalities[:model.modalities.index(modality)])
        grad = fusion.head.weight.grad.clone()
        grad[:, start:start + width] *= factor
        fusion.head.weight.grad = grad


class MLPEncoder(nn.Module):
    def __init__(self, d_in: int, d_out: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out), nn.Tanh())
        self.out_shape = (d_out,)

    def forward(self, x):
        return self.net(x)


def toy_data(modalities, n: int, classes: int, seed: int, dims=(5, 4, 3)):
    """Inputs in which the first modality is the most informative."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    inputs = {}
    for i, m in enumerate(modalities):
        x = torch.randn(n, dims[i], generator=g, dtype=torch.float64)
        x[:, 0] += (1.2 / (i + 1)) * y.double()
        inputs[m] = x
    return inputs, y
