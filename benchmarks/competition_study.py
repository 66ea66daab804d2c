"""Competition strength d_m over a grid of runs: stability, fusions, agreement with SHAPE, joint vs AGM.

Questions the AGM paper leaves open (see docs/research/competition.md):
  1. is d_m stable across random initializations of the mono-modal concept?
  2. how does it behave across fusion strategies?
  3. does it agree with SHAPE contributions (Spearman rank correlation)?
and the paper's claim: 4. does AGM lower d_m of the modality joint training under-uses?

This script trains nothing. The runs are a grid of modbal's engine, trained and scored by
``modbal sweep --analyze`` (d_m per concept seed in each run's ``competition.json``, concepts shared
in ``OUT/concept-cache``; φ_m, the Shapley values of test accuracy with zeroed inputs, in
``shape.json``). Keep the concept seeds apart from the run seeds (the default, run seed + 1000, gives
each run other concepts; a fixed set such as 1000:1005 gives runs that differ only in method or
seed the same ones):

    modbal sweep recipes/synthetic_competition.yaml method=joint,agm fusion=concat,maxout \
        optim.lr=0.01,0.03,0.1 seed=0:3 --analyze --concept-seeds 1000:1005 --jobs 2 --out runs/competition
    python benchmarks/competition_study.py runs/competition

Per fusion and method the learning rate with the best mean validation accuracy over the run seeds
is kept (the same sweep for every method). Prints Markdown tables. Another ridge penalty rescored
in place: ``modbal analyze competition runs/competition --alpha 1 --concept-seeds 1000:1005
--concept-cache runs/competition/concept-cache`` (the concepts are reused).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from statistics import fmean
from typing import Any

from scipy.stats import spearmanr, ttest_ind

from modbal.report.tables import RunRecord, load_runs


class StudyInputError(ValueError):
    """A run folder that lacks what the tables need."""


def _fmt(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    if not values:
        return "—"
    mean = fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _welch(a: list[float], b: list[float]) -> str:
    """Two-sided Welch t-test p-value of mean(a) = mean(b), or — with fewer than 2 per side."""
    if len(a) < 2 or len(b) < 2:
        return "—"
    return f"{ttest_ind(a, b, equal_var=False).pvalue:.2g}"


def rows_of(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per complete run, from its summary.json, competition.json and shape.json."""
    rows = []
    for r in runs:
        if not r.complete:
            continue
        if r.competition is None or r.shape is None:
            missing = "competition.json" if r.competition is None else "shape.json"
            raise StudyInputError(f"{r.path}: no {missing}; score the runs with `modbal sweep ... --analyze` "
                                  "(or `modbal analyze competition|shape`)")
        mods = list(r.competition["scores_by_concept_seed"])
        rows.append({"fusion": r.fusion, "method": r.method, "lr": float(r.config["optim"]["lr"]), "seed": r.seed,
                     "acc": r.summary["test"]["acc"], "val_acc": r.summary["val"]["acc"],
                     "mono": {m: r.summary["test"][f"mono_acc/{m}"] for m in mods},
                     "d": r.competition["scores_by_concept_seed"], "phi": r.shape["shapley"],
                     "concepts": r.competition["concepts"], "concept_seeds": r.competition["concept_seeds"],
                     "alpha": r.competition["alpha"], "modalities": mods})
    if not rows:
        raise StudyInputError("no complete runs found")
    return rows


def select(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """The learning rate each (fusion, method) keeps: the best mean validation accuracy over its seeds."""
    by: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in rows:
        by.setdefault((r["fusion"], r["method"]), {}).setdefault(r["lr"], []).append(r["val_acc"])
    return {key: max(lrs, key=lambda lr: fmean(lrs[lr])) for key, lrs in by.items()}


def tables(rows: list[dict[str, Any]]) -> str:
    out: list[str] = []
    say = out.append
    fusions = list(dict.fromkeys(r["fusion"] for r in rows))
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "joint")  # joint first
    lrs = sorted({r["lr"] for r in rows})
    mods = rows[0]["modalities"]
    alphas = sorted({r["alpha"] for r in rows})
    concept_seeds = sorted({k for r in rows for k in r["concept_seeds"]})
    run_seeds = sorted({r["seed"] for r in rows})
    chosen = select(rows)
    selected = [r for r in rows if r["lr"] == chosen[(r["fusion"], r["method"])]]

    say(f"## Competition strength ({len(rows)} runs, run seeds {run_seeds}, concept seeds {concept_seeds}, "
        f"ridge α = {', '.join(f'{a:g}' for a in alphas)})\n")
    say(f"Each fusion × method at the learning rate its sweep selected on validation accuracy (from "
        f"{', '.join(f'{lr:g}' for lr in lrs)}). d_m: mean ± std over run seeds × concept seeds; mono acc and "
        "φ_m (Shapley value of test accuracy): points.\n")
    say("| fusion | method | lr | runs | test acc (%) | " + " | ".join(f"mono acc {m}" for m in mods) + " | "
        + " | ".join(f"d_{m}" for m in mods) + " | " + " | ".join(f"φ_{m}" for m in mods) + " |")
    say("|" + "---|" * (5 + 3 * len(mods)))
    for fusion, method in itertools.product(fusions, methods):
        g = [r for r in selected if r["fusion"] == fusion and r["method"] == method]
        if not g:
            continue
        cells = [_fmt([r["mono"][m] for r in g], 1, 100) for m in mods]
        cells += [_fmt([d for r in g for d in r["d"][m]]) for m in mods]
        cells += [_fmt([r["phi"][m] for r in g], 1, 100) for m in mods]
        say(f"| {fusion} | {method} | {chosen[(fusion, method)]:g} | {len(g)} | "
            f"{_fmt([r['acc'] for r in g], 1, 100)} | " + " | ".join(cells) + " |")

    if len(methods) == 2:
        a, b = methods
        say(f"\n### {a} vs {b} at matched learning rates\n")
        say(f"Δd_m = d_m({a}) − d_m({b}): difference of the run means (each run's d_m averaged over the concept "
            "seeds); p: Welch t-test over those run means.\n")
        say(f"| fusion | lr | test acc {a} | test acc {b} | " + " | ".join(f"Δd_{m} (p)" for m in mods) + " |")
        say("|---|---|---|---|" + "---|" * len(mods))
        for fusion, lr in itertools.product(fusions, lrs):
            ga = [r for r in rows if r["fusion"] == fusion and r["method"] == a and r["lr"] == lr]
            gb = [r for r in rows if r["fusion"] == fusion and r["method"] == b and r["lr"] == lr]
            if not ga or not gb:
                continue
            cells = []
            for m in mods:
                da, db = [fmean(r["d"][m]) for r in ga], [fmean(r["d"][m]) for r in gb]
                cells.append(f"{fmean(da) - fmean(db):+.3f} ({_welch(da, db)})")
            say(f"| {fusion} | {lr:g} | {_fmt([r['acc'] for r in ga], 1, 100)} | "
                f"{_fmt([r['acc'] for r in gb], 1, 100)} | " + " | ".join(cells) + " |")

    say("\n### Stability across concept initializations\n")
    say("Within-run std: std of d_m over the concept seeds for one multimodal model (mean over runs); "
        "between-run std: std over runs of the concept-seed mean. Concept test accuracy: every distinct concept "
        "the selected runs used.\n")
    say("| fusion | modality | concept test acc (%) | within-run std of d | between-run std of d | "
        "range over concept seeds (mean) |")
    say("|---|---|---|---|---|---|")
    for fusion in fusions:
        g = [r for r in selected if r["fusion"] == fusion]
        for m in mods:
            stds = [statistics.stdev(r["d"][m]) for r in g if len(r["d"][m]) > 1]
            within = f"{fmean(stds):.3f}" if stds else "—"
            means = [fmean(r["d"][m]) for r in g]
            between = f"{statistics.stdev(means):.3f}" if len(means) > 1 else "—"
            spread = fmean([max(r["d"][m]) - min(r["d"][m]) for r in g])
            concepts = {c["run_dir"]: c["test_acc"] for r in g for c in r["concepts"][m] if c["test_acc"] is not None}
            say(f"| {fusion} | {m} | {_fmt(list(concepts.values()), 1, 100)} | {within} | {between} | {spread:.3f} |")

    say("\n### Agreement with SHAPE (Spearman ρ between d_m and φ_m, runs at the selected learning rates)\n")
    say("A modality whose concept is lost (high d_m) should contribute little (low φ_m): ρ < 0 means agreement.\n")
    say("| pairs | n | Spearman ρ | p |")
    say("|---|---|---|---|")
    sets = {"all (run, modality)": [(fmean(r["d"][m]), r["phi"][m]) for r in selected for m in mods]}
    for m in mods:
        sets[f"{m} only"] = [(fmean(r["d"][m]), r["phi"][m]) for r in selected]
    for name, pairs in sets.items():
        if len(pairs) < 3:
            say(f"| {name} | {len(pairs)} | — (too few) | — |")
            continue
        rho, pval = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
        say(f"| {name} | {len(pairs)} | {rho:.3f} | {pval:.3g} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="the sweep's output folder (or run directories)")
    args = p.parse_args(argv)
    try:
        print(tables(rows_of(load_runs(args.runs, steps=False))))
    except (StudyInputError, FileNotFoundError) as e:
        print(f"competition_study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
