"""``modbal data`` subcommands through ``register`` on a fresh parser."""
from __future__ import annotations

import argparse

import numpy as np
from test_datasets_avmnist import write_avmnist
from test_datasets_mfeat import write_mfeat

from modbal.datasets import cli


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="modbal")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list(capsys):
    code, out, _ = run(["data", "list"], capsys)
    assert code == 0
    for name in ("avdigits", "avmnist-fsdd", "avmnist", "cremad", "ave", "urfunny", "mosei", "mfeat"):
        assert name in out


def test_check_ok_and_errors(tmp_path, capsys):
    root = write_avmnist(tmp_path / "av")
    code, out, _ = run(["data", "check", str(root), "--format", "avmnist"], capsys)
    assert code == 0 and "avmnist: 10 classes" in out and "audio (1, 112, 112)" in out
    np.save(root / "test_labels.npy", np.full(12, 10))
    code, _, err = run(["data", "check", str(root), "--format", "avmnist"], capsys)
    assert code == 2 and err.count("\n") == 1 and "test_labels.npy: expected labels in [0, 10)" in err
    code, _, err = run(["data", "check", str(tmp_path / "none"), "--format", "mfeat"], capsys)
    assert code == 2 and "none" in err
    mf = write_mfeat(tmp_path / "mf")
    code, out, _ = run(["data", "check", str(mf), "--format", "mfeat"], capsys)
    assert code == 0 and "mfeat: 10 classes; train 1200, val 400, test 400" in out


def test_build_small(tmp_path, capsys, monkeypatch):
    import importlib

    real = importlib.import_module("modbal.datasets.avdigits").avdigits

    def small(**kwargs):
        return real(num_images=100, accents=["en", "en-us"], variants=["m1", "m3", "f1", "f2", "klatt"],
                    pitches=(50,), speeds=(175,), **kwargs)

    monkeypatch.setitem(cli.DATASETS._factories, "avdigits", small)
    code, out, _ = run(["data", "build", "avdigits", "--cache-dir", str(tmp_path), "--quiet"], capsys)
    assert code == 0 and "built in" in out and str(tmp_path) in out
    code, out, _ = run(["data", "build", "avdigits", "--cache-dir", str(tmp_path), "--quiet"], capsys)
    assert code == 0 and "loaded from cache" in out
    code, _, err = run(["data", "build", "avmnist-fsdd", "--quiet"], capsys)
    assert code == 2 and "--root" in err
