"""The paper's comparison methods: uni-modal, OGM-GE, MSLR, MSES."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from torch import nn

from modbal import METHODS
from modbal.fusions.base import Fusion
from modbal.fusions.concat import ConcatFusion
from modbal.methods import MSES, MSLR, OGMGE, UniModal
from modbal.model import MultimodalModel


# -- tiny parts, independent of the other helpers' fusions ---------------------------------------
class Enc(nn.Module):
    def __init__(self, d_in: int, d_out: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out), nn.Tanh())
        self.out_shape = (d_out,)

    def forward(self, x):
        return self.net(x)


class SumFusion(Fusion):
    """One linear head per modality, logits summed; exposes the heads as ``mono_logits``."""

    def __init__(self, feature_shapes, num_classes):
        super().__init__(feature_shapes, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(s[0], num_classes) for m, s in self.feature_shapes.items()})

    def mono_logits(self, features):
        return {m: self.heads[m](features[m]) for m in self.modalities}

    def forward(self, features):
        return sum(self.mono_logits(features).values())


FUSION_CLASSES = {"concat": ConcatFusion, "sum": SumFusion, "mlp": MLPFusion}
DIMS = {"a": 6, "b": 5, "c": 4}
C = 4


def make_model(fusion: str = "concat", modalities=("a", "b"), seed: int = 0, hidden: int = 16, d_out: int = 8):
    torch.manual_seed(seed)
    encoders = {m: Enc(DIMS[m], d_out=d_out, hidden=hidden) for m in modalities}
    fusion_mod = FUSION_CLASSES[fusion]({m: (d_out,) for m in modalities}, C)
    return MultimodalModel(encoders, fusion_mod)


def make_batch(modalities=("a", "b"), batch: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (batch,), generator=g)
    inputs = {}
    for i, m in enumerate(modalities):
        x = torch.randn(batch, DIMS[m], generator=g)
        x[:, 0] += (2.0 - i) * y.float()  # modality a most informative: a clear dominant modality
        inputs[m] = x
    return inputs, y


def joint_grads(model, inputs, y):
    model = copy.deepcopy(model)
    model.zero_grad()
    F.cross_entropy(model(inputs), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def reference_coefficients(model, inputs, y, alpha, variant="paper"):
    """OGM-GE factors computed independently of modbal.methods.ogm_ge."""
    with torch.no_grad():
        mono = model(inputs, shapley="features").mono
    s = [float(F.softmax(mono[i], -1)[torch.arange(len(y)), y].sum()) for i in range(mono.shape[0])]
    ks = []
    for i, si in enumerate(s):
        others = [sj for j, sj in enumerate(s) if j != i]
        rho = si / (sum(others) / len(others))
        if variant == "paper":
            ks.append(1 - math.tanh(alpha * max(rho - 1, 0.0)))
        else:
            ks.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
    return ks


def encoder_of(name: str) -> str | None:
    return name.split(".")[1] if name.startswith("encoders.") else None


# -- registry and validation -------------------------------------------------------------------
def test_registered_by_name():
    assert isinstance(METHODS.create("unimodal", modality="a"), UniModal)
    assert isinstance(METHODS.create("ogm_ge", alpha=0.3), OGMGE)
    assert isinstance(METHODS.create("mslr", initial_factors={"a": 1.3}), MSLR)
    assert isinstance(METHODS.create("mses", patience=3), MSES)


@pytest.mark.parametrize("factory, kwargs, match", [
    (OGMGE, {"alpha": 0}, "alpha"), (OGMGE, {"alpha": float("nan")}, "alpha"),
    (OGMGE, {"variant": "x"}, "variant"), (OGMGE, {"start_epoch": 3, "end_epoch": 3}, "window"),
    (OGMGE, {"scores": "x"}, "scores"), (OGMGE, {"muting": "x"}, "muting"), (OGMGE, {"seed": -1}, "seed"),
    (MSLR, {"initial_factors": {"a": 0}}, "initial factor"), (MSLR, {"window": 0}, "window"),
    (MSLR, {"min_factor": 0}, "min_factor"), (MSES, {"patience": 0}, "patience"),
    (MSES, {"smoothing": 1.0}, "smoothing"), (MSES, {"min_delta": -1}, "min_delta"),
    (UniModal, {"modality": ""}, "modality"),
])
def test_invalid_arguments(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


# -- uni-modal ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum", "mlp"])
def test_unimodal_gradients_reach_only_trained_encoder_and_fusion(fusion):
    model = make_model(fusion, ("a", "b", "c"))
    inputs, y = make_batch(("a", "b", "c"))
    method = UniModal("b")
    muted = method.prepare_inputs(inputs)
    assert torch.equal(muted["b"], inputs["b"]) and not muted["a"].any() and not muted["c"].any()
    method.loss(model, inputs, y).backward()
    method.after_backward(model)
    for name, p in model.named_parameters():
        enc = encoder_of(name)
        if enc in ("a", "c"):
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for p in model.encoders["b"].parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    grouped = {id(p) for g in method.param_groups(model) for p in g["params"]}
    assert grouped == {id(p) for n, p in model.named_parameters() if encoder_of(n) not in ("a", "c")}


def test_unimodal_muted_encoders_never_move_even_in_a_full_optimizer():
    model = make_model("concat")
    inputs, y = make_batch()
    before = copy.deepcopy(model.encoders["a"].state_dict())
    method = UniModal("b")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        method.loss(model, inputs, y).backward()
        method.after_backward(model)
        opt.step()
    for k, v in model.encoders["a"].state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="not one of the model's modalities"):
        UniModal("z").loss(model, inputs, y)


# -- OGM-GE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum", "mlp"])
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_ogm_scales_only_dominant_encoder_by_exact_factor(fusion, variant):
    model = make_model(fusion)
    inputs, y = make_batch()
    alpha = 0.8
    reference = joint_grads(model, inputs, y)
    ks = reference_coefficients(model, inputs, y, alpha, variant)
    assert sum(k < 1 for k in ks) == 1 and sum(k == 1 for k in ks) == 1  # one dominant modality (M=2)
    method = OGMGE(alpha=alpha, ge=False, variant=variant)
    loss = method.loss(model, inputs, y)
    assert torch.allclose(loss, F.cross_entropy(model(inputs), y))  # the loss is plain CE
    loss.backward()
    method.after_backward(model)
    for name, p in model.named_parameters():
        enc = encoder_of(name)
        k = 1.0 if enc is None else ks[model.modalities.index(enc)]
        torch.testing.assert_close(p.grad, k * reference[name], rtol=1e-5, atol=1e-7, msg=name)
    stats = method.statistics()
    assert stats["coef/a"] == pytest.approx(ks[0], rel=1e-6) and stats["coef/b"] == pytest.approx(ks[1], rel=1e-6)


def test_ogm_three_modalities_ratio_to_mean_of_others():
    mods = ("a", "b", "c")
    model = make_model("mlp", mods)
    inputs, y = make_batch(mods)
    reference = joint_grads(model, inputs, y)
    ks = reference_coefficients(model, inputs, y, 1.0)
    method = OGMGE(alpha=1.0, ge=False)
    method.loss(model, inputs, y).backward()
    method.after_backward(model)
    for name, p in model.named_parameters():
        enc = encoder_of(name)
        k = 1.0 if enc is None else ks[mods.index(enc)]
        torch.testing.assert_close(p.grad, k * reference[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fusion", ["concat", "sum", "mlp"])
def test_ogm_ge_noise_has_gradient_std(fusion):
    model = make_model(fusion, hidden=256, d_out=128)  # encoders' second weight: 32k elements
    inputs, y = make_batch(batch=64)
    reference = joint_grads(model, inputs, y)
    ks = reference_coefficients(model, inputs, y, 0.5)
    torch.manual_seed(123)
    method = OGMGE(alpha=0.5, ge=True)
    method.loss(model, inputs, y).backward()
    method.after_backward(model)
    checked = 0
    for name, p in model.named_parameters():
        enc = encoder_of(name)
        if enc is None:
            assert torch.equal(p.grad, reference[name])  # fusion: no scaling, no noise
            continue
        k = ks[model.modalities.index(enc)]
        noise = p.grad - k * reference[name]
        if p.numel() >= 20000:
            g_std = float(reference[name].std())
            assert float(noise.std()) == pytest.approx(g_std, rel=0.03), name
            assert abs(float(noise.mean())) < 0.03 * g_std, name
            checked += 1
        elif p.numel() >= 100:
            assert float(noise.std()) == pytest.approx(float(reference[name].std()), rel=0.3), name
    assert checked == 2  # the 256×128 weight matrix of each encoder


def test_ogm_noise_reproducible_and_resumable():
    model = make_model("concat")
    inputs, y = make_batch()

    def grads_after(method, m):
        m.zero_grad()
        method.loss(m, inputs, y).backward()
        method.after_backward(m)
        return [p.grad.clone() for p in m.encoders.parameters()]

    a, b = OGMGE(seed=7), OGMGE(seed=7)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    for _ in range(2):
        assert all(torch.equal(u, v) for u, v in zip(grads_after(a, m1), grads_after(b, m2)))
    saved = a.state_dict()
    expected = grads_after(a, m1)
    resumed = OGMGE(seed=7)
    resumed.load_state_dict(saved)
    assert all(torch.equal(u, v) for u, v in zip(expected, grads_after(resumed, m2)))
    # seed None: taken from the global seed, so torch.manual_seed makes runs reproducible
    torch.manual_seed(5)
    g1 = grads_after(OGMGE(), copy.deepcopy(model))
    torch.manual_seed(5)
    g2 = grads_after(OGMGE(), copy.deepcopy(model))
    assert all(torch.equal(u, v) for u, v in zip(g1, g2))


def test_ogm_window_and_heads_scores():
    model = make_model("sum")
    inputs, y = make_batch()
    reference = joint_grads(model, inputs, y)
    method = OGMGE(alpha=1.0, start_epoch=2, end_epoch=4)
    for epoch, inside in [(0, False), (2, True), (4, False)]:
        method.on_epoch_start(epoch)
        model.zero_grad()
        method.loss(model, inputs, y).backward()
        method.after_backward(model)
        same = all(torch.equal(p.grad, reference[n]) for n, p in model.named_parameters())
        assert same != inside
    # heads: scores from the fusion's per-modality heads
    heads = OGMGE(alpha=1.0, ge=False, scores="heads")
    heads.loss(model, inputs, y)
    with torch.no_grad():
        logits = model.fusion.mono_logits(model.encode(inputs))
    s = {m: float(F.softmax(logits[m], -1)[torch.arange(len(y)), y].sum()) for m in model.modalities}
    assert heads.statistics()["score/a"] == pytest.approx(s["a"], rel=1e-5)
    assert heads.statistics()["ratio/b"] == pytest.approx(s["b"] / s["a"], rel=1e-5)
    with pytest.raises(TypeError, match="mono_logits"):
        OGMGE(scores="heads").loss(make_model("concat"), inputs, y)


# -- MSLR ----------------------------------------------------------------------------------------
def test_mslr_learning_rates_follow_formula_and_compose_with_steplr():
    model = make_model("concat")
    f0 = {"a": 1.3, "b": 0.7}
    k, base, gamma = 3, 0.1, 0.5
    method = MSLR(initial_factors=f0, window=k)
    opt = torch.optim.SGD(method.param_groups(model), lr=base, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    method.setup(model, opt)
    method.setup(model, opt)  # idempotent
    lrs = lambda: {g.get("modality", "fusion"): g["lr"] for g in opt.param_groups}  # noqa: E731
    assert lrs() == pytest.approx({"a": 0.13, "b": 0.07, "fusion": 0.1})
    accs = {"a": [0.5, 0.6, 0.62, 0.55, 0.7, 0.71], "b": [0.3, 0.3, 0.45, 0.5, 0.52, 0.4]}
    saved = None
    for t in range(len(accs["a"])):
        opt.step()
        sched.step()
        metrics = {"acc": 0.0, **{f"mono_acc/{m}": accs[m][t] for m in accs}}
        method.on_epoch_end(t, metrics, model, opt)
        schedule = base * gamma ** (t + 1)
        for m in accs:
            recent = accs[m][max(0, t - k + 1): t + 1]
            expected = f0[m] * accs[m][t] / (sum(recent) / len(recent))
            assert lrs()[m] == pytest.approx(schedule * expected, rel=1e-12)
            assert method.statistics()[f"lr_factor/{m}"] == pytest.approx(expected, rel=1e-12)
        assert lrs()["fusion"] == pytest.approx(schedule, rel=1e-12)
        if t == 2:
            saved = (method.state_dict(), opt.state_dict(), sched.state_dict(), lrs())
    # resume: fresh method and optimizer; setup before optimizer.load_state_dict
    fresh = MSLR(initial_factors=f0, window=k)
    fresh.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(fresh.param_groups(model), lr=base, momentum=0.9)
    fresh.setup(model, opt2)
    opt2.load_state_dict(saved[1])
    fresh.setup(model, opt2)
    assert {g.get("modality", "fusion"): g["lr"] for g in opt2.param_groups} == pytest.approx(saved[3])
    with pytest.raises(KeyError, match="mono_acc/a"):
        fresh.on_epoch_end(3, {"acc": 1.0}, model, opt2)


def test_mslr_floor_and_zero_accuracy():
    from modbal.methods.mslr import mslr_factor
    assert mslr_factor(1.3, [0.0, 0.0], 5, 1e-3) == 1.3
    assert mslr_factor(1.0, [0.5, 0.0], 5, 1e-3) == 1e-3
    assert mslr_factor(0.7, [0.2, 0.4, 0.6], 2, 1e-3) == pytest.approx(0.7 * 0.6 / 0.5)


# -- MSES ----------------------------------------------------------------------------------------
def _train_steps(model, opt, method, inputs, y, n=2):
    for _ in range(n):
        opt.zero_grad()
        method.loss(model, inputs, y).backward()
        method.after_backward(model)
        opt.step()


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_mses_freezes_exactly_the_stalled_encoder(optim):
    mods = ("a", "b", "c")
    model = make_model("mlp", mods)
    inputs, y = make_batch(mods)
    method = MSES(patience=2)
    groups = method.param_groups(model)
    if optim == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.05)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05)
    method.setup(model, opt)
    # a: best smoothed loss at epoch 1, then stalls; b and c keep improving
    losses = {"a": [1.0, 0.6, 1.4, 1.5, 1.5], "b": [1.0, 0.9, 0.8, 0.7, 0.6], "c": [2.0, 1.9, 1.8, 1.7, 1.6]}
    smoothed, best, best_epoch, snapshots = {}, {}, {}, []
    for t in range(5):
        _train_steps(model, opt, method, inputs, y)
        snapshots.append(copy.deepcopy(model.encoders["a"].state_dict()))
        method.on_epoch_end(t, {f"mono_loss/{m}": losses[m][t] for m in mods}, model, opt)
        for m in mods:  # the reference computation
            smoothed[m] = losses[m][t] if t == 0 else 0.6 * smoothed[m] + 0.4 * losses[m][t]
            if m not in best or smoothed[m] < best[m]:
                best[m], best_epoch[m] = smoothed[m], t
        if method.stopped:
            break
    assert best_epoch["a"] == 1 and method.stopped == {"a"} and t == 3 and not method.should_stop
    frozen = model.encoders["a"].state_dict()
    for key, value in frozen.items():
        assert torch.equal(value, snapshots[best_epoch["a"]][key]), key
    a_params = list(model.encoders["a"].parameters())
    assert all(not p.requires_grad for p in a_params)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in a_params) and not any(p in opt.state for p in a_params)
    frozen = copy.deepcopy(frozen)
    others = {m: copy.deepcopy(model.encoders[m].state_dict()) for m in ("b", "c")}
    fusion = copy.deepcopy(model.fusion.state_dict())
    for _ in range(4):
        _train_steps(model, opt, method, inputs, y)
        for key, value in model.encoders["a"].state_dict().items():
            assert torch.equal(value, frozen[key]), key
    for m in ("b", "c"):
        assert any(not torch.equal(v, others[m][k]) for k, v in model.encoders[m].state_dict().items())
    assert any(not torch.equal(v, fusion[k]) for k, v in model.fusion.state_dict().items())


def test_mses_resume_refreezes_and_should_stop():
    model = make_model("concat")
    inputs, y = make_batch()
    method = MSES(patience=1)
    opt = torch.optim.SGD(method.param_groups(model), lr=0.05, momentum=0.9, weight_decay=0.1)
    method.setup(model, opt)
    for t, (la, lb) in enumerate([(1.0, 1.0), (2.0, 0.5), (2.0, 0.4)]):
        _train_steps(model, opt, method, inputs, y)
        method.on_epoch_end(t, {"mono_loss/a": la, "mono_loss/b": lb}, model, opt)
    assert method.stopped == {"a"}
    saved_model, saved_method, saved_opt = (copy.deepcopy(model.state_dict()), method.state_dict(),
                                            copy.deepcopy(opt.state_dict()))
    # fresh model + optimizer built before the method state is loaded (the runner loads the state
    # first; tests/test_resume.py covers that order end to end)
    model2 = make_model("concat", seed=99)
    model2.load_state_dict(saved_model)
    fresh = MSES(patience=1)
    opt2 = torch.optim.SGD(fresh.param_groups(model2), lr=0.05, momentum=0.9, weight_decay=0.1)
    fresh.load_state_dict(saved_method)
    fresh.setup(model2, opt2)
    opt2.load_state_dict(saved_opt)
    assert all(not p.requires_grad for p in model2.encoders["a"].parameters())
    frozen = copy.deepcopy(model2.encoders["a"].state_dict())
    _train_steps(model2, opt2, fresh, inputs, y, n=3)
    assert all(torch.equal(v, frozen[k]) for k, v in model2.encoders["a"].state_dict().items())
    fresh.on_epoch_end(3, {"mono_loss/b": 1.0}, model2, opt2)
    assert fresh.should_stop and fresh.stopped == {"a", "b"}
    assert torch.equal(fresh.state_dict()["best_state"]["a"]["net.0.weight"],
                       saved_method["best_state"]["a"]["net.0.weight"])


def test_ogm_warns_under_adaptive_optimizer_and_base_hooks_are_noops():
    model = make_model("concat")
    with pytest.warns(UserWarning, match="RMS"):
        OGMGE().setup(model, torch.optim.Adam(model.parameters()))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OGMGE().setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    joint = METHODS.create("joint")
    inputs, _ = make_batch()
    assert joint.prepare_inputs(inputs) is inputs
    joint.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
