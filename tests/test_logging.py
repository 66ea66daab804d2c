"""What a run logs: TensorBoard tags on one global-step axis, hyperparameters, W&B (offline), the
environment that produced it, and the public RunLogger for one's own loop (read by `modbal report`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modbal
from modbal.cli import main
from modbal.config import load_recipe
from modbal.extras import MissingExtraError
from modbal.train import run_experiment

SMALL = ["dataset.num_train=200", "dataset.num_val=100", "dataset.num_test=100", "train.epochs=2",
         "train.batch_size=50", "train.device=cpu", "method=agm"]
STEPS_PER_EPOCH = 4  # 200 / 50


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_tensorboard_tags_share_the_global_step_axis(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard comes with the [tensorboard] extra (make install)")
    run = tmp_path / "run"
    config = load_recipe("synthetic", [*SMALL, "train.tensorboard=true"])
    run_experiment(config, run)
    tags = scalars(run / "tensorboard")
    assert {"train/step/loss", "train/step/acc", "train/step/kappa/fast", "train/epoch/loss", "train/epoch/acc",
            "val/acc", "val/macro_f1", "val/mono_acc/slow"} <= set(tags)
    assert not [t for t in tags if t in ("train/loss", "train/acc")], "per-step and per-epoch values share a tag"
    assert [s for s, _ in tags["train/step/loss"]] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for tag in ("train/epoch/loss", "val/acc", "val/mono_acc/fast"):
        assert [s for s, _ in tags[tag]] == epoch_ends, tag
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert [v for _, v in tags["val/acc"]] == pytest.approx([e["val/acc"] for e in epochs])
    # hyperparameters: a text summary at the start, and beside the test metrics at the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert "hparams/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"method.alpha: {config['method']['alpha']!r}" in text and f"optim.lr: {config['optim']['lr']!r}" in text
    summary = json.loads((run / "summary.json").read_text())
    assert tags["hparam/test/acc"][0][1] == pytest.approx(summary["test"]["acc"])


def test_summary_records_versions_command_and_commit(tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "train.py").write_text("print('my experiment')\n")
    git("add", "train.py", cwd=repo)
    git("commit", "-q", "-m", "experiment", cwd=repo)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["modbal", "train", "synthetic", "seed=3"])
    run_experiment(load_recipe("synthetic", [*SMALL, "train.tensorboard=false"]), repo / "runs" / "r")
    env = json.loads((repo / "runs" / "r" / "summary.json").read_text())["environment"]
    assert env["modbal"] == modbal.__version__ and env["torch"] == torch.__version__
    assert env["command"] == "modbal train synthetic seed=3"
    assert env["git_commit"] == git("rev-parse", "HEAD", cwd=repo) and env["git_dirty"] is False
    assert "environment: " in (repo / "runs" / "r" / "log.txt").read_text()
    source = Path(modbal.__file__).resolve().parent
    if (source.parents[1] / ".git").exists():  # modbal itself imported from a checkout (make install)
        assert env["modbal_commit"] == git("rev-parse", "HEAD", cwd=source)
    outside = tmp_path / "elsewhere"  # not inside a repository: no commit recorded
    outside.mkdir()
    monkeypatch.chdir(outside)
    env = modbal.train.logging.run_environment()
    assert "git_commit" not in env and env["command"].startswith("modbal train")


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="Weights & Biases comes with the [wandb] extra (make install)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run_experiment(load_recipe("synthetic", [*SMALL, "train.tensorboard=false", "train.wandb=true"]), run)
    (record,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()  # W&B's record log; keys and config values are stored as plain strings
    for key in (b"train/step/loss", b"train/epoch/loss", b"val/acc", b"val/mono_acc/slow", b"test/acc", b"agm"):
        assert key in data, key
    run_id = (run / "wandb" / "modbal-run-id").read_text().strip()
    assert record.name == f"run-{run_id}.wandb"


def test_missing_tracker_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'modbal\[tensorboard\]'"):
        run_experiment(load_recipe("synthetic", [*SMALL, "train.tensorboard=true"]), tmp_path / "a")
    summary = run_experiment(load_recipe("synthetic", [*SMALL, "train.epochs=1"]), tmp_path / "b")  # auto: off
    assert summary["status"] == "complete"
    assert "TensorBoard logging off" in (tmp_path / "b" / "log.txt").read_text()


def own_loop(run_dir: Path, seed: int) -> dict:
    """A user's loop with their own model, writing a run directory with modbal.RunLogger."""
    torch.manual_seed(seed)
    model = modbal.MultimodalModel({"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)},
                                   modbal.FUSIONS.create("concat", feature_shapes={"a": (8,), "b": (8,)},
                                                         num_classes=3))
    method = modbal.AGM(alpha=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.randint(0, 3, (64,))
    inputs = {"a": torch.randn(64, 4) + y[:, None], "b": torch.randn(64, 6) + y[:, None]}
    with modbal.RunLogger(run_dir, dataset="mydata", method="agm", modalities=["a", "b"], seed=seed,
                          hparams={"lr": 0.1, "alpha": 1.0}, tensorboard=False) as log:
        for _ in range(2):
            for i in range(0, 64, 16):
                batch, targets = {m: x[i:i + 16] for m, x in inputs.items()}, y[i:i + 16]
                loss = method.loss(model, batch, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                log.log_step({"loss": loss.item(), **method.statistics()})
            metrics = modbal.train.evaluate(model, [(inputs, y)])
            log.log_epoch({"train/loss": loss.item(), **{f"val/{k}": v for k, v in metrics.items()}})
        return log.finish(test=metrics, val=metrics)


def test_run_logger_writes_a_run_that_report_reads(tmp_path):
    summaries = [own_loop(tmp_path / "mine" / f"seed{s}", s) for s in (0, 1)]
    run = tmp_path / "mine" / "seed0"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 9)) and [s["epoch"] for s in steps] == [0] * 4 + [1] * 4
    assert "kappa/a" in steps[0]
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and "val/mono_acc/b" in epochs[0]
    saved = json.loads((run / "summary.json").read_text())
    assert saved["status"] == "complete" and saved["best_epoch"] == 1 and saved["hparams"] == {"lr": 0.1, "alpha": 1.0}
    assert saved["environment"]["torch"] == torch.__version__
    pytest.importorskip("matplotlib", reason="`modbal report` draws its figures with the [report] extra")
    assert main(["report", str(tmp_path / "mine"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| mydata | custom | agm |"))
    mean = sum(s["test"]["acc"] for s in summaries) / 2
    assert f"{100 * mean:.1f}" in row and "| 2 |" in row


def test_run_logger_failure_and_occupied_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with modbal.RunLogger(tmp_path / "r", dataset="d", method="joint", modalities=["a", "b"],
                              tensorboard=False) as log:
            log.log_step({"loss": 1.0})
            raise RuntimeError("diverged")
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: diverged"
    with pytest.raises(FileExistsError, match="already holds a run"):
        modbal.RunLogger(tmp_path / "r", dataset="d", method="joint", modalities=["a", "b"], tensorboard=False)


def test_epoch_tags_keep_validation_prefixes():
    """Validation scores stay under their own prefix, also the ones a method records before it
    changes the weights after validation (``val_before_change/``); the rest goes to train/epoch/."""
    from modbal.train.logging import epoch_tags

    record = {"epoch": 3, "train/loss": 0.5, "lr": 0.1, "val/acc": 0.8, "val_before_change/acc": 0.7}
    assert epoch_tags(record) == {"train/epoch/loss": 0.5, "train/epoch/lr": 0.1, "val/acc": 0.8,
                                  "val_before_change/acc": 0.7}
