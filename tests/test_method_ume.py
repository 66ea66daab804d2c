"""UME, the uni-modal ensemble (Du et al., ICML 2023): the mean of the logits of uni-modal models, each
called on its own modality with the others zeroed (as the ``unimodal`` runs train and evaluate
them). The reference zeroes the inputs and averages by hand, and scores the test split itself."""
import copy

import pytest
import torch
from _method_runs import DIMS, mlp_model, synthetic, tiny_model, write_recipe
from torch import nn

from modbal.build import build_model
from modbal.config import encoder_specs, load_recipe, load_yaml, resolve
from modbal.methods.base import method_modules
from modbal.methods.ume import UME
from modbal.train import run_experiment
from modbal.train.run import build_data

C, D = 4, 6


def make_model(m_total, seed=0):
    return tiny_model(m_total, width=D, classes=C, norm=True, act=nn.ReLU, seed=seed)


@pytest.mark.parametrize("m_total", [2, 3])
def test_prediction_is_the_mean_of_the_uni_modal_logits(m_total):
    members = {m: make_model(m_total, seed=i + 1) for i, m in enumerate(list(DIMS)[:m_total])}
    ref = copy.deepcopy(members)
    model = make_model(m_total)
    method = UME(teachers=members)
    method.attach(model)
    g = torch.Generator().manual_seed(3)
    x = {m: torch.randn(8, DIMS[m], generator=g, dtype=torch.float64) for m in list(DIMS)[:m_total]}
    model.train()  # predict puts the members in eval mode itself
    with torch.no_grad():
        got = method.predict(model, x)
        total = 0
        for m, member in ref.items():
            member.eval()
            alone = {k: (v if k == m else torch.zeros_like(v)) for k, v in x.items()}
            total = total + member(alone)
        expected = total / m_total
    torch.testing.assert_close(got.logits, expected, rtol=1e-10, atol=1e-12)
    assert got.mono.shape == (m_total, 8, C)
    assert all(not p.requires_grad for p in method_modules(model)["members"].parameters())


RECIPE = {
    "seed": 6,
    "dataset": synthetic(num_test=48),
    "model": mlp_model(),
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


def test_a_run_evaluates_the_ensemble_of_the_unimodal_runs(tmp_path):
    for m in "ab":
        run_experiment({**RECIPE, "method": {"name": "unimodal", "modality": m}}, tmp_path / m)
    teachers = {m: str(tmp_path / m) for m in "ab"}
    path = write_recipe(tmp_path, {**RECIPE, "method": {"name": "ume", "teachers": teachers},
                                   "train": {**RECIPE["train"], "epochs": 1}})
    summary = run_experiment(load_recipe(path), tmp_path / "ume")

    # the reference: each run's best model, rebuilt from its own config, scored on the test split by hand
    members = {}
    for m in "ab":
        config = resolve(load_yaml((tmp_path / m / "config.yaml").read_text()))
        data = build_data(config)
        model = build_model(data["input_shapes"], 4, encoder_specs(config, data["modalities"]),
                            config["model"]["fusion"])
        model.load_state_dict(torch.load(tmp_path / m / "checkpoints" / "best.pt", weights_only=True)["model"])
        members[m] = model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in data["test"]:
            x = {k: v.unsqueeze(0) for k, v in x.items()}
            logits = sum(members[m]({k: (v if k == m else torch.zeros_like(v)) for k, v in x.items()})
                         for m in "ab") / 2
            correct += int(logits.argmax(-1).item() == int(y))
    assert summary["test"]["acc"] == pytest.approx(correct / len(data["test"]))
    # the ensemble beats (or ties) its weaker member, as on this task it should
    weaker = min(run_experiment(None, tmp_path / m, resume=True)["test"]["acc"] for m in "ab")
    assert summary["test"]["acc"] >= weaker
    # nothing of the model trained: the members are the runs' weights
    saved = torch.load(tmp_path / "ume" / "checkpoints" / "last.pt", weights_only=True)["model"]
    best_a = torch.load(tmp_path / "a" / "checkpoints" / "best.pt", weights_only=True)["model"]
    for key, value in best_a.items():
        assert torch.equal(saved["method_modules.members.a." + key], value)
