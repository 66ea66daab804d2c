"""Two CPU ranks (torchrun, gloo) train exactly like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from modbal.config import load_recipe
from modbal.train import run_experiment

RECIPE = {
    "seed": 1,
    "dataset": {"name": "synthetic", "num_train": 192, "num_val": 48, "num_test": 48, "num_classes": 4,
                "bayes_samples": 50, "modalities": {"a": {"dim": 3, "separation": 4.0, "label_noise": 0.3},
                                                    "b": {"dim": 12, "separation": 3.0}}},
    # no BatchNorm / dropout: rank shards then give exactly the single-process computation
    "model": {"encoders": {"*": {"name": "mlp", "hidden": [16], "out_dim": 8}}, "fusion": {"name": "concat"}},
    "method": {"name": "agm", "alpha": 1.5},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "tensorboard": False},
}


STATISTICS = {"agm": ("kappa/a", "kappa/b", "s/a", "s/b"), "ogm_ge": ("coef/a", "coef/b", "score/a", "score/b"),
              "mla": ("loss/a", "loss/b"),  # MLA: a method-owned step (no DDP wrapper, its own gradient average)
              # PMR: prototypes from the train shards before each epoch; G-Blending: heads, and copies
              # trained in the estimate (online: before every epoch); uni-modal assistance: heads with
              # find_unused_parameters (they run inside the wrapped forward)
              "pmr": ("proto_score/a", "proto_score/b", "proto_ratio/a", "beta/a", "beta/b", "proto_loss/b"),
              "gblend": ("weight/fused", "weight/a", "weight/b", "loss/a", "estimate/b/val_end"),
              "unimodal_assist": ("loss/fused", "loss/a", "loss/b")}
SPECS = {"agm": {"name": "agm", "alpha": 1.5}, "ogm_ge": {"name": "ogm_ge", "alpha": 0.5, "seed": 7},
         "mla": {"name": "mla", "projection": True}, "pmr": {"name": "pmr", "alpha": 1.0},
         "gblend": {"name": "gblend", "mode": "online", "epochs": 1}, "unimodal_assist": {"name": "unimodal_assist"}}
TRAIN = {"unimodal_assist": {"find_unused_parameters": True}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["agm", "ogm_ge", "mla", "pmr", "gblend", "unimodal_assist"])
def test_two_gloo_ranks_match_single_process(tmp_path, method):
    recipe = tmp_path / "recipe.yaml"
    train = {**RECIPE["train"], **TRAIN.get(method, {})}
    recipe.write_text(yaml.safe_dump({**RECIPE, "method": SPECS[method], "train": train}))
    single = run_experiment(load_recipe(recipe), tmp_path / "single")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "modbal.cli", "train", str(recipe), "--run-dir", str(tmp_path / "ddp"), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
    a, b = rows("single"), rows("ddp")
    assert len(a) == len(b) == 2 * 192 // 32
    for ra, rb in zip(a, b):
        for key in (*STATISTICS[method], "loss", *(("acc",) if "acc" in ra else ())):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    wa = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)
    assert ddp["test"]["acc"] == pytest.approx(single["test"]["acc"], abs=1 / 48 + 1e-9)
    assert ddp["sizes"] == single["sizes"]
    # rank 0 alone wrote the files: one record per step
    assert not list((tmp_path / "ddp").glob("*rank*"))


# torchrun's worker: rank 1 stops (SIGSTOP, as a hung or paused process) before its third batch
STALLER = """
import os, signal, sys, time
import modbal.train.data as data
original = data.ShardedBatchSampler.__iter__
def stalling(self):
    for i, batch in enumerate(original(self)):
        if self.rank == 1 and i == 2:
            with open(os.environ["STOPPED"], "w") as f:
                f.write(f"{os.getpid()} {time.time()}")
            os.kill(os.getpid(), signal.SIGSTOP)
        yield batch
data.ShardedBatchSampler.__iter__ = stalling
from modbal.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_stopped_rank_fails_the_run_within_dist_timeout(tmp_path):
    import signal
    import time

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    script = tmp_path / "staller.py"
    script.write_text(STALLER)
    stopped, run = tmp_path / "stopped", tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STOPPED": str(stopped)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         "train", str(recipe), "train.dist_timeout_s=3", "--run-dir", str(run), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rank1 = None
    try:
        deadline = time.time() + 240
        while not (run / "summary.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        found = time.time()
        pid, stopped_at = stopped.read_text().split()
        rank1 = int(pid)
    finally:
        if rank1 is not None:
            os.kill(rank1, signal.SIGKILL)  # the stopped rank never wakes up: torchrun can then end
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "train.dist_timeout_s=3" in summary["error"], summary
    waited = found - float(stopped_at)
    assert 2.5 < waited < 3 + 20, waited  # the survivor gave up after the timeout, not 30 minutes
    assert "modbal: training stopped: process 0 of 2: another process did not answer within " \
           "train.dist_timeout_s=3 s" in err, err[-3000:]
    assert proc.returncode != 0 and not (run / ".lock").exists()
