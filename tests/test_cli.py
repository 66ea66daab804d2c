"""The ``modbal`` command: help, exit codes and one-line messages."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from modbal.cli import build_parser, main

TINY = {
    "dataset": {"name": "synthetic", "num_train": 128, "num_val": 32, "num_test": 32, "num_classes": 3,
                "bayes_samples": 50,
                "modalities": {"a": {"dim": 3, "separation": 4.0}, "b": {"dim": 6, "separation": 3.0}}},
    "model": {"encoders": {"*": {"name": "mlp", "hidden": [8], "out_dim": 4}}, "fusion": "concat"},
    "methods": {"agm": {"alpha": 1.0}},
    "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "eval", "demo", "method=agm", "--resume"):
        assert word in out
    assert main([]) == 2


def test_train_then_eval(recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "method=agm", "seed=1", "--run-dir", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "agm on synthetic (concat), seed 1" in out and str(run_dir) in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "agm" and summary["seed"] == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == {"name": "agm", "alpha": 1.0}
    assert main(["eval", str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(summary["test"])
    assert main(["eval", str(run_dir), "--checkpoint", "last", "--split", "val"]) == 0
    assert "mono_acc/a" in capsys.readouterr().out
    # the same directory again: refused, nothing overwritten
    before = (run_dir / "summary.json").read_text()
    assert main(["train", str(recipe), "--run-dir", str(run_dir), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == before
    # resuming with a different config is refused
    assert main(["train", str(recipe), "seed=5", "--run-dir", str(run_dir), "--resume", "--quiet"]) == 2
    assert "differs" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.yaml"], "recipe 'missing.yaml' does not exist"),
    (["train", "{recipe}", "method=nope"], "allowed values: agm"),
    (["train", "{recipe}", "train.epochs=x"], "train.epochs must be an integer"),
    (["train", "{recipe}", "bogus"], "must look like key=value"),
    (["train"], "train needs a RECIPE"),
    (["train", "--resume"], "--resume needs the run directory"),
    (["train", "--resume", "--run-dir", "{tmp}/none"], "nothing to resume"),
    (["eval", "{tmp}/none"], "is not a run directory"),
    (["demo", "--dataset", "nope"], "demo dataset 'nope' is not registered"),
])
def test_user_errors_exit_2_with_one_line(argv, message, recipe, tmp_path, capsys):
    argv = [a.replace("{recipe}", str(recipe)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("modbal: error:")


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_console_script_entry_point(recipe, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modbal.cli", "train", str(recipe), "optim.lr=abc"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "optim.lr must be a number" in proc.stderr


def test_plugins_are_optional():
    parser = build_parser()
    assert parser.prog == "modbal"
