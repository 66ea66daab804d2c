"""``run_experiment(config, run_dir)``: one training run from a resolved config to a run directory.

The run directory (see docs/design.md, "The runner's files")::

    config.yaml       the exact resolved config
    steps.jsonl       one record per training step: epoch, step, loss, acc, lr, method statistics
    epochs.jsonl      one per epoch: train/loss, train/acc, val/<metric>, lr, time_s
    summary.json      dataset, method, fusion, seed, modalities, best_epoch, val, test, elapsed_s, status,
                      test_confusion (cm[t][p] on the test split) and class_names
    checkpoints/last.pt, checkpoints/best.pt
    log.txt, tensorboard/ (when tensorboard is installed)

Launched under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with DistributedDataParallel
(gloo on CPU, NCCL on CUDA); rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
import yaml

from .. import distributed as mdist
from ..build import build_model
from ..config import TRAIN_DEFAULTS, ConfigError, diff, dump, encoder_specs, load_yaml, resolve
from ..methods.base import predictor
from ..registry import DATASETS, METHODS
from .checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from .data import (
    EvalBatchSampler,
    ExampleSet,
    FiniteInputs,
    ShardedBatchSampler,
    TaggedCollate,
    carve_validation,
    collate_of,
    make_loader,
)
from .evaluate import evaluate, evaluate_with_confusion
from .lock import RunDirLock, RunDirLocked, describe, live_holder
from .logging import RunFiles, run_environment
from .loop import LoopState, build_optimizer, build_scheduler, fit, seed_everything, set_deterministic

RUN_FILES = ("config.yaml", "steps.jsonl", "epochs.jsonl", "summary.json", "checkpoints", "log.txt")
# files the runner writes through a temporary (``.<name>.<random>.tmp``): stale ones are removed on start
TEMPORARIES = ("config.yaml", "steps.jsonl", "epochs.jsonl", "summary.json")
CHECKPOINTS = ("last.pt", "best.pt")


# -- pieces -------------------------------------------------------------------------------------
def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA when available; under torchrun, CUDA devices follow ``LOCAL_RANK``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec!r} but CUDA is not available on this machine; use device=cpu")
        if spec == "cuda":
            spec = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        device = torch.device(spec)
        torch.cuda.set_device(device)
        return device
    return torch.device(spec)


class DistributedTimeout(RuntimeError):
    """Another process of a distributed run did not answer within ``train.dist_timeout_s``."""


class AnotherProcessFailed(DistributedTimeout):
    """Another process of a distributed run failed first (the message is its error); this one stops too."""


_RUNS = itertools.count()  # runs this process took part in: each one's key for its first failure


def _first_failure(key: str, error: BaseException) -> tuple[bool, str]:
    """(whether ``error`` is the run's failure, the run's failure reason ``"ErrorType: message"``). Under
    torchrun: the first failing process's error, kept in the process group's store. A process that
    fails alone (bad data in its shard) leaves the others waiting in a collective operation that then
    breaks or times out; they report why it stopped, not the broken connection. The same error on
    every process stays each one's own."""
    def reason(rank: int, name: str, message: str) -> str:
        return f"{name}: process {rank} of {mdist.world_size()}: {message}" if rank else f"{name}: {message}"

    mine = [mdist.rank(), type(error).__name__, str(error)]
    if mdist.is_distributed():
        try:
            store = dist.distributed_c10d._get_default_store()
            first = json.loads(store.compare_set(key, "", json.dumps(mine)).decode())
        except Exception:  # the store went with its host: this process's own reason
            first = mine
        if first[1:] != mine[1:]:
            return False, reason(*first)
    return True, reason(*mine)


def _launch_settings(config: Mapping[str, Any] | None, run_dir: str | Path | None,
                     resume: bool) -> tuple[str, float]:
    """(``train.device``, ``train.dist_timeout_s``) before the config is resolved: from ``config``,
    or from the run directory's ``config.yaml`` when resuming without one (defaults otherwise)."""
    source: Any = config
    if source is None and resume and run_dir is not None:
        try:
            source = load_yaml((Path(run_dir) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            source = None
    train = source.get("train") if isinstance(source, Mapping) else None
    train = train if isinstance(train, Mapping) else {}
    timeout = train.get("dist_timeout_s", TRAIN_DEFAULTS["dist_timeout_s"])
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        timeout = TRAIN_DEFAULTS["dist_timeout_s"]  # validation names the bad value once the group is up
    return str(train.get("device", "auto")), float(timeout)


def _init_distributed(device_spec: str, timeout_s: float) -> bool:
    """Start the process group when launched by torchrun with several processes; a collective
    operation waiting longer than ``timeout_s`` for another process fails (:class:`DistributedTimeout`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or mdist.is_distributed():
        return False
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _timeout_error(error: BaseException, timeout_s: float) -> DistributedTimeout | None:
    """A clear :class:`DistributedTimeout` for a collective operation that timed out (else None)."""
    if isinstance(error, DistributedTimeout):
        return error
    if not isinstance(error, RuntimeError) or not re.search(r"timed out|timeout", str(error), re.IGNORECASE):
        return None
    return DistributedTimeout(f"process {mdist.rank()} of {mdist.world_size()}: another process did not answer "
                              f"within train.dist_timeout_s={timeout_s:g} s (it stopped, hung or died); "
                              f"stopping this one too")


def check_finite_metrics(metrics: dict[str, float], split: str, where: str = "") -> dict[str, float]:
    """``metrics`` unchanged when finite; otherwise ``FloatingPointError`` naming the split and metrics
    (non-finite logits give a non-finite loss: the inputs were checked finite, so the model diverged)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        shown = ", ".join(f"{k}={metrics[k]}" for k in bad[:4])
        raise FloatingPointError(f"non-finite {split} metrics{where} ({shown}): the model's outputs on the {split} "
                                 f"data (whose inputs are finite) are not finite; lower the learning rate or the "
                                 f"method's strength")
    return metrics


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() <= 64:
        return value.tolist()
    return repr(value)


def validation_seed(config: Mapping[str, Any]) -> int:
    """The seed of the validation carve-out: ``train.val_seed``, else the run's seed."""
    val_seed = config["train"]["val_seed"]
    return int(config["seed"] if val_seed is None else val_seed)


def build_data(config: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset's splits (validation carved from train, seeded, when the dataset has none).

    Raises ConfigError (one line) for any problem with the dataset: bad arguments, a file in the
    wrong format, an empty split, input shapes that differ between splits."""
    spec = dict(config["dataset"])
    name = spec.pop("name")
    try:
        splits = DATASETS.create(name, **spec)
        splits.check()  # no empty split, the same input shapes in every split
        train, val, test = splits.train, splits.val, splits.test
        carved = val is None
        if carved:
            train, val = carve_validation(train, config["train"]["val_fraction"], validation_seed(config))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"dataset {name}: {e}") from None
    return {"splits": splits, "train": train, "val": val, "test": test, "carved_val": carved,
            "modalities": splits.modalities, "class_names": splits.class_names,
            "input_shapes": splits.input_shapes,
            "collate_fn": collate_of(splits.train, splits.val, splits.test)}


def build_model_from_config(config: Mapping[str, Any], data: Mapping[str, Any]) -> torch.nn.Module:
    """The model as the run trains it: encoders, fusion and the method's own modules
    (``method.attach``), so a checkpoint's state dict loads into it wherever it is rebuilt."""
    encoders = encoder_specs(config, data["modalities"])
    try:
        model = build_model(data["input_shapes"], len(data["class_names"]), encoders, config["model"]["fusion"])
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model: {e}") from None
    try:
        configured_method(config, data).attach(model)
    except ValueError as e:
        raise ConfigError(f"method {config['method']['name']}: {e}") from None
    return model


def build_method(config: Mapping[str, Any]) -> Any:
    spec = dict(config["method"])
    name = spec.pop("name")
    return METHODS.create(name, **spec)


def configured_method(config: Mapping[str, Any], data: Mapping[str, Any]) -> Any:
    """:func:`build_method`, told the run it trains in (``method.configure``: UMT checks and loads its
    teacher runs there)."""
    method = build_method(config)
    method.configure(config, data["input_shapes"])
    return method


def default_run_dir(config: Mapping[str, Any], root: str | Path = "runs") -> Path:
    """``runs/<dataset>/<fusion>/<method>-seed<seed>-<YYYYmmdd-HHMMSS>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / config["dataset"]["name"] / config["model"]["fusion"]["name"] / \
        f"{config['method']['name']}-seed{config['seed']}-{stamp}"


def _holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's files (an empty ``checkpoints/``, left by a run killed
    before its ``config.yaml`` was written, holds nothing)."""
    if not run_dir.is_dir():
        return False
    return any((run_dir / f).is_file() or (run_dir / f).is_dir() and any((run_dir / f).iterdir())
               for f in RUN_FILES)


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    out.pop("run_dir", None)
    return out


def _broadcast(value: Any) -> Any:
    if not mdist.is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if mdist.is_distributed():
        dist.barrier()


# -- the run ------------------------------------------------------------------------------------
def run_experiment(config: Mapping[str, Any] | None, run_dir: str | Path | None = None,
                   resume: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Train, select the best epoch on validation, test it once, and return the summary.

    The run directory is locked (``RUN_DIR/.lock``, :mod:`modbal.train.lock`) from before its first
    file is written until the run ends, so a second run or resume of the same directory stops
    with a :class:`ConfigError` naming the holder.

    Args:
        config: a recipe dict (resolved and validated here; missing keys take defaults). May be
            None with ``resume=True``: the run directory's ``config.yaml`` is used.
        run_dir: where to write; default ``config["run_dir"]`` or :func:`default_run_dir`.
        resume: continue the run in ``run_dir`` from ``checkpoints/last.pt`` (``best.pt`` when
            there is no ``last.pt``) exactly (same weights, optimizer, scheduler, method state,
            RNG and data position). A given config must equal the saved one. A finished run is
            returned as is.
        quiet: no progress bars or console log lines (files are written either way).

    Raises:
        ConfigError: bad config, dataset or checkpoint, an occupied or locked run directory, or
            nothing to resume. FloatingPointError: non-finite training, validation or test values.
        DistributedTimeout: another process did not answer within ``train.dist_timeout_s``, or
            (:class:`AnotherProcessFailed`) failed first, its error named in the message and summary.
    """
    device_spec, timeout = _launch_settings(config, run_dir, resume)
    started = _init_distributed(device_spec, timeout)
    try:
        summary = _run(config, run_dir, resume, quiet)
        _barrier()  # every rank done (rank 0 writes last) before the group is torn down
        return summary
    except RuntimeError as e:
        timed_out = _timeout_error(e, timeout) if started else None
        if timed_out is None:
            raise
        raise timed_out from None
    finally:
        if started:
            dist.destroy_process_group()


def _resolve_run(config: Mapping[str, Any] | None, run_dir: str | Path | None,
                 resume: bool) -> tuple[dict[str, Any], Path]:
    if config is not None:
        config = resolve(config, source="config")
    if run_dir is None and config is not None and config.get("run_dir"):
        run_dir = config["run_dir"]
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs the run directory (--run-dir DIR)")
        run_dir = Path(run_dir)
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            raise ConfigError(f"nothing to resume: {str(saved_path)!r} does not exist")
        saved = read_saved_config(saved_path)
        if config is not None:
            changes = diff(_comparable(saved), _comparable(config))
            if changes:
                raise ConfigError(f"the config differs from the one in {str(saved_path)!r} "
                                  f"({'; '.join(changes[:5])}); resume without a recipe, or start a new run")
        config = saved
    else:
        if config is None:
            raise ConfigError("run_experiment needs a config unless resume=True")
        if run_dir is None:
            run_dir = _broadcast(str(default_run_dir(config)) if mdist.rank() == 0 else None)
        run_dir = Path(run_dir)
        _refuse_occupied(run_dir)
    config["run_dir"] = str(run_dir)
    return config, run_dir


def read_saved_config(path: Path) -> dict[str, Any]:
    """A run directory's ``config.yaml``, resolved (ConfigError naming the file when it is damaged)."""
    try:
        saved = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{str(path)!r} must hold the run's config (a mapping), got {type(saved).__name__}")
    return resolve(saved, source=str(path))


def _refuse_occupied(run_dir: Path, locked: bool = False) -> None:
    """ConfigError when ``run_dir`` already holds a run (naming the process working in it, if any,
    unless we hold the lock ourselves)."""
    if _holds_run(run_dir):
        holder = None if locked else live_holder(run_dir)
        if holder is not None:
            raise ConfigError(f"run directory {str(run_dir)!r} is in use by {describe(holder)}; choose another "
                              f"--run-dir")
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to "
                          f"continue it, or choose another --run-dir")


def _finished(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that completed, else None."""
    try:
        done = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and done.get("status") == "complete" else None


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[RunDirLock | None]:
    """Rank 0 holds the run directory's lock; every rank stops when it cannot be had."""
    lock, refused = None, None
    if mdist.rank() == 0:
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirLocked as e:
            refused = str(e)
        except OSError as e:
            refused = f"cannot lock run directory {str(run_dir)!r}: {e}"
    refused = _broadcast(refused)
    if refused:
        raise ConfigError(refused)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _run(config: Mapping[str, Any] | None, run_dir: str | Path | None, resume: bool, quiet: bool) -> dict[str, Any]:
    config, run_dir = _resolve_run(config, run_dir, resume)
    done = _finished(run_dir) if resume else None
    if done is not None:
        return done
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        # everything a config or dataset can get wrong fails here, before the run directory is touched
        seed_everything(int(config["seed"]))
        set_deterministic(bool(config["train"]["deterministic"]))
        device = resolve_device(config["train"]["device"])
        data = build_data(config)
        _check_batches(config["train"], len(data["train"]))
        model = build_model_from_config(config, data).to(device)  # with the method's modules attached
        method = configured_method(config, data)
        with _locked(run_dir) as lock:
            return _run_locked(config, run_dir, resume, quiet, lock, device, data, model, method)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)  # leave the process as we found it


def _check_batches(tcfg: Mapping[str, Any], n_train: int) -> None:
    """ConfigError for a batch size the processes cannot share, or one that leaves no training batch."""
    world, batch_size = mdist.world_size(), int(tcfg["batch_size"])
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
    if tcfg["drop_last"] and n_train < batch_size:
        raise ConfigError(f"train.drop_last=true leaves no training batch: train.batch_size={batch_size} is larger "
                          f"than the training split ({n_train} samples)")


def _run_locked(config: dict[str, Any], run_dir: Path, resume: bool, quiet: bool, lock: RunDirLock | None,
                device: torch.device, data: dict[str, Any], model: torch.nn.Module, method: Any) -> dict[str, Any]:
    rank = mdist.rank()
    is_main = rank == 0
    if resume:  # the run may have ended while we waited for the lock's holder
        done = _finished(run_dir)
        if done is not None:
            return done
    else:
        _refuse_occupied(run_dir, locked=True)
    _barrier()
    removed: list[Path] = []
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(run_dir, TEMPORARIES)
        if not resume:  # first, so that a run killed from here on is found resumable
            atomic_write_text(run_dir / "config.yaml", dump(config))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        removed += remove_stale_temporaries(run_dir / "checkpoints", CHECKPOINTS)
    _barrier()
    tcfg = config["train"]
    files = RunFiles(run_dir, enabled=is_main, echo=not quiet, tensorboard=tcfg["tensorboard"], wandb=tcfg["wandb"])
    if lock is not None and lock.stale:
        files.log(f"took over the lock of {describe(lock.stale)}, which no longer holds it (it was killed)")
    if removed:
        files.log(f"removed {len(removed)} temporary files left by an interrupted write: "
                  + ", ".join(p.name for p in removed))
    t_start, failure_key = time.perf_counter(), f"modbal/failed/{next(_RUNS)}"
    try:
        return _train(config, run_dir, resume, quiet, files, rank, device, data, model, method)
    except BaseException as e:
        error = _timeout_error(e, tcfg["dist_timeout_s"]) if mdist.is_distributed() else None
        if not isinstance(e, KeyboardInterrupt):
            first, reason = _first_failure(failure_key, error or e)
            if not first:
                error = AnotherProcessFailed(reason)
            if is_main or first:  # a rank > 0 failing first writes too: rank 0 may wait until torchrun stops it
                files.log(f"failed: {reason}")
                atomic_write_json(run_dir / "summary.json", {
                    "dataset": config["dataset"]["name"], "method": config["method"]["name"],
                    "fusion": config["model"]["fusion"]["name"], "seed": config["seed"],
                    "status": "failed", "error": reason, "val": {}, "test": {},
                    "elapsed_s": time.perf_counter() - t_start})
        if error is not None:
            raise error from None
        raise
    finally:
        files.close()


def _resume_checkpoint(run_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint a resumed run continues from: ``last.pt``, else ``best.pt``, else none.

    An unreadable ``last.pt`` stops the run with one line saying what removing it would do."""
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    if last_path.is_file():
        try:
            return load_checkpoint(last_path), last_path
        except CheckpointError as e:
            instead = (f"resume from {str(best_path)!r} (the best epoch so far)" if best_path.is_file()
                       else "start the run over from scratch")
            raise CheckpointError(f"{e}; remove it and resume again to {instead}") from None
    if best_path.is_file():
        return load_checkpoint(best_path), best_path
    return None, None


def _train(config: dict[str, Any], run_dir: Path, resume: bool, quiet: bool, files: RunFiles, rank: int,
           device: torch.device, data: dict[str, Any], model: torch.nn.Module, method: Any) -> dict[str, Any]:
    is_main, world = rank == 0, mdist.world_size()
    tcfg, ocfg = config["train"], config["optim"]
    seed = int(config["seed"])
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    checkpoint, source = _resume_checkpoint(run_dir) if resume else (None, None)
    files.log(("resuming" if checkpoint else "starting") + f" {config['method']['name']} on "
              f"{config['dataset']['name']} ({config['model']['fusion']['name']} fusion), seed {seed}, "
              f"device {device}, world size {world}, run dir {run_dir}")
    if source is not None and source != last_path:
        files.log(f"no {last_path.name}: resuming from {source.name}")
    if data["carved_val"]:
        files.log(f"no validation split: carved {len(data['val'])} samples from train (seed {validation_seed(config)})")
    if checkpoint is not None:  # method state first: it may decide the parameter groups (MSES)
        model.load_state_dict(checkpoint["model"])
        method.load_state_dict(checkpoint["method"])
    try:  # a method that cannot act on this model says so before any training
        optimizer = build_optimizer(method.param_groups(model), ocfg)
        method.setup(model, optimizer)
    except ValueError as e:
        raise ConfigError(f"method {config['method']['name']}: {e}") from None
    scheduler = build_scheduler(optimizer, ocfg, tcfg["epochs"])
    scaler = torch.amp.GradScaler("cuda") if tcfg["amp"] == "fp16" and device.type == "cuda" else None
    wrapped: torch.nn.Module = model
    if world > 1 and method.owns_step:  # its step averages gradients itself (StepContext.backward)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)  # rank 0's initial weights everywhere, as DDP would
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(tcfg["find_unused_parameters"]) or method.freezes_parameters)

    batch_size = int(tcfg["batch_size"])
    eval_bs = max(1, int(tcfg["eval_batch_size"] or batch_size) // world)
    # a method that re-samples the training set between epochs gets it as an ExampleSet
    train_set = ExampleSet(data["train"]) if method.resamples else data["train"]
    train_sampler = ShardedBatchSampler(train_set if method.resamples else len(data["train"]), batch_size,
                                        shuffle=True, seed=seed, rank=rank, world_size=world,
                                        drop_last=bool(tcfg["drop_last"]))
    common = {"num_workers": int(tcfg["num_workers"]), "collate_fn": data["collate_fn"],
              "pin_memory": device.type == "cuda", "seed": seed}
    train_loader = make_loader(train_set, train_sampler, **(
        {**common, "collate_fn": TaggedCollate(data["collate_fn"])} if method.resamples else common))
    val_split = "validation" + (" (carved from train; sample numbers of the train split)" if data["carved_val"] else "")
    val_loader = FiniteInputs(make_loader(data["val"], EvalBatchSampler(len(data["val"]), eval_bs, rank, world),
                                          **common), val_split)
    test_loader = FiniteInputs(make_loader(data["test"], EvalBatchSampler(len(data["test"]), eval_bs, rank, world),
                                           **common), "test")

    state = LoopState()
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        state = LoopState.from_state(checkpoint["loop"])
        set_rng_state(checkpoint["rng"])
        dropped = files.truncate("steps.jsonl", lambda r: r.get("step", 0) <= state.global_step)
        dropped += files.truncate("epochs.jsonl", lambda r: r.get("epoch", 0) < state.epoch)
        files.log(f"resumed at epoch {state.epoch}, step {state.global_step} "
                  f"({state.step_in_epoch} steps into the epoch); dropped {dropped} log records "
                  "written after that checkpoint")
    elif resume:
        files.truncate("steps.jsonl", lambda r: False)
        files.truncate("epochs.jsonl", lambda r: False)
        files.log("no checkpoint to resume from: starting over")
    files.start(config, step=state.global_step, name=run_dir.name)  # trackers: hparams, resume point

    def payload(st: LoopState) -> dict[str, Any]:
        return {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "method": method.state_dict(), "rng": rng_state(),
                "loop": st.state_dict(), "config": config}

    log_every = int(tcfg["log_every"])

    def on_step(st: LoopState, record: dict[str, Any]) -> None:
        if st.global_step % log_every == 0:
            files.log_step(record, st.global_step)

    def on_checkpoint(st: LoopState) -> None:
        if is_main:
            atomic_save(payload(st), last_path)

    def on_epoch(st: LoopState, record: dict[str, Any], improved: bool) -> None:
        files.log_epoch(record, st.global_step)
        mono = "  ".join(f"{k[len('val/mono_acc/'):]} {v:.3f}" for k, v in record.items()
                         if k.startswith("val/mono_acc/"))
        files.log(f"epoch {record['epoch']} ({record['epoch'] + 1}/{tcfg['epochs']}): "
                  f"train loss {record['train/loss']:.4f}"
                  + (f" acc {record['train/acc']:.3f}" if "train/acc" in record else "")
                  + f" | val acc {record['val/acc']:.3f} macro-F1 {record['val/macro_f1']:.3f} "
                  f"loss {record['val/loss']:.4f} | mono acc {mono}" + (" *" if improved else ""))
        check_finite_metrics({k[len("val/"):]: v for k, v in record.items() if k.startswith("val/")},
                             "validation", f" after epoch {record['epoch']}")
        if is_main:
            blob = payload(st)
            if improved:
                atomic_save(blob, best_path)
            atomic_save(blob, last_path)

    state = fit(wrapped, method, optimizer, train_loader, val_loader, tcfg["epochs"], scheduler=scheduler,
                scaler=scaler, device=device, amp=tcfg["amp"], state=state, select=tcfg["select"],
                max_steps_per_epoch=tcfg["max_steps_per_epoch"], checkpoint_every=int(tcfg["checkpoint_every"]),
                on_step=on_step, on_epoch=on_epoch, on_checkpoint=on_checkpoint,
                progress=not quiet and is_main)

    _barrier()
    if state.best_epoch < 0:
        raise FloatingPointError(f"no epoch had a finite validation {tcfg['select']}; there is no best "
                                 f"checkpoint to test (lower the learning rate or the method's strength)")
    t_test = time.perf_counter()
    if best_path.is_file():
        best = load_checkpoint(best_path, map_location=device)
        model.load_state_dict(best["model"])
        if method.predicts:  # its output may depend on its state at that epoch (ReconBoost's members)
            method.load_state_dict(best["method"])
    test, confusion = evaluate_with_confusion(model, test_loader, device=device, amp=tcfg["amp"],
                                              prepare=method.prepare_inputs, predict=predictor(method, model))
    test = check_finite_metrics(test, "test")
    elapsed = state.elapsed_s + (time.perf_counter() - t_test)
    splits = data["splits"]
    summary = {
        "dataset": config["dataset"]["name"], "method": config["method"]["name"],
        "fusion": config["model"]["fusion"]["name"],
        "encoders": {m: s["name"] for m, s in encoder_specs(config, data["modalities"]).items()},
        "seed": seed, "modalities": list(data["modalities"]), "num_classes": len(data["class_names"]),
        "best_epoch": state.best_epoch, "epochs": state.epoch, "select": tcfg["select"],
        "val": state.best_val, "test": test, "elapsed_s": elapsed, "status": "complete",
        "test_confusion": confusion.tolist(), "class_names": [str(c) for c in data["class_names"]],
        "method_config": dict(config["method"]), "world_size": world, "device": str(device),
        "sizes": {"train": len(data["train"]), "val": len(data["val"]), "test": len(data["test"])},
        "val_carved_from_train": data["carved_val"],
        "dataset_info": _json_safe(getattr(splits, "info", {}) or {}),
        "run_dir": str(run_dir), "environment": run_environment(),
    }
    if is_main:
        atomic_write_json(run_dir / "summary.json", summary)
        files.finish({f"test/{k}": v for k, v in test.items()})
        files.log(f"done: best epoch {state.best_epoch} (val {tcfg['select']} {state.best_score}); "
                  f"test acc {test['acc']:.4f} macro-F1 {test['macro_f1']:.4f}; {elapsed:.1f}s")
    return summary


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", split: str = "test",
                 device: str = "cpu") -> dict[str, float]:
    """Re-evaluate a finished (or interrupted) run's ``best``/``last`` checkpoint on a split."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt_path.is_file():
        raise ConfigError(f"no {checkpoint} checkpoint in {str(run_dir)!r} ({str(ckpt_path)!r} is missing)")
    state = load_checkpoint(ckpt_path, map_location="cpu")  # refused before anything else when unsafe
    config = read_saved_config(path)
    seed_everything(int(config["seed"]))
    dev = resolve_device(device)
    data = build_data(config)
    model = build_model_from_config(config, data).to(dev)
    model.load_state_dict(state["model"])
    dataset = data[split]
    bs = int(config["train"]["eval_batch_size"] or config["train"]["batch_size"])
    name = {"val": "validation", "train": "training"}.get(split, split)
    loader = FiniteInputs(make_loader(dataset, EvalBatchSampler(len(dataset), bs), collate_fn=data["collate_fn"]), name)
    method = configured_method(config, data)
    if method.predicts:  # its output may depend on its state at that epoch (ReconBoost's members)
        method.load_state_dict(state["method"])
    return check_finite_metrics(evaluate(model, loader, device=dev, amp=config["train"]["amp"],
                                         prepare=method.prepare_inputs, predict=predictor(method, model)), name)
