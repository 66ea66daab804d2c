"""Two CPU ranks (torchrun, gloo) train exactly like one process with the same global batch, and a
fault in one process stops the whole run promptly, the summary naming its cause."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from _method_runs import assert_same_steps_and_weights, mlp_model, synthetic, torchrun, train_single_and_ddp

RECIPE = {
    "seed": 1,
    "dataset": synthetic(192, 48, 48),
    # no BatchNorm / dropout: rank shards then give exactly the single-process computation
    "model": mlp_model(),
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
    train = {**RECIPE["train"], **TRAIN.get(method, {})}
    single, ddp = train_single_and_ddp(tmp_path, {**RECIPE, "method": SPECS[method], "train": train})
    assert_same_steps_and_weights(
        tmp_path, lambda row: (*STATISTICS[method], "loss", *(("acc",) if "acc" in row else ())), 2 * 192 // 32)
    assert ddp["test"]["acc"] == pytest.approx(single["test"]["acc"], abs=1 / 48 + 1e-9)
    assert ddp["sizes"] == single["sizes"]
    # rank 0 alone wrote the files: one record per step
    assert not list((tmp_path / "ddp").glob("*rank*"))


# torchrun's worker: the data of process 1 alone holds NaN in modality b of every sample of $SPLIT
POISONER = """
import os, sys
from modbal.registry import DATASETS
real = DATASETS.get("synthetic")
def poisoned(**kw):
    splits = real(**kw)
    if os.environ["RANK"] == "1":
        getattr(splits, os.environ["SPLIT"]).inputs["b"][:, 0] = float("nan")
    return splits
DATASETS._factories["synthetic"] = poisoned
from modbal.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("split, words", [("train", "training data"), ("val", "validation data")])
def test_a_data_fault_on_another_rank_fails_the_run_with_its_cause(tmp_path, split, words):
    script, run = tmp_path / "poisoner.py", tmp_path / "ddp"
    script.write_text(POISONER)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "method": {"name": "joint"}}))
    started = time.time()
    proc = torchrun(str(script), "train", str(recipe), "train.dist_timeout_s=600", "--run-dir", str(run), "--quiet",
                    SPLIT=split)
    took = time.time() - started
    cause = f"the {words} holds a non-finite value (nan) in modality 'b'"
    assert proc.returncode != 0 and f"modbal: training stopped: {cause}" in proc.stderr, proc.stderr[-3000:]
    assert took < 120, took  # every process ended: none waited for train.dist_timeout_s
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["error"].startswith(f"NonFiniteInputError: process 1 of 2: {cause}"), summary["error"]


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
