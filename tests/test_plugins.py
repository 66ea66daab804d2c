"""Plug-ins through the command line: docs/guide/extending.md's package, `imports:`, `--import` on every
command (also in `sweep --jobs` workers), and the `modbal.plugins` entry-point group."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modbal.cli import main
from modbal.plugins import PluginError, split_import_args

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "guide" / "extending.md"
FILE_BLOCK = re.compile(r"^File `([^`]+)`:\n\n```(?:python|yaml)\n(.*?)^```", re.M | re.S)


def write_doc_package(folder: Path) -> list[str]:
    """Write every file the extending page shows into ``folder``; return their paths."""
    files = FILE_BLOCK.findall(DOC.read_text())
    for rel, text in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return [rel for rel, _ in files]


def modbal(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script (as a user runs it: the current folder is not on sys.path by
    itself), or ``python -m modbal.cli`` where there is none."""
    script = Path(sys.executable).with_name("modbal")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "modbal.cli"]
    environ = {k: v for k, v in os.environ.items() if k not in ("MODBAL_IMPORTS", "PYTHONPATH")}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**environ, **(env or {})})


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("userproject")
    written = write_doc_package(folder)
    assert {"mypkg/__init__.py", "mypkg/dropout.py", "mypkg/fusion.py", "mypkg/data.py", "mypkg.yaml"} <= set(written)
    return folder


def test_split_import_args():
    assert split_import_args(["--import", "a.b", "train", "r.yaml", "--import=c", "seed=1"]) == (
        ["a.b", "c"], ["train", "r.yaml", "seed=1"])
    assert split_import_args(["train", "--", "--import", "x"]) == ([], ["train", "--", "--import", "x"])
    with pytest.raises(PluginError, match="--import needs a MODULE"):
        split_import_args(["train", "--import"])


@pytest.mark.slow
def test_recipe_imports_then_eval_without_them(project):
    done = modbal("train", "mypkg.yaml", "--run-dir", "runs/mine", "--quiet", cwd=project)
    assert done.returncode == 0, done.stderr
    run = project / "runs" / "mine"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["imports"] == ["mypkg"]
    assert config["method"] == {"name": "modality_dropout", "p": 0.3}
    assert config["model"]["fusion"] == {"name": "weighted_mean"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["dataset"] == "two_views"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert all(0.0 <= s["dropped"] <= 1.0 for s in steps) and any(s["dropped"] > 0 for s in steps)
    # later commands on the run (eval, resume, analyze) import the plug-in from config.yaml
    evaluated = modbal("eval", "runs/mine", "--json", cwd=project)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["acc"] == pytest.approx(summary["test"]["acc"])


@pytest.mark.slow
def test_import_option_reaches_sweep_workers(project):
    common = ["dataset.num_train=300", "dataset.num_val=100", "dataset.num_test=100", "train.epochs=1",
              "train.device=cpu", "train.tensorboard=false", "model.fusion=weighted_mean"]
    # a built-in recipe that knows nothing of mypkg; two spawned workers train the runs
    swept = modbal("--import", "mypkg", "sweep", "synthetic", "method=modality_dropout", "method.p=0.1,0.5",
                   *common, "--jobs", "2", "--out", "runs/sweep", "--no-report", cwd=project)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    runs = sorted(p.parent for p in (project / "runs/sweep").rglob("summary.json"))
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] == "complete"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["imports"] == ["mypkg"] and config["method"]["name"] == "modality_dropout"
        assert config["model"]["fusion"]["name"] == "weighted_mean"


def test_plugin_errors_are_one_line(project, monkeypatch, capsys):
    bad = modbal("--import", "no_such_pkg_here", "data", "list", cwd=project)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "no_such_pkg_here" in bad.stderr and "PYTHONPATH" in bad.stderr
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (project / "bad.yaml").write_text("imports: [no_such_pkg_here]\n")
    assert main(["train", "bad.yaml"]) == 2
    assert "imports: importing 'no_such_pkg_here' failed" in capsys.readouterr().err
    assert main(["train", "synthetic", "imports=mypkg"]) == 2
    assert "must be a list of module names" in capsys.readouterr().err


def test_entry_point_plugins(project, tmp_path):
    site = tmp_path / "site"
    write_doc_package(site)
    info = site / "mypkg_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modbal.plugins]\nmypkg = mypkg\nbroken = no_such_module_xyz\n")
    probe = ("import warnings, json, modbal\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    names = modbal.METHODS.names(), modbal.FUSIONS.names(), modbal.DATASETS.names()\n"
             "from modbal.plugins import loaded_plugins\n"
             "messages = [str(w.message) for w in caught]\n"
             "print(json.dumps({'names': names, 'plugins': loaded_plugins(), 'warnings': messages}))\n")
    environ = {k: v for k, v in os.environ.items() if k != "MODBAL_IMPORTS"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    methods, fusions, datasets = result["names"]
    assert "modality_dropout" in methods and "weighted_mean" in fusions and "two_views" in datasets
    assert result["plugins"] == {"mypkg": "mypkg"}
    assert any("'broken'" in w and "no_such_module_xyz" in w for w in result["warnings"])
