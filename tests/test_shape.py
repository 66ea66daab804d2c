"""SHAPE contributions: games with known Shapley values and a model that ignores a modality."""
import itertools

import pytest
import torch
from torch import nn

from modbal.fusions.base import Fusion
from modbal.metrics.shape import coalition_accuracies, model_shape_scores, shape_scores
from modbal.model import MultimodalModel


def _game(fn, m):
    return [fn({i for i in range(m) if mask >> i & 1}) for mask in range(1 << m)]


def test_additive_game_gives_own_values_and_no_cooperation():
    own = [0.2, 0.5, 0.1]
    res = shape_scores(_game(lambda s: 0.05 + sum(own[i] for i in s), 3), ["a", "b", "c"])
    for name, v in zip("abc", own):
        assert res["shapley"][name] == pytest.approx(v)
    assert res["cooperation"] == pytest.approx(0.0, abs=1e-12)  # no interaction, whatever v(∅) is
    assert res["coalitions"]["∅"] == pytest.approx(0.05)
    assert res["coalitions"]["a+c"] == pytest.approx(0.35)


def test_symmetric_game_splits_equally():
    # v(S) depends on |S| only: every modality gets (v(all) − v(∅)) / M
    sizes = [0.1, 0.3, 0.8]
    res = shape_scores(_game(lambda s: sizes[len(s)], 2), ["x", "y"])
    assert res["shapley"] == pytest.approx({"x": 0.35, "y": 0.35})
    assert res["cooperation"] == pytest.approx(0.3)  # 0.8 − 0.1 − 2·(0.3 − 0.1)


def test_glove_game_and_efficiency():
    # v = 1 only when both a and b are present (pure cooperation); c is a dummy
    res = shape_scores(_game(lambda s: float({0, 1} <= s), 3), ["a", "b", "c"])
    assert res["shapley"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})
    assert res["cooperation"] == pytest.approx(1.0)
    assert sum(res["shapley"].values()) == pytest.approx(res["full"] - res["empty"])


def test_cooperation_is_measured_from_the_empty_coalition():
    # chance-level v(∅) = 0.1; by hand: v(all) − v(∅) − Σ_m (v({m}) − v(∅)) = 0.55 − 0.1 − (0.3 + 0.2) = −0.05
    values = {(): 0.1, ("a",): 0.4, ("b",): 0.3, ("a", "b"): 0.55}
    res = shape_scores([values[()], values[("a",)], values[("b",)], values[("a", "b")]], ["a", "b"])
    assert res["cooperation"] == pytest.approx(-0.05)
    # M = 3 with v(∅) = 0.25: 0.95 − 0.25 − (0.15 + 0.05 + 0.0) = 0.5
    v3 = {0: 0.25, 1: 0.4, 2: 0.3, 4: 0.25, 3: 0.6, 5: 0.5, 6: 0.45, 7: 0.95}
    assert shape_scores([v3[k] for k in range(8)], ["a", "b", "c"])["cooperation"] == pytest.approx(0.5)


def test_permutation_definition_on_random_game():
    torch.manual_seed(0)
    values = torch.rand(8)
    res = shape_scores(values, ["a", "b", "c"])
    for i, name in enumerate("abc"):
        total = 0.0
        perms = list(itertools.permutations(range(3)))
        for perm in perms:
            before = sum(1 << j for j in perm[:perm.index(i)])
            total += float(values[before | 1 << i] - values[before])
        assert res["shapley"][name] == pytest.approx(total / len(perms))


def test_wrong_number_of_values():
    with pytest.raises(ValueError, match="expected 4"):
        shape_scores([0.1, 0.2, 0.3], ["a", "b"])


class OnlyA(Fusion):
    """Logits from modality a alone; b is ignored by the fusion."""

    def __init__(self, feature_shapes, num_classes):
        super().__init__(feature_shapes, num_classes)
        self.head = nn.Linear(feature_shapes["a"][0], num_classes)

    def represent(self, features):
        return features["a"]


def _data(n=300):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (n,), generator=g)
    xa = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(n, 3, generator=g)
    xb = torch.randn(n, 2, generator=g)
    return [({"a": xa[i:i + 50], "b": xb[i:i + 50]}, y[i:i + 50]) for i in range(0, n, 50)]


@pytest.mark.parametrize("muting", ["inputs", "features"])
def test_ignored_modality_gets_zero_contribution(muting):
    torch.manual_seed(0)
    model = MultimodalModel({"a": nn.Identity(), "b": nn.Linear(2, 4)}, OnlyA({"a": (3,), "b": (4,)}, 3))
    with torch.no_grad():
        model.fusion.head.weight.copy_(torch.eye(3))
        model.fusion.head.bias.zero_()
    model.train()
    res = model_shape_scores(model, _data(), muting=muting)
    assert model.training
    assert res["shapley"]["b"] == pytest.approx(0.0, abs=1e-12)
    assert res["shapley"]["a"] > 0.5
    assert res["muting"] == muting
    acc = coalition_accuracies(model, _data(), muting)
    assert acc[3] == pytest.approx(acc[1]) and acc[2] == pytest.approx(acc[0])
