"""Sample-level valuation against the authors' code (Valuate-and-Enhance-Multimodal-Cooperation,
code/sample_level.py ``execute_modulation`` and ``train_epoch``, code/datasets/dataloader.py
``AV_KS_Dataset_sample_level``, code/models/models.py ``exec_drop`` and the forward with ``drop``),
written here, and the runner's re-sampled training set (exact resume, two ranks).

The reference values each sample with its own per-sample loop (2 for a right fused prediction, 1
for a right one with the other modality's features zeroed), builds the enlarged sample and drop
lists with the released thresholds, and trains with the dropped modality's features zeroed row by
row; for M = 3 it averages marginal contributions over all orderings. No modbal helper computes
anything on its side.
"""
import copy
import itertools
import math

import _method_runs as runs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modbal.config import load_recipe
from modbal.methods.base import EXAMPLE_TAG, EpochData
from modbal.methods.valuation import Valuation
from modbal.train import run_experiment
from modbal.train.data import ExampleSet, ShardedBatchSampler, TaggedCollate, make_loader

C, D = 3, 6


def make_model(m_total, seed=0):
    return runs.tiny_model(m_total, width=D, classes=C, act=nn.ReLU, seed=seed)


class Samples(torch.utils.data.Dataset):
    def __init__(self, m_total, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = {m: torch.randn(n, runs.DIMS[m], generator=g, dtype=torch.float64) for m in list(runs.DIMS)[:m_total]}
        self.y = torch.randint(C, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {m: x[i] for m, x in self.x.items()}, self.y[i]


# -- the reference ------------------------------------------------------------------------------
def original_contributions(model, data):
    """execute_modulation for M = 2; for M > 2 the same game (v(all) = 2·right, v(S) = right with
    the features outside S zeroed, v(∅) = 0) valued by averaging over orderings."""
    names = list(model.modalities)
    model.eval()
    contribution = {}
    with torch.no_grad():
        feats = {m: model.encoders[m](data.x[m]) for m in names}

        def right(keep):
            out = model.fusion({m: feats[m] if m in keep else torch.zeros_like(feats[m]) for m in names})
            return (out.argmax(1) == data.y).double()
        if len(names) == 2:
            value_all, value_a, value_v = 2.0 * right(names), right([names[0]]), right([names[1]])
            for i in range(len(data)):
                contribution[i] = ((float(value_a[i]) + float(value_all[i]) - float(value_v[i])) / 2.0,
                                   (float(value_v[i]) + float(value_all[i]) - float(value_a[i])) / 2.0)
            return contribution
        value = {}
        for r in range(1, len(names) + 1):
            for keep in itertools.combinations(names, r):
                value[frozenset(keep)] = right(keep) * (2.0 if r == len(names) else 1.0)
        value[frozenset()] = torch.zeros(len(data), dtype=torch.float64)
        orders = list(itertools.permutations(names))
        for i in range(len(data)):
            phi = []
            for m in names:
                total = 0.0
                for order in orders:
                    before = frozenset(order[:order.index(m)])
                    total += float(value[before | {m}][i] - value[before][i])
                phi.append(total / len(orders))
            contribution[i] = tuple(phi)
    return contribution


def original_dataset(contribution, n, m_total):
    """AV_KS_Dataset_sample_level: (sample, drop) pairs; drop k + 1 keeps modality k alone."""
    data, drop = list(range(n)), [0] * n
    for i in range(n):
        for k in range(m_total):
            c = contribution[i][k]
            copies = 1 if 0.4 < c < 1 else 2 if -0.1 < c < 0.4 else 3 if c < -0.1 else 0
            data += [i] * copies
            drop += [k + 1] * copies
    return data, drop


def original_forward(model, x, drop):
    names = list(model.modalities)
    feats = [model.encoders[m](x[m]) for m in names]
    for i in range(len(drop)):
        if drop[i] != 0:
            for k in range(len(names)):
                if k != drop[i] - 1:
                    feats[k] = feats[k].clone()
                    feats[k][i, :] = 0.0
    return model.fusion(dict(zip(names, feats)))


# -- the comparison ------------------------------------------------------------------------------
@pytest.mark.parametrize("m_total", [2, 3])
def test_valuation_resampling_and_steps_match_the_original(m_total):
    data = Samples(m_total)
    ours = make_model(m_total)
    theirs = copy.deepcopy(ours)
    method = Valuation(warmup=1)
    examples = ExampleSet(data)
    sampler = ShardedBatchSampler(examples, 8, shuffle=True, seed=3)
    loader = make_loader(examples, sampler, collate_fn=TaggedCollate())
    ours.train()
    method.before_epoch(ours, EpochData(1, loader, None))
    expected = original_contributions(theirs, data)
    for i in range(len(data)):
        torch.testing.assert_close(method.values[i], torch.tensor(expected[i], dtype=torch.float64))
    assert ours.training  # the valuation pass restored the mode
    chosen = method.train_examples(1)
    ref_data, ref_drop = original_dataset(expected, len(data), m_total)
    assert chosen.indices.tolist() == ref_data and chosen.tags.tolist() == ref_drop
    assert len(ref_data) > len(data) and len(set(ref_drop)) > 2  # copies of several kinds were made

    examples.set_examples(chosen)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    theirs.train()
    for number, (inputs, targets) in enumerate(loader):
        if number == 4:
            break
        loss = method.loss(ours, inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows = sampler.indices_of(number)
        x = {m: data.x[m][[ref_data[r] for r in rows]] for m in theirs.modalities}
        y = data.y[[ref_data[r] for r in rows]]
        ref_loss = F.cross_entropy(original_forward(theirs, x, [ref_drop[r] for r in rows]), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        assert inputs[EXAMPLE_TAG].tolist() == [ref_drop[r] for r in rows]
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_modality_level_matches_the_original_resampling():
    """AV_KS_Dataset_modality_level with the part average of execute_modulation; the random draws
    (np.random.choice, with replacement) replayed from modbal's documented seed (seed, epoch)."""
    n, alpha, seed, epoch = 50, 1.5, 7, 3
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5], dtype=torch.float64)
    phi = torch.stack([grid[torch.randint(2, 5, (n,), generator=g)], grid[torch.randint(0, 4, (n,), generator=g)]], 1)
    contribution = {i: (float(phi[i, 0]), float(phi[i, 1])) for i in range(n)}
    method = Valuation(warmup=1, level="modality", alpha=alpha, part_ratio=0.2, seed=seed)
    method.values = phi
    chosen = method.train_examples(epoch)

    rng = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    num = int(n * 0.2)
    choice = torch.randint(n, (num,), generator=rng).tolist()
    part_cona = sum(contribution[i][0] for i in choice) / num
    part_conv = sum(contribution[i][1] for i in choice) / num
    gap_a, gap_v = 1.0 - part_cona, 1.0 - part_conv
    difference = (abs(gap_a - gap_v) / 3 * 2) * alpha
    resample_num = int(difference * n)
    sample_choice = torch.randint(n, (resample_num,), generator=rng).tolist()
    drop = [2 if gap_a > gap_v else 1] * resample_num  # 2: visual zeroed, audio kept
    assert resample_num > 5 and gap_v > gap_a  # the visual side contributes less here
    assert chosen.indices.tolist() == list(range(n)) + sample_choice
    assert chosen.tags.tolist() == [0] * n + [{2: 1, 1: 2}[d] for d in drop]  # modbal's tag: 1 + kept modality
    with pytest.raises(ValueError, match="level"):
        Valuation(level="batch")


def test_warmup_state_and_options():
    method = Valuation(warmup=2)
    model = make_model(2)
    method.before_epoch(model, EpochData(1, [], None))
    assert method.values is None and method.train_examples(1) is None
    method.values = torch.tensor([[0.5, math.nan], [-0.5, 1.5]], dtype=torch.float64)
    other = Valuation(warmup=2)
    other.load_state_dict(method.state_dict())
    chosen = other.train_examples(2)
    assert chosen.indices.tolist() == [0, 1, 0, 1, 1, 1] and chosen.tags.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="warmup"):
        Valuation(warmup=0)
    with pytest.raises(ValueError, match="values"):
        other.load_state_dict({"values": [1, 2]})
    with pytest.raises(ValueError, match="sample numbers"):
        Valuation(warmup=1).before_epoch(model, EpochData(1, [({"a": torch.zeros(2, 5, dtype=torch.float64),
                                                                 "b": torch.zeros(2, 7, dtype=torch.float64)},
                                                                torch.zeros(2, dtype=torch.long))], None))


# -- through the runner ------------------------------------------------------------------------------
RECIPE = {
    "seed": 3,
    "dataset": runs.synthetic(),
    "model": runs.mlp_model(),
    "method": {"name": "valuation", "warmup": 1},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"epochs": 3, "batch_size": 32, "device": "cpu", "checkpoint_every": 7, "tensorboard": False},
}


def test_resampled_epochs_resume_exactly(tmp_path, monkeypatch):
    path = runs.write_recipe(tmp_path, RECIPE)
    reference = run_experiment(load_recipe(path), tmp_path / "reference")
    rows = runs.steps(tmp_path / "reference")
    per_epoch = [sum(r["epoch"] == e for r in rows) for e in range(3)]
    assert per_epoch[0] == 4 and per_epoch[1] > 4  # 128 samples, then 128 plus copies
    assert [r for r in rows if r["epoch"] == 1][0]["examples"] > 128

    calls = itertools.count(1)  # stopped at the loss of step 8: the last checkpoint is step 7, three into epoch 1
    runs.run_interrupted(monkeypatch, Valuation, "loss", lambda self, *args: next(calls) == per_epoch[0] + 4,
                         load_recipe(path), tmp_path / "killed")
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["loop"]["epoch"] == 1 and saved["loop"]["step_in_epoch"] == 3
    resumed = run_experiment(None, tmp_path / "killed", resume=True)
    assert runs.steps(tmp_path / "killed") == rows
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    # drop_last: a re-sampled epoch may end in an odd-sized batch, which two ranks would trim by one sample
    train = {**RECIPE["train"], "checkpoint_every": 0, "drop_last": True}
    single, ddp = runs.train_single_and_ddp(tmp_path, {**RECIPE, "train": train})
    runs.assert_same_steps_and_weights(
        tmp_path, lambda row: [key for key in ("loss", "examples", "value/a", "value/b") if key in row], None)
    assert ddp["test"]["acc"] == pytest.approx(single["test"]["acc"], abs=1 / 32 + 1e-9)
