"""Training health of every run of a ``compare.py`` study: divergence, collapse, clipping, κ range.

``compare.py`` reports each run's best-on-validation checkpoint, so a run that collapses late
(validation accuracy falling to chance after it was learned) looks healthy there. This script
reads each run's ``epochs.jsonl`` and ``steps.jsonl`` and prints one row per
(fusion, method, lr): how many seeds diverged (stopped on a non-finite value), how many collapsed
(validation accuracy at or below ``--collapse`` after the best epoch), each seed's best and last
validation accuracy, the share of steps on which
AGM's gradient clip acted (``clipped``), and the largest κ seen.

    python benchmarks/run_health.py benchmarks/studies/agm_clip_synthetic.yaml [--lrs 0.1]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from compare import ROOT, plan


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def health(run_dir: Path, collapse: float) -> dict:
    epochs = read_jsonl(run_dir / "epochs.jsonl")
    steps = read_jsonl(run_dir / "steps.jsonl")
    val = [e["val/acc"] for e in epochs if "val/acc" in e]
    best = max(range(len(val)), key=val.__getitem__) if val else None
    collapsed = [i for i in range(best + 1, len(val)) if val[i] <= collapse] if val else []
    kappas = [v for s in steps for k, v in s.items() if k.startswith("kappa/")]
    clipped = [s["clipped"] for s in steps if "clipped" in s]
    return {"diverged": (run_dir / "diverged.txt").is_file(), "collapse_epoch": collapsed[0] if collapsed else None,
            "best_val": val[best] if val else None, "final_val": val[-1] if val else None,
            "clip_rate": sum(clipped) / len(clipped) if clipped else None, "max_kappa": max(kappas) if kappas else None}


def best_to_last(h: dict) -> str:
    if h["final_val"] is None:
        return "–"
    last = "stopped" if h["diverged"] else f"{100 * h['final_val']:.1f}"
    return f"{100 * h['best_val']:.1f} → {last}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--runs", type=Path, default=None, help="run directories (default runs/compare/<study>)")
    parser.add_argument("--lrs", default=None, help="comma list of learning rates to show (default: all)")
    parser.add_argument("--collapse", type=float, default=0.2, help="validation accuracy counted as collapsed")
    args = parser.parse_args()
    study = yaml.safe_load(args.study.read_text())
    jobs = plan(study, args.runs or ROOT / "runs" / "compare" / args.study.stem)
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else study["lrs"]
    print(f"| fusion | method | lr | diverged | collapsed (val acc ≤ {args.collapse:g} after its best epoch) | "
          "val acc, best → last epoch | steps clipped | max κ |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list] = {}
    for job in jobs:
        if job["lr"] in lrs:
            groups.setdefault((job["fusion"], job["label"], job["lr"]), []).append(job)
    for (fusion, label, lr), group in groups.items():
        rows = [(job["seed"], health(Path(job["run_dir"]), args.collapse)) for job in group]
        diverged = [f"seed {s}" for s, h in rows if h["diverged"]]
        collapsed = [f"seed {s} (epoch {h['collapse_epoch']})" for s, h in rows if h["collapse_epoch"] is not None]
        finals = " / ".join(best_to_last(h) for _, h in rows)
        rates = [h["clip_rate"] for _, h in rows if h["clip_rate"] is not None]
        clip = f"{100 * sum(rates) / len(rates):.1f}%" if rates else "–"
        kappas = [h["max_kappa"] for _, h in rows if h["max_kappa"] is not None]
        top = f"{max(kappas):.3g}" if kappas else "–"
        print(f"| {fusion} | {label} | {lr} | {', '.join(diverged) or 'none'} | {', '.join(collapsed) or 'none'} | "
              f"{finals} | {clip} | {top} |")


if __name__ == "__main__":
    main()
