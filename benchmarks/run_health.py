"""Training health of every run of a ``modbal bench`` study: divergence, collapse, clipping, κ range.

The leaderboard reports each run's best-on-validation checkpoint, so a run that collapses late
(validation accuracy falling to chance after it was learned) looks healthy there. This script
plans the study as ``modbal bench`` does (no training), reads each of its runs' ``epochs.jsonl``
and ``steps.jsonl`` and prints one row per (task, fusion, method, configuration): how many seeds
diverged (stopped on a non-finite value), how many collapsed (validation accuracy at or below
``--collapse`` after the best epoch), each seed's best and last validation accuracy, the share of
steps on which AGM's gradient clip acted (``clipped``), and the largest κ seen. Seeds without a
run directory are left out.

    python benchmarks/run_health.py benchmarks/studies/agm_clip_synthetic.yaml --out runs/bench/agm_clip_synthetic
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from modbal.bench.grid import run_status
from modbal.bench.study import choose_all, job_of, load_study, plan_study


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
    return {"diverged": run_status(run_dir) == "diverged", "collapse_epoch": collapsed[0] if collapsed else None,
            "best_val": val[best] if val else None, "final_val": val[-1] if val else None,
            "clip_rate": sum(clipped) / len(clipped) if clipped else None, "max_kappa": max(kappas) if kappas else None}


def best_to_last(h: dict) -> str:
    if h["final_val"] is None:
        return "–"
    last = "stopped" if h["diverged"] else f"{100 * h['final_val']:.1f}"
    return f"{100 * h['best_val']:.1f} → {last}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study YAML, or a shipped study name")
    parser.add_argument("--out", type=Path, default=None, help="study output folder (default: runs/bench/<study>)")
    parser.add_argument("--lrs", default=None, help="comma list of learning rates to show (default: all)")
    parser.add_argument("--collapse", type=float, default=0.2, help="validation accuracy counted as collapsed")
    args = parser.parse_args()
    study = load_study(args.study)
    plan = plan_study(study, args.out or Path("runs") / "bench" / study.name, echo=lambda _: None)
    choose_all(plan)  # the cells that take teachers learn their teachers' run directories
    lrs = {float(x) for x in args.lrs.split(",")} if args.lrs else None
    seeds = [*study.selection_seeds, *study.report_seeds]
    print(f"| task | fusion | method | configuration | diverged | collapsed (val acc ≤ {args.collapse:g} after its "
          "best epoch) | val acc, best → last epoch | steps clipped | max κ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in plan.cells:
        if cell.na or cell.blocked:
            continue
        for cand in cell.candidates:
            if lrs is not None and "optim.lr" in cand and float(cand["optim.lr"]) not in lrs:
                continue
            dirs = [(s, Path(job_of(plan.out, cell.config(cand, s)).run_dir)) for s in seeds]
            rows = [(s, health(d, args.collapse)) for s, d in dirs if d.is_dir()]
            if not rows:
                continue
            diverged = [f"seed {s}" for s, h in rows if h["diverged"]]
            collapsed = [f"seed {s} (epoch {h['collapse_epoch']})" for s, h in rows if h["collapse_epoch"] is not None]
            finals = " / ".join(f"{s}: {best_to_last(h)}" for s, h in rows)
            rates = [h["clip_rate"] for _, h in rows if h["clip_rate"] is not None]
            clip = f"{100 * sum(rates) / len(rates):.1f}%" if rates else "–"
            kappas = [h["max_kappa"] for _, h in rows if h["max_kappa"] is not None]
            top = f"{max(kappas):.3g}" if kappas else "–"
            config = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cand.items())
            print(f"| {cell.task} | {cell.fusion} | {cell.label} | {config} | {', '.join(diverged) or 'none'} | "
                  f"{', '.join(collapsed) or 'none'} | {finals} | {clip} | {top} |")


if __name__ == "__main__":
    main()
