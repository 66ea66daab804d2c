"""The paper's comparison methods: uni-modal, and modbal's own options of OGM-GE, MSLR and MSES
(validation, variants, resumption). Their default behaviour is compared with transcriptions of the
authors' code in tests/test_original_{ogm_ge,mslr,mses}.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from torch import nn

from modbal import METHODS
from modbal.fusions.concat import ConcatFusion
from modbal.fusions.sum import SumFusion
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


def smooth_coefficients(model, inputs, y, alpha):
    """modbal's "smooth" variant, k = 1 − tanh(α·relu(ρ − 1)), from the fusion's own heads."""
    with torch.no_grad():
        heads = model.fusion.mono_logits(model.encode(inputs))
    s = [float(F.softmax(heads[m], -1)[torch.arange(len(y)), y].sum()) for m in model.modalities]
    ks = []
    for i, si in enumerate(s):
        others = [sj for j, sj in enumerate(s) if j != i]
        ks.append(1 - math.tanh(alpha * max(si / (sum(others) / len(others)) - 1, 0.0)))
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
    (OGMGE, {"params": "x"}, "params"), (OGMGE, {"scores": "x"}, "scores"), (OGMGE, {"muting": "x"}, "muting"),
    (OGMGE, {"seed": -1}, "seed"),
    (MSLR, {"initial_factors": {"a": 0}}, "initial factor"), (MSLR, {"window": 0}, "window"),
    (MSLR, {"min_factor": 0}, "min_factor"), (MSLR, {"form": "x"}, "form"), (MSLR, {"scores": "x"}, "scores"),
    (MSLR, {"start_epoch": 2, "end_epoch": 1}, "window"),
    (MSES, {"patience": 0}, "patience"), (MSES, {"smoothing": 1.0}, "smoothing"),
    (MSES, {"min_delta": -1}, "min_delta"),
    (MSES, {"restore": "x"}, "restore"), (MSES, {"freeze": "x"}, "freeze"), (MSES, {"scores": "x"}, "scores"),
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


# -- OGM-GE: modbal's options -----------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_ogm_smooth_variant_and_all_parameters(fusion):
    """variant="smooth" (k = 1 − tanh(α·relu(ρ − 1))) with params="all": every encoder tensor of the
    dominant modality, biases included, gets exactly k × its joint gradient; the fusion none."""
    model = make_model(fusion)
    inputs, y = make_batch()
    alpha = 0.8
    reference = joint_grads(model, inputs, y)
    ks = smooth_coefficients(model, inputs, y, alpha)
    assert sum(k < 1 for k in ks) == 1 and sum(k == 1 for k in ks) == 1  # one dominant modality (M=2)
    method = OGMGE(alpha=alpha, ge=False, variant="smooth", params="all")
    loss = method.loss(model, inputs, y)
    assert torch.allclose(loss, F.cross_entropy(model(inputs), y))  # the loss is plain CE
    loss.backward()
    method.after_backward(model)
    for name, p in model.named_parameters():
        enc = encoder_of(name)
        k = 1.0 if enc is None else ks[model.modalities.index(enc)]
        torch.testing.assert_close(p.grad, k * reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_ogm_default_scales_weights_only():
    model = make_model("concat")
    inputs, y = make_batch()
    reference = joint_grads(model, inputs, y)
    method = OGMGE(alpha=1.0, ge=False)
    method.loss(model, inputs, y).backward()
    method.after_backward(model)
    k = {m: method.statistics()[f"coef/{m}"] for m in model.modalities}
    assert min(k.values()) < 1
    for name, p in model.named_parameters():
        enc = encoder_of(name)
        scale = k[enc] if enc is not None and p.dim() >= 2 else 1.0  # biases keep their gradient
        torch.testing.assert_close(p.grad, scale * reference[name], rtol=1e-5, atol=1e-7, msg=name)


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


def test_ogm_scores_options():
    inputs, y = make_batch()
    model = make_model("mlp")
    with pytest.raises(TypeError, match="has_mono_heads"):
        OGMGE(scores="heads").loss(model, inputs, y)
    # shapley on a fusion with heads: the Shapley mono outputs are scored, not the heads
    model = make_model("sum")
    method = OGMGE(alpha=1.0, ge=False, scores="shapley")
    method.loss(model, inputs, y)
    with torch.no_grad():
        mono = model(inputs, shapley="features").mono
    s_a = float(F.softmax(mono[0], -1)[torch.arange(len(y)), y].sum())
    assert method.statistics()["score/a"] == pytest.approx(s_a, rel=1e-6) and "mono_acc/a" in method.statistics()


# -- MSLR: the learning-rate form ----------------------------------------------------------------
def test_mslr_lr_form_follows_the_schedule_and_composes_with_steplr():
    """form="lr": the encoder groups' rates are base · λ inside the window and base outside, with λ
    from the same schedule as the gradient form (here k = 3, window [1, 6))."""
    model = make_model("concat")
    f0 = {"a": 1.3, "b": 0.7}
    k, base, gamma = 3, 0.1, 0.5
    method = MSLR(initial_factors=f0, window=k, start_epoch=1, end_epoch=6, form="lr")
    assert method.rescales_learning_rates and not MSLR().rescales_learning_rates
    opt = torch.optim.SGD(method.param_groups(model), lr=base, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    method.setup(model, opt)
    method.setup(model, opt)  # idempotent
    lrs = lambda: {g.get("modality", "fusion"): g["lr"] for g in opt.param_groups}  # noqa: E731
    assert lrs() == pytest.approx({"a": base, "b": base, "fusion": base})  # epoch 0: outside the window
    accs = {"a": [0.5, 0.6, 0.62, 0.55, 0.7, 0.71, 0.8], "b": [0.3, 0.3, 0.45, 0.5, 0.52, 0.4, 0.6]}
    ratios = {"a": 1.0, "b": 1.0}
    saved = None
    for t in range(len(accs["a"])):
        method.on_epoch_start(t)
        opt.step()
        sched.step()
        method.on_epoch_end(t, {"acc": 0.0, **{f"head_acc/{m}": accs[m][t] for m in accs}}, model, opt)
        for m in accs:  # the AGM code's schedule
            if t >= k:
                ratios[m] = accs[m][t] / (sum(accs[m][t - k:t]) / k)
        schedule = base * gamma ** (t + 1)
        for m in accs:
            expected = f0[m] * ratios[m] if 1 <= t + 1 < 6 else 1.0  # the factor for epoch t + 1
            assert lrs()[m] == pytest.approx(schedule * expected, rel=1e-12), (t, m)
        assert lrs()["fusion"] == pytest.approx(schedule, rel=1e-12)
        if t == 3:
            saved = (method.state_dict(), opt.state_dict(), lrs())
    # resume: fresh method and optimizer; setup before optimizer.load_state_dict
    fresh = MSLR(initial_factors=f0, window=k, start_epoch=1, end_epoch=6, form="lr")
    fresh.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(fresh.param_groups(model), lr=base, momentum=0.9)
    fresh.setup(model, opt2)
    opt2.load_state_dict(saved[1])
    fresh.setup(model, opt2)
    assert {g.get("modality", "fusion"): g["lr"] for g in opt2.param_groups} == pytest.approx(saved[2])
    with pytest.raises(KeyError, match="head_acc/a"):
        fresh.on_epoch_end(3, {"acc": 1.0}, model, opt2)


def test_mslr_floor_zero_accuracy_and_metric_choice():
    from modbal.methods.mslr import mslr_factor, mslr_update
    assert mslr_update([0.0, 0.0], 0.5, 2) == (1.0, [0.0, 0.5])  # mean 0: ratio 1 (λ⁰)
    assert mslr_update([0.2], 0.4, 2) == (1.0, [0.2, 0.4])  # the memory is still filling
    assert mslr_factor(1.0, 0.0, 1e-3) == 1e-3
    method = MSLR(scores="auto")
    model = make_model("mlp")  # no heads: the Shapley mono-modal accuracy is read
    with pytest.raises(KeyError, match="mono_acc/a"):
        method.on_epoch_end(0, {"head_acc/a": 0.5, "head_acc/b": 0.5}, model, None)


# -- MSES: modbal's options (encoder restore, real freezing) ------------------------------------
def _train_steps(model, opt, method, inputs, y, n=2):
    for _ in range(n):
        opt.zero_grad()
        method.loss(model, inputs, y).backward()
        method.after_backward(model)
        opt.step()


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_mses_remove_freezes_exactly_the_stalled_encoder(optim):
    """restore="encoder", freeze="remove": the stopped encoder gets its best-epoch weights back and
    never moves again (out of the optimizer: no momentum, no weight decay), the rest trains on."""
    mods = ("a", "b", "c")
    model = make_model("mlp", mods)
    inputs, y = make_batch(mods)
    method = MSES(patience=2, restore="encoder", freeze="remove")
    assert method.freezes_parameters and not MSES().freezes_parameters
    groups = method.param_groups(model)
    if optim == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.05)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05)
    method.setup(model, opt)
    # a: raw losses with the 2-tap minimum at epoch 1, then stalling; b and c keep improving
    losses = {"a": [1.0, 0.6, 1.4, 1.5, 1.5], "b": [1.0, 0.9, 0.8, 0.7, 0.6], "c": [2.0, 1.9, 1.8, 1.7, 1.6]}
    snapshots = []
    for t in range(5):
        _train_steps(model, opt, method, inputs, y)
        snapshots.append(copy.deepcopy(model.encoders["a"].state_dict()))
        method.on_epoch_end(t, {f"mono_loss/{m}": losses[m][t] for m in mods}, model, opt)
        if method.stopped:
            break
    # smoothed a: 1.0, 0.76, 1.08, 1.46: best epoch 1; stopped when t − 1 > 2
    assert method.best_epochs()["a"] == 1 and method.stopped == {"a"} and t == 4 and not method.should_stop
    frozen = model.encoders["a"].state_dict()
    for key, value in frozen.items():
        assert torch.equal(value, snapshots[1][key]), key
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


def test_mses_remove_resume_refreezes_and_should_stop():
    model = make_model("concat")
    inputs, y = make_batch()
    method = MSES(patience=1, restore="encoder", freeze="remove")
    opt = torch.optim.SGD(method.param_groups(model), lr=0.05, momentum=0.9, weight_decay=0.1)
    method.setup(model, opt)
    for t, (la, lb) in enumerate([(1.0, 1.0), (2.0, 0.5), (2.0, 0.4), (2.0, 0.3)]):
        _train_steps(model, opt, method, inputs, y)
        method.on_epoch_end(t, {"head_loss/a": la, "head_loss/b": lb}, model, opt)
    assert method.stopped == {"a"}
    saved_model, saved_method, saved_opt = (copy.deepcopy(model.state_dict()), method.state_dict(),
                                            copy.deepcopy(opt.state_dict()))
    # fresh model + optimizer built before the method state is loaded (the runner loads the state
    # first; tests/test_resume.py covers that order end to end)
    model2 = make_model("concat", seed=99)
    model2.load_state_dict(saved_model)
    fresh = MSES(patience=1, restore="encoder", freeze="remove")
    opt2 = torch.optim.SGD(fresh.param_groups(model2), lr=0.05, momentum=0.9, weight_decay=0.1)
    fresh.load_state_dict(saved_method)
    fresh.setup(model2, opt2)
    opt2.load_state_dict(saved_opt)
    assert all(not p.requires_grad for p in model2.encoders["a"].parameters())
    frozen = copy.deepcopy(model2.encoders["a"].state_dict())
    _train_steps(model2, opt2, fresh, inputs, y, n=3)
    assert all(torch.equal(v, frozen[k]) for k, v in model2.encoders["a"].state_dict().items())
    fresh.on_epoch_end(4, {"head_loss/b": 1.0}, model2, opt2)
    fresh.on_epoch_end(5, {"head_loss/b": 1.0}, model2, opt2)
    assert fresh.should_stop and fresh.stopped == {"a", "b"}
    assert fresh.state_dict()["snapshots"] == {}  # nothing kept once every modality has stopped


def test_ogm_warns_under_adaptive_optimizer_and_base_hooks_are_noops():
    model = make_model("concat")
    with pytest.warns(UserWarning, match="RMS"):
        OGMGE().setup(model, torch.optim.Adam(model.parameters()))
    with pytest.warns(UserWarning, match="RMS"):
        MSLR().setup(model, torch.optim.Adam(model.parameters()))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OGMGE().setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        lr_form = MSLR(form="lr")
        lr_form.setup(model, torch.optim.Adam(lr_form.param_groups(model)))  # acts under Adam: no warning
    joint = METHODS.create("joint")
    inputs, _ = make_batch()
    assert joint.prepare_inputs(inputs) is inputs
    joint.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
