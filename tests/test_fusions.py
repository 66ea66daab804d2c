"""Fusions: shapes for M = 2..4, gradient flow to every encoder, Shapley efficiency through them,
muted rows, clear errors, and build_model by name. Parametrized over the registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import modbal  # noqa: F401  (fills the registries)
from modbal.build import build_model
from modbal.encoders import MLPEncoder
from modbal.fusions import Fusion
from modbal.model import MultimodalModel
from modbal.registry import ENCODERS, FUSIONS

NUM_CLASSES = 3
# Tiny widths so every test stays cheap; a fusion not listed here is tested with its defaults.
OPTIONS: dict[str, dict] = {
    "maxout": {"hidden": (8, 6)},
    "early": {"hidden": (8,)},
    "film": {"dim": 8},
    "gated": {"dim": 8},
    "tensor": {"hidden": 8, "max_features": 512},
    "lowrank": {"rank": 2, "dim": 8},
    "transformer": {"dim": 8, "heads": 2, "ff_dim": 16},
}
NAMES = FUSIONS.names()


def make_fusion(name: str, shapes: dict, **extra) -> Fusion:
    return FUSIONS.create(name, feature_shapes=shapes, num_classes=NUM_CLASSES, **{**OPTIONS.get(name, {}), **extra})


def vector_shapes(count: int) -> dict[str, tuple[int, ...]]:
    return {f"m{i}": (4 + i,) for i in range(count)}


def mlp_model(name: str, count: int, seed: int = 0) -> tuple[MultimodalModel, dict]:
    torch.manual_seed(seed)
    input_shapes = {f"m{i}": (5 + i,) for i in range(count)}
    encoders = {m: MLPEncoder(s, hidden=(8,), out_dim=6) for m, s in input_shapes.items()}
    fusion = make_fusion(name, {m: e.out_shape for m, e in encoders.items()})
    inputs = {m: torch.randn(6, *s) for m, s in input_shapes.items()}
    return MultimodalModel(encoders, fusion), inputs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [2, 3, 4])
def test_shapes_vector_features(name: str, count: int) -> None:
    torch.manual_seed(0)
    shapes = vector_shapes(count)
    fusion = make_fusion(name, shapes)
    features = {m: torch.randn(5, *s) for m, s in shapes.items()}
    logits = fusion(features)
    assert logits.shape == (5, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    rep = fusion.represent(features)
    assert rep.dim() == 2 and rep.shape[0] == 5


@pytest.mark.parametrize("count", [2, 3])
def test_transformer_fusion_token_features(count: int) -> None:
    torch.manual_seed(0)
    shapes = {"m0": (5, 6), "m1": (3,), "m2": (4, 7)}
    shapes = dict(list(shapes.items())[:count])
    for pool in ("cls", "mean"):
        fusion = make_fusion("transformer", shapes, pool=pool)
        features = {m: torch.randn(2, *s) for m, s in shapes.items()}
        assert fusion(features).shape == (2, NUM_CLASSES)
        assert fusion.represent(features).shape == (2, 8)
        # The token count may change between batches (padded sequences).
        shorter = {m: (x[:, :2] if x.dim() == 3 else x) for m, x in features.items()}
        assert fusion(shorter).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [2, 3])
def test_gradient_reaches_every_encoder(name: str, count: int) -> None:
    model, inputs = mlp_model(name, count)
    model.train()
    y = torch.arange(6) % NUM_CLASSES
    nn.functional.cross_entropy(model(inputs), y).backward()
    for m in model.modalities:
        for pname, p in model.encoders[m].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient to {m}.{pname}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("mode", ["features", "inputs"])
@pytest.mark.parametrize("training", [False, True])
def test_shapley_efficiency(name: str, count: int, mode: str, training: bool) -> None:
    model, inputs = mlp_model(name, count)
    model.train(training)
    out = model(inputs, shapley=mode)
    assert out.coalitions.shape == (2 ** count, 6, NUM_CLASSES)
    assert out.mono.shape == (count, 6, NUM_CLASSES)
    assert torch.isfinite(out.coalitions).all()
    torch.testing.assert_close(out.mono.sum(0), out.logits, atol=1e-5, rtol=0)
    # Training flags are restored after the muted passes.
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_each_coalition_equals_a_direct_fusion_call(name: str) -> None:
    """Coalition ``mask`` is the fusion applied, on its own, to the real features of the modalities
    whose bit is set and each other encoder's output on one all-zero sample (eval mode): catches a
    wrong bit order, a wrong mask loop or rows leaking between coalitions."""
    model, inputs = mlp_model(name, 3)
    model.eval()
    with torch.no_grad():
        coalitions = model(inputs, shapley="features").coalitions
        real = {m: model.encoders[m](inputs[m]) for m in model.modalities}
        zero = {m: model.encoders[m](torch.zeros(1, *inputs[m].shape[1:])).expand_as(real[m]) for m in model.modalities}
        for mask in range(2 ** len(model.modalities)):
            present = {m: real[m] if mask >> i & 1 else zero[m] for i, m in enumerate(model.modalities)}
            torch.testing.assert_close(coalitions[mask], model.fusion(present), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_muted_rows_match_between_modes_in_eval(name: str) -> None:
    """In eval mode both muting paths give the same coalitions: muted rows mixed with real rows in
    one fusion call must not leak across the batch."""
    model, inputs = mlp_model(name, 3)
    model.eval()
    with torch.no_grad():
        by_features = model(inputs, shapley="features").coalitions
        by_inputs = model(inputs, shapley="inputs").coalitions
        plain = model(inputs)
    torch.testing.assert_close(by_features, by_inputs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_features[-1], plain, atol=1e-6, rtol=0)


def test_transformer_fusion_with_sequence_tokens_shapley() -> None:
    torch.manual_seed(0)
    encoders = {
        "seq": ENCODERS.create("transformer_seq", input_shape=(5, 4), dim=8, heads=2, depth=1, tokens=True),
        "vec": MLPEncoder((7,), hidden=(8,), out_dim=6),
    }
    fusion = make_fusion("transformer", {m: e.out_shape for m, e in encoders.items()})
    model = MultimodalModel(encoders, fusion)
    x = torch.randn(4, 5, 4)
    x[0, 3:] = 0  # a padded sequence
    inputs = {"seq": x, "vec": torch.randn(4, 7)}
    for training in (False, True):
        model.train(training)
        out = model(inputs, shapley="features")
        torch.testing.assert_close(out.mono.sum(0), out.logits, atol=1e-5, rtol=0)
    out.mono.sum().backward()
    for m in model.modalities:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters())


# concat (core) leaves the shape error to its Linear layer; every other fusion checks shapes itself.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "concat"])
def test_wrong_feature_shape_names_the_modality(name: str) -> None:
    fusion = make_fusion(name, vector_shapes(2))
    features = {"m0": torch.randn(2, 4), "m1": torch.randn(2, 9)}
    with pytest.raises(ValueError, match="m1"):
        fusion(features)


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="'m0'.*\\(2, 3, 4\\)"):
        make_fusion("transformer", {"m0": (2, 3, 4), "m1": (3,)})
    with pytest.raises(ValueError, match="max_features"):
        make_fusion("tensor", {"m0": (40,), "m1": (40,), "m2": (40,)}, project=False)
    with pytest.raises(ValueError, match="nope"):
        make_fusion("film", vector_shapes(2), condition="nope")
    with pytest.raises(ValueError, match="heads"):
        make_fusion("transformer", vector_shapes(2), heads=3)
    with pytest.raises(ValueError, match="hidden"):
        make_fusion("maxout", vector_shapes(2), hidden=())


def test_tensor_fusion_projection_is_tractable_for_many_modalities() -> None:
    fusion = FUSIONS.create("tensor", feature_shapes={f"m{i}": (32,) for i in range(8)}, num_classes=2)
    assert fusion.product_size <= 4096
    assert fusion({f"m{i}": torch.randn(2, 32) for i in range(8)}).shape == (2, 2)


def test_film_condition_choice() -> None:
    shapes = vector_shapes(3)
    fusion = make_fusion("film", shapes, condition="m1", include_condition=True)
    assert fusion.others == ("m0", "m2")
    assert fusion.represent({m: torch.randn(2, *s) for m, s in shapes.items()}).shape == (2, 24)


def test_sum_fusion_is_sum_of_heads() -> None:
    shapes = vector_shapes(3)
    fusion = make_fusion("sum", shapes)
    features = {m: torch.randn(3, *s) for m, s in shapes.items()}
    expected = sum(fusion.heads[m](features[m]) for m in shapes)
    torch.testing.assert_close(fusion(features), expected)


# -- build_model by name ----------------------------------------------------------------------
INPUT_SHAPES = {"image": (12, 12), "seq": (6, 5), "vec": (7,)}
SMALL_ENCODERS = {
    "image": {"name": "cnn", "channels": [4, 8]},
    "seq": {"name": "lstm", "hidden": 8},
    "vec": {"name": "mlp", "hidden": [8], "out_dim": 6},
}


def encoders_for(fusion: str) -> dict:
    if fusion == "early":
        return {m: {"name": "identity"} for m in INPUT_SHAPES}
    if fusion == "transformer":
        return {**SMALL_ENCODERS, "seq": {"name": "transformer_seq", "dim": 8, "heads": 2, "depth": 1,
                                          "tokens": True}}
    return SMALL_ENCODERS


@pytest.mark.parametrize("name", NAMES)
def test_build_model_by_name(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(INPUT_SHAPES, NUM_CLASSES, encoders_for(name), {"name": name, **OPTIONS.get(name, {})})
    inputs = {m: torch.randn(3, *s) for m, s in INPUT_SHAPES.items()}
    assert model(inputs).shape == (3, NUM_CLASSES)
    assert model.represent(inputs).shape[0] == 3
    out = model(inputs, shapley="features")
    torch.testing.assert_close(out.mono.sum(0), out.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_per_modality_heads_are_exposed_where_they_exist(name: str) -> None:
    """Fusions with per-modality heads give each modality's own head output (summing to the logits,
    written out here from the weights) and name the head's parameters; the others refuse clearly."""
    shapes = {"a": (4,), "b": (3,), "c": (2,)}
    fusion = make_fusion(name, shapes)
    if not fusion.has_mono_heads:
        with pytest.raises(NotImplementedError, match="per-modality heads"):
            fusion.mono_logits({m: torch.randn(5, *s) for m, s in shapes.items()})
        return
    assert name in ("sum", "concat", "mmcosine")
    features = {m: torch.randn(5, *s) for m, s in shapes.items()}
    mono = fusion.mono_logits(features)
    torch.testing.assert_close(sum(mono.values()), fusion(features), rtol=1e-5, atol=1e-6)
    if name == "concat":  # the original OGM-GE scoring: out_m = h_m · W[:, block_m]ᵀ + b / M
        w, b = fusion.head.weight, fusion.head.bias
        expected_b = features["b"] @ w[:, 4:7].T + b / 3
        torch.testing.assert_close(mono["b"], expected_b)
        (param, index), = fusion.head_parameters("b")
        assert param is w and param[index].shape == (w.shape[0], 3)
    elif name == "mmcosine":  # the original cosine logits: s · normalize(h_m) · normalize(W[:, block_m]ᵀ, dim=0)
        w = fusion.head.weight
        expected_b = fusion.scaling * torch.mm(nn.functional.normalize(features["b"], dim=1),
                                               nn.functional.normalize(w[:, 4:7].T, dim=0))
        torch.testing.assert_close(mono["b"], expected_b)
        (param, index), = fusion.head_parameters("b")
        assert param is w and param[index].shape == (w.shape[0], 3)
    else:  # the original additive model: out_m = head_m(h_m), every parameter of head_m is its own
        torch.testing.assert_close(mono["b"], fusion.heads["b"](features["b"]))
        assert {id(p) for p, _ in fusion.head_parameters("b")} == {id(p) for p in fusion.heads["b"].parameters()}
