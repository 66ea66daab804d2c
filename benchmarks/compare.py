"""Fair method comparisons: the same learning-rate sweep, splits and seeds for every method.

A study file (YAML, under ``benchmarks/studies/``) names a recipe, common overrides, the fusions,
the learning rates, the seeds and the methods (each a label and its overrides). Every
(fusion, method, lr, seed) run is trained with :func:`modbal.train.run.run_experiment` (finished
runs are reused); per fusion and method the learning rate with the best mean *validation* accuracy
over the seeds is kept, and its *test* metrics are reported as mean ± sample std over the seeds.
With ``ensemble: true`` the uni-modal runs (method ``unimodal``) are also combined as a product
of experts (summed log-probabilities: the Bayes combination for modalities that are independent
given the class, uniform class prior), the reference a balanced model could reach.

    python benchmarks/compare.py benchmarks/studies/agm_synthetic.yaml --jobs 2 --out docs/results/x.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

from modbal.config import load_recipe, load_yaml, resolve
from modbal.metrics.classification import accuracy, macro_f1
from modbal.train.checkpoint import load_checkpoint
from modbal.train.run import build_data, build_method, build_model_from_config, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    text = text.replace("α", "alpha").replace("κ", "kappa")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def plan(study: dict[str, Any], runs_root: Path) -> list[dict[str, Any]]:
    jobs = []
    fusions = study["fusions"] if isinstance(study["fusions"], dict) else {f: [] for f in study["fusions"]}
    for (fusion, fusion_overrides), (label, overrides), lr, seed in itertools.product(
            fusions.items(), study["methods"].items(), study["lrs"], study["seeds"]):
        run_dir = runs_root / fusion / slug(label) / f"lr{lr}" / f"seed{seed}"
        all_overrides = [*study.get("overrides", []), f"model.fusion.name={fusion}", *(fusion_overrides or []),
                         *overrides, f"optim.lr={lr}", f"seed={seed}"]
        jobs.append({"fusion": fusion, "label": label, "lr": lr, "seed": seed, "run_dir": str(run_dir),
                     "recipe": str(ROOT / study["recipe"]), "overrides": all_overrides})
    return jobs


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse) one run; a run that stops on non-finite values is recorded as diverged."""
    torch.set_num_threads(1)
    run_dir = Path(job["run_dir"])
    summary_path, diverged_path = run_dir / "summary.json", run_dir / "diverged.txt"
    if diverged_path.is_file():
        return {**job, "diverged": diverged_path.read_text()}
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "complete":
        summary = json.loads(summary_path.read_text())
    else:
        config = load_recipe(job["recipe"], job["overrides"])
        try:
            summary = run_experiment(config, run_dir, resume=run_dir.exists(), quiet=True)
        except FloatingPointError as error:
            diverged_path.write_text(str(error))
            return {**job, "diverged": str(error)}
    return {**job, "val": summary["val"], "test": summary["test"], "elapsed_s": summary.get("elapsed_s")}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


@torch.no_grad()
def test_probabilities(run_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs of a run's best checkpoint on the test split, and the labels."""
    config = resolve(load_yaml((Path(run_dir) / "config.yaml").read_text()))
    data = build_data(config)
    model = build_model_from_config(config, data)
    model.load_state_dict(load_checkpoint(Path(run_dir) / "checkpoints" / "best.pt")["model"])
    model.eval()
    method = build_method(config)
    loader = torch.utils.data.DataLoader(data["test"], batch_size=256, collate_fn=data["collate_fn"])
    probs, labels = [], []
    for inputs, targets in loader:
        probs.append(torch.softmax(model(method.prepare_inputs(inputs)).float(), -1))
        labels.append(targets)
    return torch.cat(probs), torch.cat(labels)


def summarize(study: dict[str, Any], results: list[dict[str, Any]]) -> str:
    seeds = study["seeds"]
    lines = [f"Test metrics (%), mean ± sample std over {len(seeds)} seeds {seeds}; learning rate chosen "
             f"per fusion and method from {study['lrs']} by mean validation accuracy.\n"]
    for fusion in study["fusions"]:
        rows = [r for r in results if r["fusion"] == fusion]
        modalities = sorted(k.split("/", 1)[1] for k in next(r for r in rows if "test" in r)["test"]
                            if k.startswith("mono_acc/"))
        lines.append(f"\n**fusion: {fusion}**\n")
        lines.append("| method | lr | test acc | macro-F1 | " + " | ".join(f"mono acc {m}" for m in modalities)
                     + " | val acc | s/run |")
        lines.append("|---|---|---|---|" + "---|" * len(modalities) + "---|---|")
        chosen = {}
        for label in study["methods"]:
            by_lr = {lr: [r for r in rows if r["label"] == label and r["lr"] == lr] for lr in study["lrs"]}
            failed = [lr for lr, runs in by_lr.items() if any("diverged" in r for r in runs)]
            usable = {lr: runs for lr, runs in by_lr.items() if lr not in failed}
            note = f" (diverged at lr {', '.join(map(str, failed))})" if failed else ""
            if not usable:
                lines.append(f"| {label}{note} | – | diverged |" + " |" * (len(modalities) + 3))
                continue
            lr = max(usable, key=lambda lr: statistics.mean(r["val"]["acc"] for r in usable[lr]))
            runs = sorted(usable[lr], key=lambda r: r["seed"])
            chosen[label] = runs
            mono = [mean_std([r["test"][f"mono_acc/{m}"] for r in runs]) for m in modalities]
            secs = statistics.mean(r["elapsed_s"] or 0 for r in runs)
            lines.append(f"| {label}{note} | {lr} | {mean_std([r['test']['acc'] for r in runs])} | "
                         f"{mean_std([r['test']['macro_f1'] for r in runs])} | " + " | ".join(mono)
                         + f" | {mean_std([r['val']['acc'] for r in runs])} | {secs:.1f} |")
        if study.get("ensemble"):
            members = [label for label, o in study["methods"].items() if "method=unimodal" in o]
            accs, f1s = [], []
            for i in range(len(seeds)):
                outputs = [test_probabilities(chosen[label][i]["run_dir"]) for label in members]
                labels = outputs[0][1]
                pred = sum(p.clamp_min(1e-12).log() for p, _ in outputs).argmax(-1)  # product of experts
                accs.append(accuracy(pred, labels))
                f1s.append(macro_f1(pred, labels, int(outputs[0][0].shape[1])))
            lines.append(f"| ensemble of {' + '.join(members)} | (as chosen) | {mean_std(accs)} | {mean_std(f1s)} |"
                         + " |" * len(modalities) + " | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=None, help="run directories (default runs/compare/<study>)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args()
    study = yaml.safe_load(args.study.read_text())
    runs_root = args.runs or ROOT / "runs" / "compare" / args.study.stem
    jobs = plan(study, runs_root)
    start = time.time()
    print(f"{len(jobs)} runs under {runs_root}", file=sys.stderr)
    if args.jobs > 1:
        with get_context("spawn").Pool(args.jobs) as pool:
            results = []
            for i, r in enumerate(pool.imap_unordered(run_job, jobs), 1):
                results.append(r)
                outcome = "diverged" if "diverged" in r else f"val {r['val']['acc']:.3f} test {r['test']['acc']:.3f}"
                print(f"[{i}/{len(jobs)}] {r['fusion']} {r['label']} lr={r['lr']} seed={r['seed']}: {outcome}",
                      file=sys.stderr)
    else:
        results = [run_job(j) for j in jobs]
    table = summarize(study, results)
    table += f"\n_{len(jobs)} runs, {time.time() - start:.0f} s wall on this machine; study file `{args.study}`._\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
