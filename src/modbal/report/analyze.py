"""Analyses of finished runs: competition strength against uni-modal concepts, SHAPE contributions.

``competition(run_dir)`` trains (or reuses) one uni-modal concept per modality (and concept seed) in
``RUN_DIR/concepts/<m>-seed<k>/`` — the run's config with ``method: {name: unimodal, modality: m}`` — then
scores d_m with a ridge probe from the run's fused representation (fit on the probe split, scored on
the evaluation split) and writes ``RUN_DIR/competition.json``. ``shape(run_dir)`` writes
``RUN_DIR/shape.json`` with the Shapley values of accuracy over coalitions of muted inputs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from ..config import ConfigError, diff, resolve
from ..metrics.competition import DEFAULT_ALPHA, competition_scores_per_set
from ..metrics.shape import model_shape_scores
from .tables import CONCEPT_MARKER

SPLITS = ("train", "val", "test")
# config parts a cached concept must share with the run (its method and run_dir differ by design)
SHARED_KEYS = ("dataset", "model", "optim", "train")


def _load_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    return resolve(yaml.safe_load(path.read_text()), source=str(path))


def load_trained(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu",
                 data: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model with the checkpoint's weights, in eval mode; resolved config; data of the config)."""
    from ..train.checkpoint import load_checkpoint
    from ..train.run import build_data, build_model_from_config, resolve_device

    run_dir = Path(run_dir)
    config = _load_config(run_dir)
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        raise ConfigError(f"no {checkpoint} checkpoint in {str(run_dir)!r} ({str(ckpt)!r} is missing); "
                          f"has the run finished?")
    dev = resolve_device(device)
    data = dict(data) if data is not None else build_data(config)
    model = build_model_from_config(config, data).to(dev)
    model.load_state_dict(load_checkpoint(ckpt, map_location=dev)["model"])
    model.eval()
    return model, config, data


def split_loader(data: Mapping[str, Any], split: str, batch_size: int) -> Any:
    """A fixed-order loader over one split."""
    from ..train.data import EvalBatchSampler, make_loader

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; allowed values: {', '.join(SPLITS)}")
    dataset = data[split]
    return make_loader(dataset, EvalBatchSampler(len(dataset), batch_size), collate_fn=data["collate_fn"])


def concept_config(config: Mapping[str, Any], modality: str, seed: int, carved_val: bool) -> dict[str, Any]:
    """The run's config for the uni-modal concept of ``modality`` trained with ``seed``. When the run
    carved its validation split from train, the concept carves the same one (its seed differs), so
    it never trains on the samples the probe is fit on."""
    from ..train.run import validation_seed

    out = copy.deepcopy(dict(config))
    out["method"] = {"name": "unimodal", "modality": modality}
    out["seed"] = int(seed)
    out["run_dir"] = None
    if carved_val:
        out["train"]["val_seed"] = validation_seed(config)
    return out


# Default concept seed = run seed + this offset. A concept trained with the run's own seed starts
# from the run's initial encoder weights, and under late fusion that shared start alone makes the
# concept far easier to read from the fused representation (d_m lower by 0.10–0.14 on the
# competition task, docs/research/competition.md), so it must differ.
CONCEPT_SEED_OFFSET = 1000


def concept_dir(run_dir: Path, wanted: Mapping[str, Any], cache: Path | None = None) -> Path:
    """Where the concept ``wanted`` (its resolved config) lives: ``RUN/concepts/<m>-seed<k>``, or with a
    shared ``cache`` ``CACHE/<hash of its dataset, model, optim and train settings>/<m>-seed<k>``, so
    runs that differ only in method or seed (a sweep) share their concepts."""
    name = f"{wanted['method']['modality']}-seed{wanted['seed']}"
    if cache is None:
        return run_dir / "concepts" / name
    shared = json.dumps({key: wanted[key] for key in SHARED_KEYS}, sort_keys=True, default=str)
    return cache / hashlib.sha1(shared.encode()).hexdigest()[:12] / name


def ensure_concept(run_dir: Path, config: Mapping[str, Any], modality: str, seed: int, carved_val: bool,
                   retrain: bool = False, echo: Callable[[str], None] = print, cache: Path | None = None) -> Path:
    """The concept's run directory, trained (``run_experiment``) unless a matching one is cached."""
    import shutil

    from ..train.run import run_experiment

    wanted = resolve(concept_config(config, modality, seed, carved_val), source="concept config")
    target = concept_dir(run_dir, wanted, cache)
    if retrain and target.exists():
        shutil.rmtree(target)
    summary = target / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "complete":
        cached = _load_config(target)
        changes = [c for key in SHARED_KEYS for c in diff({key: cached[key]}, {key: wanted[key]})]
        if changes or cached["method"] != wanted["method"] or cached["seed"] != wanted["seed"]:
            raise ConfigError(f"the cached concept {str(target)!r} was trained with another config "
                              f"({'; '.join(changes[:3]) or 'method/seed'}); pass --retrain")
        echo(f"  concept {modality} (seed {seed}): reusing {target}")
        return target
    resume = (target / "config.yaml").is_file()
    echo(f"  concept {modality} (seed {seed}): {'resuming' if resume else 'training'} in {target}")
    target.mkdir(parents=True, exist_ok=True)
    (target / CONCEPT_MARKER).write_text("a uni-modal concept for `modbal analyze competition`, not a run to report\n")
    run_experiment(None if resume else wanted, target, resume=resume, quiet=True)
    return target


def competition(run_dir: str | Path, alpha: float = DEFAULT_ALPHA, probe_split: str = "val",
                eval_split: str = "test", concept_seeds: Sequence[int] | None = None, checkpoint: str = "best",
                retrain: bool = False, device: str = "cpu", write: bool = True, allow_shared_init: bool = False,
                concept_cache: str | Path | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Competition strength d_m of one run (writes ``RUN_DIR/competition.json`` unless ``write=False``).

    One concept per modality and concept seed is trained or reused; ``scores`` is the mean over the
    seeds, ``scores_std`` their sample std. Default seed: the run's seed + ``CONCEPT_SEED_OFFSET``.
    The run's own seed is refused unless ``allow_shared_init`` (the concept would start from the
    run's initial weights, which biases d_m down). Concepts live in ``RUN_DIR/concepts/``, or in the
    shared ``concept_cache`` folder (see :func:`concept_dir`).
    """
    run_dir = Path(run_dir)
    if probe_split == eval_split:
        raise ConfigError(f"the probe and evaluation splits must differ (both {probe_split!r})")
    cache = None if concept_cache is None else Path(concept_cache)
    if cache is not None and retrain:
        raise ConfigError(f"--retrain with a shared concept cache would retrain for every run; delete "
                          f"{str(cache)!r} (or the concept's folder in it) instead")
    model, config, data = load_trained(run_dir, checkpoint, device)
    run_seed = int(config["seed"])
    seeds = [run_seed + CONCEPT_SEED_OFFSET] if not concept_seeds else [int(k) for k in concept_seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"concept seeds must differ, got {seeds}")
    if run_seed in seeds and not allow_shared_init:
        raise ConfigError(f"concept seed {run_seed} is the seed of run {str(run_dir)!r}: that concept would start "
                          f"from the run's initial weights, which lowers d_m by itself; choose concept seeds "
                          f"that no run uses (e.g. {CONCEPT_SEED_OFFSET}:{CONCEPT_SEED_OFFSET + 5}) or allow it "
                          f"explicitly (--allow-shared-init)")
    bs = int(config["train"]["eval_batch_size"] or config["train"]["batch_size"])
    dev = next(model.parameters()).device
    probe, evaluation = split_loader(data, probe_split, bs), split_loader(data, eval_split, bs)
    info: dict[str, list[dict[str, Any]]] = {m: [] for m in data["modalities"]}
    concept_sets = []
    for seed in seeds:
        concepts = {}
        for m in data["modalities"]:
            target = ensure_concept(run_dir, config, m, seed, data["carved_val"], retrain, echo, cache)
            concepts[m], _, _ = load_trained(target, "best", device, data=data)
            summary = json.loads((target / "summary.json").read_text())
            info[m].append({"run_dir": str(target), "seed": seed, "test_acc": (summary.get("test") or {}).get("acc")})
        concept_sets.append(concepts)
    per_seed = competition_scores_per_set(model, concept_sets, probe, evaluation, alpha=alpha, device=dev)
    by_seed = {m: [scores[m] for scores in per_seed] for m in data["modalities"]}
    result = {"scores": {m: statistics.fmean(v) for m, v in by_seed.items()},
              "scores_std": {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in by_seed.items()},
              "scores_by_concept_seed": by_seed, "concept_seeds": seeds, "shared_init": run_seed in seeds,
              "alpha": alpha,
              "probe_split": probe_split, "eval_split": eval_split, "checkpoint": checkpoint, "concepts": info,
              "sizes": {probe_split: len(data[probe_split]), eval_split: len(data[eval_split])}}
    if write:
        _write_json(run_dir / "competition.json", result)
    return result


def shape(run_dir: str | Path, split: str = "test", muting: str = "inputs", checkpoint: str = "best",
          device: str = "cpu", write: bool = True) -> dict[str, Any]:
    """SHAPE contributions of one run (writes ``RUN_DIR/shape.json`` unless ``write=False``)."""
    run_dir = Path(run_dir)
    model, config, data = load_trained(run_dir, checkpoint, device)
    bs = int(config["train"]["eval_batch_size"] or config["train"]["batch_size"])
    result = model_shape_scores(model, split_loader(data, split, bs), muting=muting,
                                device=next(model.parameters()).device)
    result.update({"split": split, "checkpoint": checkpoint, "size": len(data[split])})
    if write:
        _write_json(run_dir / "shape.json", result)
    return result


def _write_json(path: Path, obj: Any) -> None:
    from ..train.checkpoint import atomic_write_json

    atomic_write_json(path, obj)


def analysis_targets(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among ``paths`` (folders are searched; concept models are left out)."""
    from .tables import find_run_dirs

    found = find_run_dirs(paths)
    if not found:
        raise ConfigError(f"no run directories in {', '.join(map(str, paths))}")
    return found
