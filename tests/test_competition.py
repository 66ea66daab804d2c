"""Competition strength: ridge probe against a naive reference, and cases with known answers."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from modbal.fusions import ConcatFusion
from modbal.metrics.competition import (
    competition_scores,
    competition_scores_per_set,
    competition_strength,
    extract_representations,
    probe_competition,
    ridge_fit,
    ridge_predict,
)
from modbal.model import MultimodalModel, mute_inputs


def naive_ridge(x, y, alpha):
    """Closed form on the augmented design [X, 1] with the intercept left unpenalized."""
    xa = np.hstack([x, np.ones((x.shape[0], 1))])
    penalty = alpha * np.eye(xa.shape[1])
    penalty[-1, -1] = 0.0
    coef = np.linalg.inv(xa.T @ xa + penalty) @ xa.T @ y
    return coef[:-1], coef[-1]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 120.0])
def test_ridge_fit_matches_naive_closed_form(alpha):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7)) * 3 + 2
    y = x @ rng.normal(size=(7, 4)) + rng.normal(size=(60, 4)) + 5
    fit = ridge_fit(x, y, alpha)
    w, b = naive_ridge(x, y, alpha)
    np.testing.assert_allclose(fit.weight.numpy(), w, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(fit.bias.numpy(), b, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ridge_predict(fit, x).numpy(), np.hstack([x, np.ones((60, 1))]) @ np.vstack([w, b]),
                               rtol=1e-8, atol=1e-8)


def test_ridge_fit_validates():
    with pytest.raises(ValueError, match="alpha"):
        ridge_fit(np.ones((3, 2)), np.ones((3, 1)), -1.0)
    with pytest.raises(ValueError, match="samples"):
        ridge_fit(np.ones((3, 2)), np.ones((4, 1)))


def test_score_is_zero_for_perfect_and_near_one_for_mean_prediction():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    assert competition_strength(y, y) == pytest.approx(0.0, abs=1e-12)
    mean = np.broadcast_to(y.mean(0), y.shape)
    assert competition_strength(mean, y) == pytest.approx(199 / 200, abs=1e-10)  # B uses the unbiased cov
    with pytest.raises(ValueError, match="at least 2 evaluation samples"):
        competition_strength(y[:1], y[:1])


def authors_score(pred, target):
    """The paper code's score, transcribed: B = torch.cov(Y.T)·N, trace((R B⁺)ᵀ R) / dim(Y)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    r = pred - target
    b = torch.cov(target.T) * target.size(0)
    return float(torch.trace((r @ torch.pinverse(b)).T @ r) / target.size(1))


@pytest.mark.parametrize("n", [20, 100])
def test_score_matches_the_authors_code_with_full_rank_target(n):
    rng = np.random.default_rng(2)
    y = rng.normal(size=(n, 3))
    pred = y + 0.3 * rng.normal(size=(n, 3))
    assert competition_strength(pred, y) == pytest.approx(authors_score(pred, y), rel=1e-9)


def test_constant_target_columns_do_not_dilute_the_score():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(100, 2))
    mean = np.broadcast_to(y.mean(0), y.shape)
    padded_y = np.hstack([y, np.full((100, 3), 4.0)])
    padded_mean = np.hstack([mean, np.full((100, 3), 4.0)])
    assert competition_strength(padded_mean, padded_y) == pytest.approx(99 / 100, abs=1e-10)
    assert math.isnan(competition_strength(np.zeros((5, 2)), np.ones((5, 2))))


def test_linear_concept_scores_near_zero_and_independent_concept_near_one():
    rng = np.random.default_rng(4)
    n, d = 2000, 16
    fused_probe, fused_eval = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    mix = rng.normal(size=(d, 6))
    linear = probe_competition(fused_probe, fused_probe @ mix + 1.0, fused_eval, fused_eval @ mix + 1.0, alpha=1.0)
    assert linear < 0.01
    lost = probe_competition(fused_probe, rng.normal(size=(n, 6)), fused_eval, rng.normal(size=(n, 6)), alpha=120.0)
    assert lost == pytest.approx(1.0, abs=0.05)


def _model(seed, a_dim=3, b_dim=5, width=8):
    torch.manual_seed(seed)
    enc = {"a": nn.Sequential(nn.Linear(a_dim, width), nn.Tanh()),
           "b": nn.Sequential(nn.Linear(b_dim, width), nn.Tanh())}
    return MultimodalModel(enc, ConcatFusion({"a": (width,), "b": (width,)}, num_classes=3))


def _loader(n, seed, batch=64):
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g)
    y = torch.randint(3, (n,), generator=g)
    return [({"a": xa[i:i + batch], "b": xb[i:i + batch]}, y[i:i + batch]) for i in range(0, n, batch)]


def test_extract_representations_mutes_and_keeps_mode():
    model = _model(0)
    model.train()
    loader = _loader(100, 0)
    rep = extract_representations(model, loader, keep=["a"])
    assert rep.shape == (100, 16) and rep.dtype == torch.float64
    assert model.training
    zero_b = model.encoders["b"](torch.zeros(1, 5)).detach().double()
    torch.testing.assert_close(rep[:, 8:], zero_b.expand(100, -1))
    assert mute_inputs({"a": torch.ones(2), "b": torch.ones(2)}, ["b"])["a"].sum() == 0


def test_competition_scores_of_models():
    model = _model(0)
    probe, evaluation = _loader(600, 1), _loader(600, 2)
    # the concept of "a" is the multimodal model itself: its "a" half is a linear function of the
    # fused representation (a sub-block of it), so d_a ≈ 0.
    # the concept of "b" is an unrelated network on modality b: its tanh features are nonlinear in
    # the fused features, so some of it is lost (d_b clearly above 0).
    scores = competition_scores(model, {"a": model, "b": _model(7)}, probe, evaluation, alpha=1e-3)
    assert scores["a"] < 1e-3
    assert scores["b"] > scores["a"]
    # a model blind to b (its b encoder outputs a constant) loses b's concept entirely
    blind = _model(0)
    with torch.no_grad():
        blind.encoders["b"][0].weight.zero_()
    lost = competition_scores(blind, {"b": _model(7)}, probe, evaluation)
    assert lost["b"] == pytest.approx(1.0, abs=0.1)
    # several concept sets at once (the fused representation read once) give each set's own scores
    sets = [{"a": model, "b": _model(7)}, {"b": _model(8)}]
    per_set = competition_scores_per_set(model, sets, probe, evaluation, alpha=1e-3)
    assert per_set == [pytest.approx(competition_scores(model, c, probe, evaluation, alpha=1e-3)) for c in sets]
    assert per_set[1]["b"] != pytest.approx(per_set[0]["b"])


@pytest.mark.slow
def test_agm_lowers_competition_of_the_under_used_modality_on_the_competition_task(tmp_path):
    """The AGM paper's claim, at the settings of docs/research/competition.md (concat, lr 0.03, 20 epochs): on the
    synthetic task built for competition, d_hard is higher after joint training than after AGM, for
    each seed, measured against one shared concept whose seed no run uses. The measured gap is
    0.02 with run-to-run std 0.005–0.008, so a margin of 0.005 per seed is not noise."""
    from modbal.config import load_recipe
    from modbal.report.analyze import load_trained, split_loader
    from modbal.train.run import run_experiment

    torch.set_num_threads(1)
    common = ["optim.lr=0.03", "train.tensorboard=false"]
    concept_dir = tmp_path / "concept"
    run_experiment(load_recipe("synthetic_competition", common + ["method=unimodal", "method.modality=hard",
                                                                  "seed=1000"]), concept_dir, quiet=True)
    d_hard = {}
    for method in ("joint", "agm"):
        for seed in (0, 1):
            run_dir = tmp_path / f"{method}-{seed}"
            run_experiment(load_recipe("synthetic_competition", common + [f"method={method}", f"seed={seed}"]),
                           run_dir, quiet=True)
            model, _, data = load_trained(run_dir)
            concept = load_trained(concept_dir, data=data)[0]
            d_hard[method, seed] = competition_scores(model, {"hard": concept}, split_loader(data, "val", 256),
                                                      split_loader(data, "test", 256))["hard"]
    for seed in (0, 1):
        assert d_hard["joint", seed] > d_hard["agm", seed] + 0.005, d_hard
    assert all(0.6 < d < 1.0 for d in d_hard.values()), d_hard
