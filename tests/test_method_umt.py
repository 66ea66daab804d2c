"""UMT against the uni-modal-teacher training step (BalanceBenchmark ``UMT_trainer.training_step``:
the official code of Du et al. was not found), written here, and its teachers read from real
``unimodal`` runs through the runner.

The reference runs the student's encoders and fusion itself, runs each teacher encoder without
gradients (in eval mode, which BalanceBenchmark leaves to chance), adds α·MSE(teacher, student) per
modality to the fused cross-entropy and steps; no modbal helper computes anything on its side.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _method_runs import DIMS, mlp_model, random_batch, run_interrupted, steps, synthetic, tiny_model, write_recipe
from torch import nn

from modbal.config import ConfigError, load_recipe
from modbal.methods.base import method_modules
from modbal.methods.umt import UMT
from modbal.train import run_experiment

C, D = 4, 6


def encoder(m):
    return nn.Sequential(nn.Linear(DIMS[m], D), nn.BatchNorm1d(D), nn.ReLU())


def make_model(m_total, seed=0):
    return tiny_model(m_total, width=D, classes=C, norm=True, act=nn.ReLU, seed=seed)


def batch(m_total, n=10, seed=0):
    return random_batch(m_total, n, seed, classes=C)


@pytest.mark.parametrize("m_total", [2, 3])
def test_updates_match_the_teacher_step(m_total):
    torch.manual_seed(1)
    teachers = {m: encoder(m).double() for m in list(DIMS)[:m_total]}
    for t in teachers.values():  # trained-looking BatchNorm statistics, used in eval mode
        t[1].running_mean.uniform_(-1, 1)
        t[1].running_var.uniform_(0.5, 2)
    ours = make_model(m_total)
    theirs = copy.deepcopy(ours)
    ref_teachers = copy.deepcopy(teachers)
    method = UMT(teachers=teachers, alpha=0.7)
    method.attach(ours)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-4)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ours.train()
    theirs.train()
    for step in range(4):
        x, y = batch(m_total, seed=step)
        loss = method.loss(ours, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

        feats = {m: theirs.encoders[m](x[m]) for m in theirs.modalities}
        ref_loss = F.cross_entropy(theirs.fusion(feats), y)
        for m in theirs.modalities:
            ref_teachers[m].eval()
            with torch.no_grad():
                out_unimodal = ref_teachers[m](x[m])
            ref_loss = ref_loss + 0.7 * F.mse_loss(out_unimodal, feats[m])
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        for (name, p), q in zip(theirs.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(dict(ours.named_parameters())[name], q, rtol=1e-10, atol=1e-12)
    # the teachers did not move, and stayed frozen
    for m, t in method_modules(ours)["teachers"].items():
        for p, q in zip(t.parameters(), ref_teachers[m].parameters()):
            assert torch.equal(p, q) and not p.requires_grad
    assert set(method.statistics()) == {f"distill/{m}" for m in ours.modalities}


def test_refuses_what_it_cannot_use():
    model = make_model(2)
    with pytest.raises(ValueError, match=r"needs one teacher per modality .* missing \['b'\]"):
        UMT(teachers={"a": encoder("a").double()}).attach(model)
    with pytest.raises(ValueError, match="needs teachers"):
        UMT(teachers={})
    with pytest.raises(ValueError, match="only inside a run"):
        UMT(teachers={"a": "runs/a", "b": "runs/b"}).attach(model)
    small = {"a": nn.Linear(DIMS["a"], 3), "b": encoder("b")}
    small["a"].out_shape = (3,)
    with pytest.raises(ValueError, match=r"teacher of 'a' gives features of shape \(3,\)"):
        UMT(teachers=small).attach(make_model(2))


# -- teachers from unimodal runs, through the runner --------------------------------------------------
RECIPE = {
    "seed": 4,
    "dataset": synthetic(),
    "model": mlp_model(dropout=0.1),
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for m in ("a", "b"):
        run_experiment({**RECIPE, "method": {"name": "unimodal", "modality": m}, "train": {**RECIPE["train"],
                        "epochs": 1}}, root / m)
    return root


def _recipe(tmp_path, teachers, **changes):
    recipe = {**RECIPE, "method": {"name": "umt", "teachers": {m: str(teachers / m) for m in "ab"}, "alpha": 0.5},
              **changes}
    return load_recipe(write_recipe(tmp_path, recipe))


def test_teachers_come_from_the_unimodal_runs_and_resume_is_exact(tmp_path, teacher_runs, monkeypatch):
    reference = run_experiment(_recipe(tmp_path, teacher_runs), tmp_path / "reference")
    saved = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for m in "ab":
        best = torch.load(teacher_runs / m / "checkpoints" / "best.pt", weights_only=True)["model"]
        for key, value in best.items():
            if key.startswith(f"encoders.{m}."):
                assert torch.equal(saved["method_modules.teachers." + key[len("encoders."):]], value), key
    rows = steps(tmp_path / "reference")
    assert rows[0]["distill/a"] > 0 and rows[0]["distill/b"] > 0

    run_interrupted(monkeypatch, UMT, "on_epoch_start", lambda self, epoch: epoch == 1, _recipe(tmp_path, teacher_runs),
                    tmp_path / "killed")
    resumed = run_experiment(None, tmp_path / "killed", resume=True)
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]
    a = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in saved.items():
        assert torch.equal(a[key], value), key


def test_mismatched_teacher_runs_are_refused_in_one_line(tmp_path, teacher_runs):
    def refused(recipe, match):
        with pytest.raises(ConfigError, match=match) as info:
            run_experiment(recipe, tmp_path / "run")
        assert "\n" not in str(info.value)
        assert not (tmp_path / "run").exists()

    swapped = _recipe(tmp_path, teacher_runs)
    swapped["method"]["teachers"] = {"a": str(teacher_runs / "b"), "b": str(teacher_runs / "a")}
    refused(swapped, r"teacher for 'a': .* is a 'unimodal' run on 'b', not a 'unimodal' run on 'a'")
    other_data = _recipe(tmp_path, teacher_runs, dataset={**RECIPE["dataset"], "num_train": 96})
    refused(other_data, r"teacher for 'a': .* trained on other data \(dataset.num_train")
    other_split = _recipe(tmp_path, teacher_runs, train={**RECIPE["train"], "val_seed": 9})
    refused(other_split, r"carved another validation split")
    missing = _recipe(tmp_path, teacher_runs)
    missing["method"]["teachers"]["b"] = str(tmp_path / "nowhere")
    refused(missing, r"teacher for 'b': .*nowhere' is not a run directory")
    wide = _recipe(tmp_path, teacher_runs, model={**RECIPE["model"], "encoders": {"*": {"name": "mlp",
                                                                                       "hidden": [16], "out_dim": 4}}})
    refused(wide, r"teacher of 'a' gives features of shape \(8,\), the model's encoder \(4,\)")
