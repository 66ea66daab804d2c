"""Fault injection through the command line: nothing that comes from disk or from another process
is trusted (checkpoints, run directories, data values), and every fault ends in one clear line."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from test_datasets_affect import split, write_pickle
from test_datasets_ave import write_ave
from test_datasets_cremad import write_cremad

from modbal.cli import main
from modbal.registry import DATASETS
from modbal.train.checkpoint import load_checkpoint, set_rng_state

TINY = {
    "dataset": {"name": "synthetic", "num_train": 96, "num_val": 32, "num_test": 32, "num_classes": 3,
                "bayes_samples": 50,
                "modalities": {"a": {"dim": 3, "separation": 4.0}, "b": {"dim": 6, "separation": 3.0}}},
    "model": {"encoders": {"*": {"name": "mlp", "hidden": [8], "out_dim": 4}}, "fusion": "concat"},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "tensorboard": False},
}

# `python -c PAUSER modbal-args...`: the modbal command, holding still at the start of epoch
# $PAUSE_EPOCH (after the run directory is locked) until the file $GO exists; $PAUSED marks the wait
PAUSER = textwrap.dedent("""
    import os, sys, time
    import modbal.train.data as data
    original = data.ShardedBatchSampler.__iter__
    def paused(self):
        if self.epoch >= int(os.environ.get("PAUSE_EPOCH", "0")):
            open(os.environ["PAUSED"], "a").close()
            deadline = time.time() + 120
            while not os.path.exists(os.environ["GO"]) and time.time() < deadline:
                time.sleep(0.05)
        yield from original(self)
    data.ShardedBatchSampler.__iter__ = paused
    from modbal.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def one_error_line(capsys, prefix="modbal: error:"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(prefix), err
    return err


def summary_of(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (Path(run_dir) / "epochs.jsonl").read_text().splitlines()]


# -- checkpoints --------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls ``open(path, "w")``: the file appears if the payload runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_holding_a_pickle_payload_is_refused(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 0
    marker = tmp_path / "payload-ran"
    for name in ("best", "last"):
        state = load_checkpoint(run / "checkpoints" / f"{name}.pt")
        state["model"]["extra"] = Payload(marker)
        torch.save(state, run / "checkpoints" / f"{name}.pt")
    capsys.readouterr()

    assert main(["eval", str(run)]) == 2
    err = one_error_line(capsys)
    assert "refused to load checkpoint" in err and str(run / "checkpoints" / "best.pt") in err
    assert main(["analyze", "shape", str(run)]) == 2
    assert "refused to load checkpoint" in capsys.readouterr().err
    (run / "summary.json").unlink()  # an interrupted run: resuming reads last.pt
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert str(run / "checkpoints" / "last.pt") in err and "remove it and resume again" in err
    assert not marker.exists()
    # the payload is real: an unsafe load runs it
    torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert marker.exists()


def test_checkpoints_of_the_previous_format_still_load(recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["format"] == 2
    np.random.seed(5)
    # format 1 kept numpy's state as its (name, uint32 array, ...) tuple and python's as a tuple
    state.update(format=1, rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                "python": __import__("random").getstate()})
    old = tmp_path / "old.pt"
    torch.save(state, old)
    expected = np.random.rand(3)
    set_rng_state(load_checkpoint(old)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupted_last_checkpoint_names_the_file_and_the_way_out(recipe, tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 0
    reference = summary_of(run)
    (run / "summary.json").unlink()  # as if killed before the end
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"\x80\x04not a checkpoint"}[damage])
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert str(last) in err and f"remove it and resume again to resume from {str(best)!r}" in err
    assert "unreadable" in err and "refused" not in err
    best.unlink()
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 2
    assert "remove it and resume again to start the run over from scratch" in one_error_line(capsys)
    # doing as told works: a kill during a write also left temporaries, which the resume removes
    last.unlink()
    (run / "checkpoints" / ".last.pt.k3j_9x2a.tmp").write_bytes(b"half a checkpoint")
    (run / ".summary.json.ab12cd34.tmp").write_text("{")
    (run / ".notes.tmp").write_text("mine")  # not modbal's: kept
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 0
    assert summary_of(run)["test"] == reference["test"]
    assert sorted(p.name for p in run.rglob("*.tmp")) == [".notes.tmp"]
    assert "removed 2 temporary files left by an interrupted write" in (run / "log.txt").read_text()


def test_resume_from_best_when_last_is_gone(recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "train.epochs=3", "--run-dir", str(run), "--quiet"]) == 0
    reference = summary_of(run)
    (run / "summary.json").unlink()
    (run / "checkpoints" / "last.pt").unlink()
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 0
    assert "no last.pt: resuming from best.pt" in (run / "log.txt").read_text()
    assert summary_of(run)["test"] == reference["test"] and _epochs(run) == [0, 1, 2]


def test_a_run_killed_before_its_config_was_written_can_start_again(recipe, tmp_path):
    """What a kill between the lock and ``config.yaml`` leaves (a stale lock, an empty
    ``checkpoints/``, a half-written config) holds no run: starting there again trains."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname()}))
    (run / ".config.yaml.abc123.tmp").write_text("seed: ")
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 0
    assert summary_of(run)["status"] == "complete"


# -- the run directory's lock -------------------------------------------------------------------
def _start(args, tmp_path, pause_epoch=0):
    env = {**os.environ, "GO": str(tmp_path / "go"), "PAUSED": str(tmp_path / "paused"),
           "PAUSE_EPOCH": str(pause_epoch), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", PAUSER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _first_to_exit(procs, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                return p
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError("neither process exited")


def _race(args, tmp_path, pause_epoch=0):
    """Start two identical commands at once; the one that gets the lock holds still (at epoch
    ``pause_epoch``) until the other has exited. Returns (winner, loser)."""
    (tmp_path / "go").unlink(missing_ok=True)
    (tmp_path / "paused").unlink(missing_ok=True)
    a, b = _start(args, tmp_path, pause_epoch), _start(args, tmp_path, pause_epoch)
    loser = _first_to_exit([a, b])
    return (b if loser is a else a), loser


def _refused_naming(loser, winner):
    err = loser.stderr.read().strip()
    assert loser.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"is in use by pid {winner.pid} on host" in err, err


def test_concurrent_starts_and_concurrent_resumes_one_proceeds(recipe, tmp_path):
    run = tmp_path / "run"
    # two starts at once: one trains epoch 0, checkpoints and holds still in epoch 1; the other stops
    winner, loser = _race(["train", str(recipe), "train.epochs=3", "--run-dir", str(run), "--quiet"], tmp_path,
                          pause_epoch=1)
    _refused_naming(loser, winner)
    deadline = time.time() + 120
    while not (tmp_path / "paused").exists() and time.time() < deadline:
        time.sleep(0.05)
    winner.send_signal(signal.SIGKILL)  # killed mid-run: its lock file stays behind, stale
    winner.wait(timeout=60)
    assert json.loads((run / ".lock").read_text())["pid"] == winner.pid
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3 and _epochs(run) == [0]

    # two resumes at once: one takes the stale lock over and finishes the run, the other stops
    killed = winner
    winner, loser = _race(["train", "--resume", "--run-dir", str(run), "--quiet"], tmp_path, pause_epoch=1)
    _refused_naming(loser, winner)
    (tmp_path / "go").touch()
    assert winner.wait(timeout=120) == 0, winner.stderr.read()
    assert _epochs(run) == [0, 1, 2] and summary_of(run)["status"] == "complete"  # no epoch trained twice
    assert f"took over the lock of pid {killed.pid}" in (run / "log.txt").read_text()
    assert not (run / ".lock").exists()  # released at the end


# -- data values --------------------------------------------------------------------------------
def _poisoned(monkeypatch, split_name, index, modality, value):
    """The synthetic dataset with one input value of one sample replaced."""
    real = DATASETS.get("synthetic")

    def poisoned(**kw):
        splits = real(**kw)
        getattr(splits, split_name).inputs[modality][index, 0] = value
        return splits
    monkeypatch.setitem(DATASETS._factories, "synthetic", poisoned)


@pytest.mark.parametrize("split_name, words", [("val", "validation data"), ("test", "test data")])
def test_nonfinite_evaluation_data_fails_the_run(recipe, tmp_path, capsys, monkeypatch, split_name, words):
    _poisoned(monkeypatch, split_name, 5, "b", float("inf"))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 1
    err = one_error_line(capsys, "modbal: training stopped:")
    assert words in err and "modality 'b', sample 5" in err and "(inf)" in err
    summary = summary_of(run)
    assert summary["status"] == "failed" and "sample 5" in summary["error"]
    if split_name == "test":  # re-evaluating the run's best checkpoint stops the same way
        assert main(["eval", str(run)]) == 1
        assert "test data holds a non-finite value (inf) in modality 'b', sample 5" in \
            one_error_line(capsys, "modbal: evaluation stopped:")


def test_nonfinite_validation_logits_fail_the_run(recipe, tmp_path, capsys, monkeypatch):
    from modbal.train import run as run_module

    build = run_module.build_model_from_config

    def overflowing(config, data):  # finite inputs, but the model's evaluation outputs overflow
        model = build(config, data)
        model.fusion.register_forward_hook(lambda m, args, out: out if m.training else out * float("inf"))
        return model
    monkeypatch.setattr(run_module, "build_model_from_config", overflowing)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 1
    err = one_error_line(capsys, "modbal: training stopped:")
    assert "non-finite validation metrics after epoch 0" in err and "loss=nan" in err
    assert summary_of(run)["status"] == "failed"


@pytest.mark.parametrize("method", ["joint", "agm"])
def test_nonfinite_training_input_names_modality_and_sample(recipe, tmp_path, capsys, monkeypatch, method):
    _poisoned(monkeypatch, "train", 17, "b", float("nan"))
    assert main(["train", str(recipe), f"method={method}", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 1
    err = one_error_line(capsys, "modbal: training stopped:")
    assert "training data holds a non-finite value (nan) in modality 'b', sample 17" in err
    assert "learning rate" not in err and "alpha" not in err and "modality 'a'" not in err


@pytest.mark.parametrize("override, message", [
    ("dataset.num_train=0", "num_train must be >= 1, got 0"),
    ("dataset.num_test=-5", "num_test must be >= 1, got -5"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.momentum=5", "optim.momentum must be in [0, 1), got 5"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s must be > 0"),
    ("train.drop_last=true train.batch_size=128", "train.drop_last=true leaves no training batch"),
])
def test_bad_sizes_and_numbers_are_config_errors_before_any_directory(recipe, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert main(["train", str(recipe), *override.split(), "--run-dir", str(run), "--quiet"]) == 2
    assert message in one_error_line(capsys)
    assert not run.exists()


def _affect(path, change=None):
    data = {"train": split(6, [0, 1, 1, 0, 1, 0]), "valid": split(4, [1, 0, 1, 0]), "test": split(3, [0, 0, 1])}
    if change:
        change(data)
    return write_pickle(path, data)


AFFECT_RECIPE = {"dataset": {"name": "urfunny"}, "model": {"encoders": {"*": {"name": "mlp", "hidden": [4]}},
                                                           "fusion": "concat"},
                 "train": {"epochs": 1, "batch_size": 2, "device": "cpu", "tensorboard": False}}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["test"].update(text=np.zeros((3, 6, 5), np.float32)),
     "modality 'text' has shape per sample (6, 5) in the test split but (6, 4) in train"),
    (lambda d: d["valid"].update(audio=np.zeros((4, 9, 5), np.float32)),
     "modality 'audio' has shape per sample (9, 5) in the val split but (6, 5) in train"),
    (lambda d: d.update(test={k: v[:0] for k, v in d["test"].items()}), "the test split holds no samples"),
])
def test_data_check_and_train_refuse_splits_that_disagree(tmp_path, capsys, change, message):
    path = _affect(tmp_path / "humor.pkl", change)
    assert main(["data", "check", str(path), "--format", "urfunny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("modbal: note: urfunny data is a Python pickle")  # said before unpickling
    assert len(err) == 2 and err[1].startswith("modbal: error:") and message in err[1] and "humor.pkl" in err[1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**AFFECT_RECIPE, "dataset": {"name": "urfunny", "root": str(path)}}))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 2
    assert message in one_error_line(capsys) and not run.exists()


def test_affect_pickle_naming_other_objects_is_refused(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    path = _affect(tmp_path / "humor.pkl", lambda d: d["train"].update(id=Payload(marker)))
    assert main(["data", "check", str(path), "--format", "urfunny"]) == 2
    err = capsys.readouterr().err
    assert "refused: the pickle holds a Python object (io.open)" in err and not marker.exists()


def test_data_check_full_reads_every_item(tmp_path, capsys):
    root = write_cremad(tmp_path / "cremad")
    wav = root / "AudioWAV" / "1001_IEO_HAP_HI.wav"  # the middle training clip
    wav.write_bytes(wav.read_bytes()[:-2000])
    assert main(["data", "check", str(root), "--format", "cremad"]) == 0  # first and last items only
    assert "--full reads every item" in capsys.readouterr().out
    assert main(["data", "check", str(root), "--format", "cremad", "--full"]) == 2
    err = one_error_line(capsys)
    assert str(wav) in err and "truncated: the header announces 19200 frames" in err
    wav.write_bytes(b"")
    assert main(["data", "check", str(root), "--format", "cremad", "--full"]) == 2
    assert "1001_IEO_HAP_HI.wav" in one_error_line(capsys)
    write_cremad(tmp_path / "c2")
    jpg = tmp_path / "c2" / "Image-01-FPS" / "1001_IEO_HAP_HI" / "000001.jpg"
    jpg.write_bytes(b"")
    assert main(["data", "check", str(tmp_path / "c2"), "--format", "cremad", "--full"]) == 2
    assert "000001.jpg: cannot read as a JPEG frame" in one_error_line(capsys)


def test_data_check_reads_values(tmp_path, capsys):
    root = write_ave(tmp_path / "ave")
    with h5py.File(root / "audio_feature.h5", "r+") as f:
        f["avadataset"][9, 4, 7] = np.nan  # the first test clip (row 9)
    assert main(["data", "check", str(root), "--format", "ave"]) == 2
    assert "item 0 of the test split: modality 'audio' holds NaN or infinite values" in one_error_line(capsys)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataset_error_mid_training_is_one_line(tmp_path, capsys, workers):
    root = write_cremad(tmp_path / "cremad")
    wav = root / "AudioWAV" / "1001_IEO_HAP_HI.wav"
    wav.write_bytes(wav.read_bytes()[:30])  # the header cut: unreadable when the item is read
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset": {"name": "cremad", "root": str(root), "image_size": 8},
        "model": {"encoders": {"*": {"name": "mlp", "hidden": [4]}}, "fusion": "concat"},
        "train": {"epochs": 1, "batch_size": 3, "device": "cpu", "tensorboard": False, "num_workers": workers,
                  "val_fraction": 0.3}}))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"modbal: error: {wav}: cannot read as a PCM WAV file")
    assert summary_of(run)["status"] == "failed"


# -- reports and the console ----------------------------------------------------------------------
def test_report_markdown_escapes_names(recipe, tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    assert main(["train", str(recipe), "--run-dir", str(run), "--quiet"]) == 0
    summary = summary_of(run)
    summary["method"] = "<script>alert(1)</script>"
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--title", "<b>x</b>"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "<script>" not in md and "<b>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md


def test_console_best_epoch_matches_summary_and_overrides_follow_options(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--quiet", "seed=4", "--run-dir", str(run), "train.epochs=3"]) == 0
    summary = summary_of(run)
    assert summary["seed"] == 4 and summary["epochs"] == 3
    assert f"best epoch {summary['best_epoch']};" in capsys.readouterr().out
    assert f"done: best epoch {summary['best_epoch']} " in (run / "log.txt").read_text()
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--quiet", "--bogus"])


def test_agm_names_the_modality_whose_score_is_not_finite():
    from modbal.methods.agm import AGM

    agm = AGM(alpha=1.0)
    agm._modalities = ("a", "b")
    with pytest.raises(FloatingPointError, match=r"non-finite statistics for modality 'b' at step 0"):
        agm._decide(torch.tensor([0.7, float("nan")], dtype=torch.float64), torch.tensor([0.5, 0.5]))


def test_lock_without_flock_falls_back_to_pid_and_host(tmp_path, monkeypatch):
    import errno
    import socket

    import modbal.train.lock as lock

    class NoFlock:  # a file system whose flock fails (some network mounts)
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd, operation):
            raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lock, "fcntl", NoFlock)
    held = lock.RunDirLock(tmp_path).acquire()
    with pytest.raises(lock.RunDirLocked, match=f"in use by pid {os.getpid()} on host"):
        lock.RunDirLock(tmp_path).acquire()
    held.release()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    taken = lock.RunDirLock(tmp_path).acquire()  # its process is gone: a stale lock, taken over
    assert taken.stale["pid"] == gone.pid and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    taken.release()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # unknown: counts as alive
    with pytest.raises(lock.RunDirLocked, match="pid 1 on host elsewhere"):
        lock.RunDirLock(tmp_path).acquire()
