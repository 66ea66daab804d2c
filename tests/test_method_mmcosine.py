"""MMCosine (the ``mmcosine`` fusion) against the authors' training step (MMCosine_ICASSP23,
main_CD.py ``train_epoch`` with ``--mmcosine``, ``lam`` 0 as by default), written here.

The reference slices the concatenation head's weight per modality, normalises each feature row and
each class column itself, scales, sums and steps; no modbal helper computes anything on its side.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from _method_runs import DIMS, tiny_model
from torch import nn

from modbal import Joint
from modbal.config import load_recipe
from modbal.fusions import CosineFusion
from modbal.train import evaluate_run, run_experiment

WIDTH = {"a": 6, "b": 4, "c": 5}
C = 4


def make_model(m_total, scaling, seed=0):
    return tiny_model(m_total, width=WIDTH, classes=C, act=nn.ReLU, fusion=CosineFusion, seed=seed, scaling=scaling)


@pytest.mark.parametrize("m_total", [2, 3])
def test_updates_match_the_original_step(m_total):
    ours = make_model(m_total, scaling=15.0)
    theirs = copy.deepcopy(ours)
    method = Joint()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x = {m: torch.randn(10, DIMS[m], generator=g, dtype=torch.float64) for m in ours.modalities}
        y = torch.randint(C, (10,), generator=g)
        loss = method.loss(ours, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

        weight = theirs.fusion.head.weight  # fc_out.weight, C × ΣD
        out, start = 0, 0
        for m in theirs.modalities:
            h = theirs.encoders[m](x[m])
            block = weight[:, start:start + WIDTH[m]]
            out = out + torch.mm(F.normalize(h, dim=1), F.normalize(torch.transpose(block, 0, 1), dim=0)) * 15.0
            start += WIDTH[m]
        ref_loss = nn.CrossEntropyLoss()(out, y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_logits_are_bounded_by_the_scale_and_options_are_checked():
    model = make_model(2, scaling=10.0)
    x = {m: 100 * torch.randn(8, DIMS[m], dtype=torch.float64) for m in model.modalities}
    assert model(x).abs().max() <= 2 * 10.0 + 1e-9  # |cos| <= 1 per modality, whatever the feature norms
    with pytest.raises(ValueError, match="scaling"):
        CosineFusion({"a": (3,), "b": (3,)}, C, scaling=0)


def test_a_run_with_the_fusion_by_name(tmp_path):
    recipe = {
        "seed": 1,
        "dataset": {"name": "synthetic", "num_train": 96, "num_val": 32, "num_test": 32, "num_classes": 4,
                    "bayes_samples": 50, "modalities": {"a": {"dim": 3, "separation": 4.0},
                                                        "b": {"dim": 12, "separation": 3.0}}},
        "model": {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8}},
                  "fusion": {"name": "mmcosine", "scaling": 15}},
        "method": {"name": "ogm_ge", "alpha": 0.5},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "tensorboard": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = run_experiment(load_recipe(path), tmp_path / "run")
    assert summary["test"]["acc"] > 0.25 and "head_acc/a" in summary["test"]
    assert evaluate_run(tmp_path / "run") == summary["test"]
