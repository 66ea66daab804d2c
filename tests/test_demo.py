"""``modbal demo``: it trains the built-in recipe as shipped and writes its table, JSON and plot."""
from __future__ import annotations

import inspect
import json

import pytest
import yaml

from modbal.config import ConfigError, load_recipe
from modbal.demo import demo_config, run_demo
from modbal.registry import METHODS


def test_demo_trains_the_builtin_recipe_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo("synthetic", seeds=1, epochs=1, out=out, quiet=True)
    for method in ("joint", "agm"):
        saved = yaml.safe_load((out / f"{method}-seed0" / "config.yaml").read_text())
        expected = load_recipe("synthetic", [f"method={method}", "seed=0", "train.epochs=1"])
        assert ({k: saved[k] for k in expected if k != "run_dir"}
                == {k: v for k, v in expected.items() if k != "run_dir"})
    written = json.loads((out / "results.json").read_text())
    assert set(written["results"]) == {"joint", "agm"} == set(result["results"])
    acc = written["results"]["agm"]["acc"]
    assert acc["values"] == [json.loads((out / "agm-seed0" / "summary.json").read_text())["test"]["acc"]]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report of the demo's runs, drawn by modbal.report.plots: AGM's coefficient coef/<m> included
    figures = sorted(f.name for f in (out / "figures").iterdir())
    assert figures[1] == "02-coefficients-synthetic-concat.png" and len(figures) == 4, figures
    assert "Coefficients — synthetic / concat" in (out / "report.html").read_text()
    table = (out / "results.md").read_text()
    assert "| joint | 1 |" in table and "| agm | 1 |" in table and "Bayes accuracy" in table
    # a second demo replaces its own runs; a folder the demo did not write is refused
    run_demo("synthetic", seeds=1, epochs=1, out=out, methods=("joint",), quiet=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="was not written by `modbal demo`"):
        run_demo("synthetic", seeds=1, epochs=1, out=tmp_path / "mine", quiet=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_demo_on_a_dataset_without_a_recipe_uses_generic_settings():
    config = demo_config("cremad", "agm", seed=3, epochs=2)  # its recipe is cremad_late, another name
    assert config["dataset"]["name"] == "cremad" and config["model"]["encoders"]["*"]["name"] == "mlp"
    assert config["model"]["fusion"]["name"] == "concat" and config["train"]["epochs"] == 2
    assert config["method"]["name"] == "agm" and config["seed"] == 3


def test_demo_accepts_every_registered_method_that_needs_no_arguments():
    for name in METHODS.names():
        params = inspect.signature(METHODS.get(name)).parameters.values()
        if any(p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params):
            continue  # e.g. unimodal (modality=...), umt/ume (teachers=...)
        assert demo_config("synthetic", name, 0)["method"]["name"] == name  # resolved and validated
