"""Every paper-dataset recipe trains end to end on a small fixture written in that dataset's public
format (the fixture writers are the dataset tests'), with only the data root, epochs and batch size
overridden: the recipes' models, fusions and methods fit the loaders' real shapes."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_datasets_affect import split, write_pickle
from test_datasets_ave import write_ave
from test_datasets_avmnist import write_avmnist
from test_datasets_cremad import write_cremad
from test_datasets_mfeat import write_mfeat

from modbal.config import load_recipe
from modbal.train import run_experiment

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def urfunny_fixture(root: Path) -> Path:
    labels = [0, 1] * 4
    write_pickle(root / "humor.pkl", {"train": split(8, labels), "valid": split(4, labels[:4]),
                                      "test": split(4, labels[:4])})
    return root


def mosei_fixture(root: Path) -> Path:
    sentiment = [[[-1.0]], [[1.5]]] * 4
    write_pickle(root / "mosei_senti_data.pkl", {"train": split(8, sentiment), "valid": split(4, sentiment[:4]),
                                                 "test": split(4, sentiment[:4])})
    return root


FIXTURES = {
    "avmnist_late.yaml": lambda r: write_avmnist(r, n_train=24, n_test=8),
    "avmnist_early.yaml": lambda r: write_avmnist(r, n_train=24, n_test=8),
    "cremad_late.yaml": write_cremad,
    "ave.yaml": write_ave,
    "urfunny_late.yaml": urfunny_fixture,
    "urfunny_early.yaml": urfunny_fixture,
    "mosei.yaml": mosei_fixture,
    "mfeat.yaml": lambda r: write_mfeat(r),
}
EXTRA = {"avmnist_late.yaml": ["dataset.val_size=4"], "avmnist_early.yaml": ["dataset.val_size=4"],
         "cremad_late.yaml": ["train.val_fraction=0.34", "train.num_workers=0"]}


def test_every_paper_recipe_has_a_fixture():
    paper = {p.name for p in RECIPES.glob("*.yaml")} - {"synthetic.yaml", "synthetic_competition.yaml", "avdigits.yaml"}
    assert paper == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("method", ["joint", "agm"])
def test_recipe_trains_on_its_fixture(tmp_path, name, method):
    root = FIXTURES[name](tmp_path / "data")
    config = load_recipe(RECIPES / name, [f"method={method}", f"dataset.root={root}", "train.epochs=1",
                                          "train.batch_size=4", "train.device=cpu", "train.tensorboard=false",
                                          *EXTRA.get(name, [])])
    summary = run_experiment(config, tmp_path / "run")
    assert summary["status"] == "complete" and 0.0 <= summary["test"]["acc"] <= 1.0
