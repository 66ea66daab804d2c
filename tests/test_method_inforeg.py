"""InfoReg against the authors' ``train_epoch`` (InfoReg_CVPR2025, main.py), written here.

The reference keeps its own trace list (ten zeros first), computes k at the start of each epoch,
deep-copies the model as the anchor, trains on CE(out) + CE(out_a) + CE(out_v) with the
concatenation head's slices (half the bias each), adds β·(θ − θ̄) to the gradients of the leading
modality's encoder, accumulates grad² of every Linear weight per encoder, and appends the first
encoder's trace after the epoch. For M = 3 it applies the documented generalisation (a modality
leads when its score exceeds the mean of the others).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _method_runs import DIMS, assert_ddp_matches_single, assert_resume_exact, plain_step, random_batch
from torch import nn

from modbal import METHODS, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods.inforeg import InfoReg

WIDTH = 6
C = 4


def make_model(m_total, seed=0):
    torch.manual_seed(seed)
    names = list(DIMS)[:m_total]
    encoders = {m: nn.Sequential(nn.Linear(DIMS[m], 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, WIDTH), nn.Tanh())
                for m in names}
    return MultimodalModel(encoders, ConcatFusion({m: (WIDTH,) for m in names}, C)).double()


def batch(m_total, n=16, seed=0):
    return random_batch(m_total, n, seed, classes=C, scales=(2.0, 1.0, 1.0))


class OriginalTraining:
    def __init__(self, model, base, threshold, lr):
        self.model, self.base, self.threshold = model, base, threshold
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.audio_trace_list = [0] * 10
        self.betas = []

    def epoch(self, epoch, batches):
        model, names = self.model, list(self.model.modalities)
        if epoch == 0:
            k = 1
        else:
            tr1 = sum(self.audio_trace_list[-10:]) / 10
            tr2 = sum(self.audio_trace_list[-11:-1]) / 10
            k = (tr1 - tr2) / tr1
        self.k = k
        global_model = copy.deepcopy(model)
        fim = {m: {name: torch.zeros_like(mod.weight) for name, mod in model.encoders[m].named_modules()
                   if isinstance(mod, nn.Linear)} for m in names}
        for x, y in batches:
            self.opt.zero_grad()
            h = {m: model.encoders[m](x[m]) for m in names}
            out = model.fusion(h)
            w, b = model.fusion.head.weight, model.fusion.head.bias
            outs = [h[m] @ w[:, i * WIDTH:(i + 1) * WIDTH].T + b / len(names) for i, m in enumerate(names)]
            losses = [F.cross_entropy(o, y) for o in outs]
            for loss in losses:
                loss.backward(retain_graph=True)
            F.cross_entropy(out, y).backward()
            score = [float(sum(torch.softmax(o.detach(), 1)[i][y[i]] for i in range(o.size(0)))) for o in outs]
            beta = [0.0] * len(names)
            if k > self.threshold:
                for i in range(len(names)):
                    others = [s for j, s in enumerate(score) if j != i]
                    if score[i] > sum(others) / len(others):
                        gap = math.tanh(score[i] - sum(others) / len(others))
                        beta[i] = self.base[i] * math.exp(gap)
            self.betas.append(beta)
            for i, m in enumerate(names):
                for p, p0 in zip(model.encoders[m].parameters(), global_model.encoders[m].parameters()):
                    p.grad += beta[i] * (p - p0)
            for m in names:
                for name, mod in model.encoders[m].named_modules():
                    if isinstance(mod, nn.Linear):
                        fim[m][name] += mod.weight.grad * mod.weight.grad
                        fim[m][name].detach_()
            self.opt.step()
        trace = 0
        for name in fim[names[0]]:
            trace += fim[names[0]][name].mean().item()
        self.audio_trace_list.append(trace)


def train_ours(model, method, opt, epochs, steps, start_epoch=0):
    betas = []
    for epoch in range(start_epoch, epochs):
        method.on_epoch_start(epoch)
        for step in range(steps):
            plain_step(model, method, opt, *batch(len(model.modalities), seed=100 * epoch + step))
            betas.append([method.statistics()[f"beta/{m}"] for m in model.modalities])
    method.on_epoch_start(epochs)  # closes the last epoch (records its trace)
    return betas


def run_both(m_total, base, threshold=0.05, epochs=3, steps=3, lr=0.05):
    ours = make_model(m_total)
    theirs = copy.deepcopy(ours)
    method = InfoReg(beta=base, threshold=threshold)
    opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    ref = OriginalTraining(theirs, base, threshold, lr)
    betas = train_ours(ours, method, opt, epochs, steps)
    for epoch in range(epochs):
        ref.epoch(epoch, [batch(m_total, seed=100 * epoch + s) for s in range(steps)])
    assert sum(betas, []) == pytest.approx(sum(ref.betas, []), rel=1e-9, abs=1e-12)
    for name, p in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], p, rtol=1e-9, atol=1e-11, msg=name)
    assert method._traces == pytest.approx(ref.audio_trace_list[10:], rel=1e-9)
    return ref


@pytest.mark.parametrize("m_total,base", [(2, [0.95, 0.1]), (3, [0.95, 0.1, 0.5])])
def test_matches_the_original_training_epochs(m_total, base):
    ref = run_both(m_total, base, lr=0.2)
    pulled = {i for row in ref.betas for i, b in enumerate(row) if b > 0}
    assert pulled  # the proximal pull acted


def test_window_closes_when_the_trace_stops_growing():
    ref = run_both(2, [0.95, 0.1], threshold=0.45, epochs=4, steps=2, lr=0.2)
    assert ref.k <= 0.45 and all(b == 0 for b in ref.betas[-1])  # closed in the last epoch


def test_state_round_trip_mid_epoch_continues_identically():
    def fresh_pair(seed):
        model, method = make_model(2, seed), InfoReg(beta=[0.95, 0.1])
        return model, method, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    model, method, opt = fresh_pair(0)
    train_ours(model, method, opt, epochs=1, steps=2)
    method.on_epoch_start(1)
    for step in range(2):  # half of epoch 1
        plain_step(model, method, opt, *batch(2, seed=50 + step))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})

    def finish(model, method, opt):
        for step in range(2, 4):
            plain_step(model, method, opt, *batch(2, seed=50 + step))
        train_ours(model, method, opt, epochs=3, steps=2, start_epoch=2)

    finish(model, method, opt)
    model2, method2, opt2 = fresh_pair(4)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    method2.load_state_dict(saved["method"])
    finish(model2, method2, opt2)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert method2._traces == method._traces


def test_adam_shapley_scores_and_errors():
    from _fusions import MLPFusion
    torch.manual_seed(0)
    model = MultimodalModel({m: nn.Sequential(nn.Linear(DIMS[m], WIDTH), nn.Tanh()) for m in "ab"},
                            MLPFusion({m: (WIDTH,) for m in "ab"}, C)).double()
    method = METHODS.create("inforeg", scores="auto")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert train_ours(model, method, opt, epochs=2, steps=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid beta"):
        InfoReg(beta=-1)
    with pytest.raises(ValueError, match="beta has 3 values"):
        InfoReg(beta=[1, 2, 3]).loss(make_model(2), *batch(2))
    with pytest.raises(ValueError, match="trace='z' names no modality"):
        InfoReg(trace="z").loss(make_model(2), *batch(2))
    early = MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion({"a": (5,), "b": (7,)}, C)).double()
    with pytest.raises(ValueError, match="InfoReg acts on each modality's encoder parameters"):
        InfoReg().loss(early, *batch(2))


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    assert_resume_exact(tmp_path, monkeypatch, {"name": "inforeg", "beta": [0.95, 0.1]})


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    assert_ddp_matches_single(tmp_path, {"name": "inforeg"}, ("score/a", "score/b", "beta/a", "beta/b"))
