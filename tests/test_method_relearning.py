"""Diagnosing & Re-learning against the authors' diagnosis and re-initialisation
(Diagnosing_Relearning_ECCV2024, code/ours.py ``get_feature``, ``reinit_score``, ``purity_score``,
``reinit``), written here.

The reference extracts each encoder's features itself (eval mode), scales them with scikit-learn's
MinMaxScaler to [−1, 1], clusters with scikit-learn's KMeans(n_clusters=C, random_state=0), votes
each cluster's label with a histogram as ``purity_score`` does, and blends the parameters with its
own tanh weights. The features form clean blobs, so any correct k-means finds the same clusters;
the validation labels are noisier for one modality than the other, so the two weights differ.
"""
import copy

import _method_runs as runs
import pytest
import torch
from torch import nn

from modbal import MultimodalModel
from modbal.config import load_recipe
from modbal.fusions import ConcatFusion
from modbal.methods.base import EpochData
from modbal.methods.relearning import Relearning, kmeans, purity
from modbal.train import run_experiment

C, D = 4, 6


def make_model(m_total, seed=0):
    return runs.tiny_model(m_total, width=D, classes=C, seed=seed)


def blobs(m_total, n, noise, seed):
    """Inputs drawn around one centre per class; for modality i the centre is the label's, except
    for a fraction noise[i] of samples whose centre is another class's."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    centres = {m: 3 * torch.randn(C, runs.DIMS[m], generator=g, dtype=torch.float64) for m in runs.DIMS}
    inputs = {}
    for i, m in enumerate(list(runs.DIMS)[:m_total]):
        blob = labels.clone()
        flip = torch.rand(n, generator=g) < noise[i]
        blob[flip] = (blob[flip] + 1) % C
        inputs[m] = centres[m][blob] + 0.05 * torch.randn(n, runs.DIMS[m], generator=g, dtype=torch.float64)
    return inputs, labels


def loader(inputs, labels, size=16):
    return [({m: x[i:i + size] for m, x in inputs.items()}, labels[i:i + size]) for i in range(0, len(labels), size)]


def purity_score(y_true, y_pred):
    """code/ours.py purity_score: each cluster votes its most frequent label; accuracy of the votes."""
    import numpy as np
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
    voted = np.zeros(y_true.shape)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        voted[y_pred == cluster] = np.argmax(hist)
    return float((voted == y_true).mean())


@pytest.mark.parametrize("m_total", [2, 3])
def test_reinit_matches_the_original_diagnosis(m_total):
    cluster = pytest.importorskip("sklearn.cluster")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    model = make_model(m_total)
    method = Relearning(strength=3.0, reinit_epoch=2, reinit_num=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method.setup(model, opt)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}  # 'init_para.pkl'
    train_x, train_y = blobs(m_total, 96, [0.0] * m_total, seed=1)
    val_x, val_y = blobs(m_total, 64, [0.1, 0.4, 0.25][:m_total], seed=2)
    with torch.no_grad():  # training moved the encoders
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    theirs = copy.deepcopy(model)

    method.before_epoch(model, EpochData(2, loader(train_x, train_y), loader(val_x, val_y)))
    assert method.done == 0  # not due: the diagnosis follows epoch e = 2, so it runs before epoch 3
    method.before_epoch(model, EpochData(3, loader(train_x, train_y), loader(val_x, val_y)))
    assert method.done == 1

    theirs.eval()
    weights = {}
    for m in theirs.modalities:
        purities = []
        for x, y in ((train_x, train_y), (val_x, val_y)):
            with torch.no_grad():
                fea = theirs.encoders[m](x[m]).numpy()
            result = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(fea)
            y_pred = cluster.KMeans(n_clusters=C, random_state=0).fit_predict(result)
            purities.append(purity_score(y.numpy().copy(), y_pred))
        weights[m] = torch.tanh(torch.tensor(3.0 * abs(purities[0] - purities[1]))).item()
        assert method.statistics()[f"purity_val/{m}"] == pytest.approx(purities[1])
    assert weights["a"] < weights["b"]  # the noisier modality is pulled back further
    for name, param in theirs.named_parameters():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        if m is not None:
            param.data = weights[m] * checkpoint[name] + (1 - weights[m]) * param.data
    for (name, p), q in zip(model.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_kmeans_and_purity_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.0, 5.0], [0.1, 5.1]])
    clusters = kmeans(x, 3)
    assert clusters[0] == clusters[1] and clusters[2] == clusters[3] and clusters[4] == clusters[5]
    assert len(set(clusters.tolist())) == 3
    labels = torch.tensor([0, 0, 1, 2, 2, 2])  # clusters' majority labels: 0 (2 of 2), 1 or 2 (1 of 2), 2 (2 of 2)
    assert purity(labels, clusters) == pytest.approx(5 / 6)


def test_options_state_and_unsupported_models():
    model = make_model(2)
    method = Relearning(reinit_epoch=1)
    method.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    other = Relearning(reinit_epoch=1)
    other.load_state_dict(method.state_dict())
    other.setup(model, None)  # a resumed run keeps the saved initial weights
    assert torch.equal(other.initial["a"][0], method.initial["a"][0])
    with pytest.raises(ValueError, match="reinit_epoch"):
        Relearning(reinit_epoch=0)
    with pytest.raises(ValueError, match="validation split"):
        method.before_epoch(model, EpochData(2, [], None))
    identity = MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion({"a": (6,), "b": (6,)}, C))
    with pytest.raises(ValueError, match="have none"):
        Relearning().setup(identity, None)


RECIPE = {
    "seed": 8,
    "dataset": runs.synthetic(num_val=48),
    "model": runs.mlp_model(dropout=0.1),
    "method": {"name": "relearning", "reinit_epoch": 1, "reinit_num": 2, "restarts": 2},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 4, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


def test_resume_keeps_the_initial_weights_and_is_exact(tmp_path, monkeypatch):
    path = runs.write_recipe(tmp_path, RECIPE)
    reference = run_experiment(load_recipe(path), tmp_path / "reference")
    rows = runs.steps(tmp_path / "reference")
    assert [r for r in rows if r["epoch"] == 2][0]["reinit/a"] > 0  # diagnosed after epoch 1, before epoch 2

    # stopped at the start of epoch 3: the second re-initialisation is still to come
    runs.run_interrupted(monkeypatch, Relearning, "on_epoch_start", lambda self, epoch: epoch == 3, load_recipe(path),
                         tmp_path / "killed")
    resumed = run_experiment(None, tmp_path / "killed", resume=True)
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]
    a, b = runs.last_checkpoints(tmp_path / "killed", tmp_path / "reference")
    assert a["method"]["done"] == b["method"]["done"] == 2
    runs.assert_same_weights(a["model"], b["model"])
