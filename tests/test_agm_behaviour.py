"""AGM's options, state, errors and the direction of κ on the synthetic task."""
import copy
import math

import pytest
import torch
from torch import nn

from modbal import AGM, DATASETS, MultimodalModel
from modbal.build import build_model
from modbal.fusions import ConcatFusion


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MultimodalModel({"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)}, ConcatFusion({"a": (4,), "b": (4,)}, 3))


def tiny_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return ({"a": torch.randn(8, 3, generator=g), "b": torch.randn(8, 5, generator=g)},
            torch.randint(3, (8,), generator=g))


def kappas(method, model):
    return [method.statistics()[f"kappa/{m}"] for m in model.modalities]


def test_state_dict_resumes_the_same_kappa_sequence():
    model, agm = tiny_model(), AGM(alpha=2.0)
    for step in range(4):
        agm.loss(model, *tiny_batch(step))
    resumed = AGM(alpha=2.0)
    resumed.load_state_dict(copy.deepcopy(agm.state_dict()))
    for step in range(4, 7):
        agm.loss(model, *tiny_batch(step))
        resumed.loss(model, *tiny_batch(step))
        assert kappas(agm, model) == kappas(resumed, model)
    with pytest.raises(ValueError, match="keys"):
        AGM().load_state_dict({"count": 1})


def test_first_step_reference_is_one_and_running_average_is_cumulative():
    model, agm = tiny_model(), AGM(alpha=1.0)
    scores = []
    for step in range(3):
        agm.loss(model, *tiny_batch(step))
        stats = agm.statistics()
        if step == 0:
            assert stats["tau/a"] == stats["tau/b"] == 1.0
        else:
            mean_a = sum(s[0] for s in scores) / len(scores)
            mean_b = sum(s[1] for s in scores) / len(scores)
            assert stats["tau/a"] == pytest.approx(torch.exp(torch.tensor(mean_b - mean_a, dtype=torch.float64)).item())
        scores.append((stats["s/a"], stats["s/b"]))


def test_window_hold_last_and_bounds():
    model = tiny_model()
    plain = AGM(alpha=3.0, start_epoch=1, end_epoch=2)
    held = AGM(alpha=3.0, start_epoch=0, end_epoch=1, hold_last=True)
    bounded = AGM(alpha=50.0, kappa_min=0.5, kappa_max=2.0)
    for epoch in range(3):
        for method in (plain, held, bounded):
            method.on_epoch_start(epoch)
        for step in range(2):
            data = tiny_batch(10 * epoch + step)
            plain.loss(model, *data)
            held.loss(model, *data)
            bounded.loss(model, *data)
            assert (kappas(plain, model) == [1.0, 1.0]) == (epoch != 1)
            assert all(0.5 <= k <= 2.0 for k in kappas(bounded, model))
        if epoch == 0:
            last = kappas(held, model)
        else:
            assert kappas(held, model) == last
    assert any(k in (0.5, 2.0) for k in kappas(bounded, model))


def test_cap_limits_the_exponent():
    model = tiny_model()
    agm = AGM(alpha=100.0, cap=0.01)
    for step in range(3):
        agm.loss(model, *tiny_batch(step))
        assert all(k <= math.e * (1 + 1e-9) for k in kappas(agm, model))


def test_exploding_kappa_stops_with_a_message_naming_the_modality():
    model, agm = tiny_model(), AGM(alpha=1e5)
    with pytest.raises(FloatingPointError, match=r"non-finite statistics for modality '(a|b)'.*kappa=inf"):
        for step in range(5):
            agm.loss(model, *tiny_batch(step))


def test_non_finite_gradient_stops_before_the_step():
    model, agm = tiny_model(), AGM(alpha=1.0)
    agm.loss(model, *tiny_batch(0)).backward()
    model.encoders["b"].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="encoders.b.weight"):
        agm.after_backward(model)


def test_clipping_bounds_the_total_gradient_norm():
    model, agm = tiny_model(), AGM(alpha=1.0, clip_grad_norm=1e-3)
    agm.loss(model, *tiny_batch(0)).backward()
    agm.after_backward(model)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert total <= 1e-3 * 1.0001


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -1}, "alpha"), ({"reference": "median"}, "allowed values: cumulative, ema, fixed"),
    ({"momentum": 1.0}, "momentum"), ({"start_epoch": 3, "end_epoch": 2}, "window"),
    ({"kappa_min": 3, "kappa_max": 2}, "kappa bounds"), ({"muting": "noise"}, "muting"),
    ({"clip_grad_norm": 0}, "clip_grad_norm"),
])
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AGM(**kwargs)


def test_model_protocol_errors():
    model = tiny_model()
    inputs, _ = tiny_batch(0)
    with pytest.raises(KeyError, match=r"missing \['b'\]"):
        model({"a": inputs["a"]})
    with pytest.raises(ValueError, match="batch size"):
        model({"a": inputs["a"], "b": inputs["b"][:3]})
    with pytest.raises(ValueError, match="allowed values: features, inputs"):
        model(inputs, shapley="noise")
    with pytest.raises(ValueError, match="2 to 8 modalities"):
        MultimodalModel({"a": nn.Identity()}, nn.Identity())


def test_kappa_slows_the_modality_ahead_of_its_history_on_the_synthetic_task():
    """The fast modality outpaces its running average early on: κ < 1 for it, κ > 1 for the slow one.

    Which modality is ahead is decided here from the logged scores alone (s_m against its own
    cumulative mean), so a flipped sign in κ would fail this test.
    """
    data = DATASETS.create("synthetic", num_train=1024, num_val=10, num_test=10, seed=0)
    torch.manual_seed(0)
    model = build_model(data.input_shapes, 10,
                        {m: {"name": "mlp", "hidden": [32], "out_dim": 16} for m in data.modalities},
                        {"name": "concat"})
    agm = AGM(alpha=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    history = {m: [] for m in model.modalities}
    agreements, decided = 0, 0
    kappa_log = []
    for inputs, targets in loader:
        loss = agm.loss(model, inputs, targets)
        stats = agm.statistics()
        if all(history.values()):
            ahead = {m: sum(history[m]) / len(history[m]) - stats[f"s/{m}"] for m in model.modalities}
            leader = max(ahead, key=ahead.get)
            lagger = min(ahead, key=ahead.get)
            if ahead[leader] - ahead[lagger] > 0.05:
                decided += 1
                agreements += stats[f"kappa/{leader}"] < 1 < stats[f"kappa/{lagger}"]
        for m in model.modalities:
            history[m].append(stats[f"s/{m}"])
        kappa_log.append((stats["kappa/fast"], stats["kappa/slow"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert decided >= 5
    assert agreements == decided
    later = kappa_log[4:]  # the fast cue pulls ahead within the first epoch
    assert sum(k[0] for k in later) / len(later) < 1 < sum(k[1] for k in later) / len(later)


@pytest.mark.parametrize("muting", ["features", "inputs"])
def test_eight_modalities(muting):
    torch.manual_seed(0)
    names = [f"m{i}" for i in range(8)]
    model = MultimodalModel({m: nn.Linear(2, 3) for m in names}, ConcatFusion({m: (3,) for m in names}, 4))
    inputs = {m: torch.randn(5, 2) for m in names}
    targets = torch.randint(4, (5,))
    out = model(inputs, shapley=muting)
    assert out.coalitions.shape == (256, 5, 4) and out.mono.shape == (8, 5, 4)
    torch.testing.assert_close(out.mono.sum(0), out.logits, atol=1e-5, rtol=0)
    agm = AGM(alpha=1.0, muting=muting)
    agm.loss(model, inputs, targets).backward()
    assert all(model.encoders[m].weight.grad is not None for m in names)
    assert len([k for k in agm.statistics() if k.startswith("kappa/")]) == 8
