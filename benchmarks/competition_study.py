"""Competition strength d_m: stability, fusions, agreement with SHAPE, joint vs AGM.

Questions the AGM paper leaves open (see docs/competition.md):
  1. is d_m stable across random initializations of the mono-modal concept?
  2. how does it behave across fusion strategies?
  3. does it agree with SHAPE contributions (Spearman rank correlation)?
and the paper's claim: 4. does AGM lower d_m of the modality joint training under-uses?

For every fusion × method × learning rate × run seed a multimodal model is trained on the recipe;
per fusion and method the learning rate with the best mean validation accuracy is selected (the
same sweep for every method). For every fusion × modality × concept seed a uni-modal concept
(method ``unimodal``, the recipe's other settings) is trained once and shared by that fusion's
runs. d_m is scored for every (run, concept seed) pair: ridge probe fit on the validation split,
scored on the test split. Concept seeds start at 1000, apart from the run seeds: a concept trained
with its run's seed starts from the run's initial weights, which lowers d_m by itself (0.10–0.14
under concat fusion, docs/competition.md). φ_m are the Shapley values of test accuracy (zeroed inputs).

    python benchmarks/competition_study.py                       # recipes/synthetic.yaml, ≈ 2 min
    python benchmarks/competition_study.py --recipe recipes/synthetic_competition.yaml \
        --lrs 0.01,0.03,0.1 --seeds 3
    python benchmarks/competition_study.py --fusions concat --seeds 1 --concept-seeds 3 --epochs 3

Prints Markdown tables; all run directories stay under --out (reruns reuse finished runs).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from statistics import fmean

import torch
from scipy.stats import spearmanr, ttest_ind

from modbal.config import load_recipe
from modbal.metrics.competition import competition_scores_per_set
from modbal.metrics.shape import model_shape_scores
from modbal.report.analyze import CONCEPT_SEED_OFFSET, load_trained, split_loader
from modbal.train.run import build_data, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def _run(config: dict, run_dir: Path) -> None:
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "complete":
        return
    resume = (run_dir / "config.yaml").is_file()
    run_experiment(None if resume else config, run_dir, resume=resume, quiet=True)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "synthetic.yaml"))
    p.add_argument("--fusions", default="concat,maxout")
    p.add_argument("--methods", default="joint,agm")
    p.add_argument("--lrs", default=None, help="comma list; default: the recipe's learning rate only")
    p.add_argument("--seeds", type=int, default=2, help="multimodal runs per fusion × method × lr")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds are first-seed … first-seed + seeds − 1")
    p.add_argument("--concept-seeds", type=int, default=5, help="concept initializations per modality")
    p.add_argument("--first-concept-seed", type=int, default=CONCEPT_SEED_OFFSET,
                   help="concept seeds are first-concept-seed … + concept-seeds − 1; keep them apart from the run "
                        "seeds (a concept with its run's seed starts from the run's weights)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the recipe's)")
    p.add_argument("--alpha", type=float, default=120.0, help="ridge penalty")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/competition_study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fusions, methods = args.fusions.split(","), args.methods.split(",")
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [None]
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    concept_seeds = range(args.first_concept_seed, args.first_concept_seed + args.concept_seeds)
    if set(seeds) & set(concept_seeds):
        p.error(f"run seeds {list(seeds)} and concept seeds {list(concept_seeds)} overlap")
    t0 = time.perf_counter()

    rows = []  # one per multimodal run
    concept_acc: dict[tuple[str, str], list[float]] = {}  # test accuracy of this study's concepts
    for fusion in fusions:
        fuse = [f"model.fusion={{name: {fusion}}}"]
        # the concepts of this fusion: trained once, shared by every run of the fusion
        base_data = build_data(load_recipe(args.recipe, fuse + extra))
        modalities = list(base_data["modalities"])
        for m in modalities:
            for k in concept_seeds:
                d = out / fusion / "concepts" / f"{m}-seed{k}"
                _run(load_recipe(args.recipe, fuse + extra + ["method=unimodal", f"method.modality={m}", f"seed={k}"]),
                     d)
                concept_acc.setdefault((fusion, m), []).append(
                    json.loads((d / "summary.json").read_text())["test"]["acc"])
        concept_sets = [{m: load_trained(out / fusion / "concepts" / f"{m}-seed{k}", data=base_data)[0]
                         for m in modalities} for k in concept_seeds]
        for method, lr, seed in itertools.product(methods, lrs, seeds):
            lr_part = [] if lr is None else [f"optim.lr={lr}"]
            run_dir = out / fusion / method / f"lr{lr if lr is not None else 'recipe'}" / f"seed{seed}"
            _run(load_recipe(args.recipe, fuse + extra + lr_part + [f"method={method}", f"seed={seed}"]), run_dir)
            model, config, data = load_trained(run_dir)
            bs = int(config["train"]["eval_batch_size"] or config["train"]["batch_size"])
            probe, evaluation = split_loader(data, "val", bs), split_loader(data, "test", bs)
            per_seed = competition_scores_per_set(model, concept_sets, probe, evaluation, alpha=args.alpha)
            d_by_seed = {m: [scores[m] for scores in per_seed] for m in data["modalities"]}
            shape = model_shape_scores(model, split_loader(data, "test", bs), muting="inputs")
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"fusion": fusion, "method": method, "lr": config["optim"]["lr"], "seed": seed,
                         "acc": summary["test"]["acc"], "val_acc": summary["val"]["acc"],
                         "mono": {m: summary["test"][f"mono_acc/{m}"] for m in data["modalities"]},
                         "d": d_by_seed, "phi": shape["shapley"], "cooperation": shape["cooperation"],
                         "modalities": list(data["modalities"])})
    elapsed = time.perf_counter() - t0
    mods = rows[0]["modalities"]
    # the learning rate each fusion × method keeps: best mean validation accuracy over its seeds
    chosen = {}
    for fusion, method in itertools.product(fusions, methods):
        by_lr = {}
        for r in rows:
            if r["fusion"] == fusion and r["method"] == method:
                by_lr.setdefault(r["lr"], []).append(r)
        chosen[(fusion, method)] = max(by_lr, key=lambda lr: fmean([r["val_acc"] for r in by_lr[lr]]))
    selected = [r for r in rows if r["lr"] == chosen[(r["fusion"], r["method"])]]

    print(f"## Competition strength on `{Path(args.recipe).name}` ({len(rows)} runs, concept seeds "
          f"{concept_seeds.start}–{concept_seeds.stop - 1}, α = {args.alpha:g}, {elapsed / 60:.1f} min)\n")
    swept = f"from {', '.join(str(lr) for lr in lrs)}" if lrs != [None] else "the recipe's only"
    print(f"Each fusion × method at the learning rate its sweep selected on validation accuracy ({swept}); "
          f"run seeds {seeds.start}–{seeds.stop - 1}. d_m: mean ± std over run seeds × "
          "concept seeds; mono acc and φ_m (Shapley value of test accuracy): points.\n")
    print("| fusion | method | lr | runs | test acc (%) | " + " | ".join(f"mono acc {m}" for m in mods) + " | "
          + " | ".join(f"d_{m}" for m in mods) + " | " + " | ".join(f"φ_{m}" for m in mods) + " |")
    print("|" + "---|" * (4 + 3 * len(mods) + 1))
    for fusion, method in itertools.product(fusions, methods):
        g = [r for r in selected if r["fusion"] == fusion and r["method"] == method]
        cells = [_fmt([r["mono"][m] for r in g], 1, 100) for m in mods]
        cells += [_fmt([d for r in g for d in r["d"][m]]) for m in mods]
        cells += [_fmt([r["phi"][m] for r in g], 1, 100) for m in mods]
        print(f"| {fusion} | {method} | {chosen[(fusion, method)]} | {len(g)} | "
              f"{_fmt([r['acc'] for r in g], 1, 100)} | " + " | ".join(cells) + " |")

    if len(methods) == 2 and len(rows) > len(selected):
        a, b = methods
        print(f"\n### {a} vs {b} at matched learning rates\n")
        print(f"Δd_m = d_m({a}) − d_m({b}): difference of the run means (each run's d_m averaged over the concept "
              "seeds); p: Welch t-test over those run means.\n")
        print("| fusion | lr | test acc " + a + " | test acc " + b + " | "
              + " | ".join(f"Δd_{m} (p)" for m in mods) + " |")
        print("|---|---|---|---|" + "---|" * len(mods))
        for fusion, lr in itertools.product(fusions, lrs):
            gb = [r for r in rows if r["fusion"] == fusion and r["method"] == b and (lr is None or r["lr"] == lr)]
            ga = [r for r in rows if r["fusion"] == fusion and r["method"] == a and (lr is None or r["lr"] == lr)]
            cells = []
            for m in mods:
                da, db = [fmean(r["d"][m]) for r in ga], [fmean(r["d"][m]) for r in gb]
                cells.append(f"{fmean(da) - fmean(db):+.3f} ({_welch(da, db)})")
            print(f"| {fusion} | {lr} | {_fmt([r['acc'] for r in ga], 1, 100)} | "
                  f"{_fmt([r['acc'] for r in gb], 1, 100)} | "
                  + " | ".join(cells) + " |")

    print("\n### Stability across concept initializations\n")
    print("Within-run std: std of d_m over the concept seeds for one multimodal model (mean over runs); "
          "between-run std: std over runs of the concept-seed mean.\n")
    print("| fusion | modality | concept test acc (%) | within-run std of d | between-run std of d | "
          "range over concept seeds (mean) |")
    print("|---|---|---|---|---|---|")
    for fusion in fusions:
        g = [r for r in selected if r["fusion"] == fusion]
        for m in mods:
            within = fmean([statistics.stdev(r["d"][m]) for r in g]) if args.concept_seeds > 1 else float("nan")
            means = [fmean(r["d"][m]) for r in g]
            between = statistics.stdev(means) if len(means) > 1 else float("nan")
            spread = fmean([max(r["d"][m]) - min(r["d"][m]) for r in g])
            print(f"| {fusion} | {m} | {_fmt(concept_acc[(fusion, m)], 1, 100)} | {within:.3f} | {between:.3f} | "
                  f"{spread:.3f} |")

    print("\n### Agreement with SHAPE (Spearman ρ between d_m and φ_m, runs at the selected learning rates)\n")
    print("A modality whose concept is lost (high d_m) should contribute little (low φ_m): ρ < 0 means agreement.\n")
    print("| pairs | n | Spearman ρ | p |")
    print("|---|---|---|---|")
    sets = {"all (run, modality)": [(fmean(r["d"][m]), r["phi"][m]) for r in selected for m in mods]}
    for m in mods:
        sets[f"{m} only"] = [(fmean(r["d"][m]), r["phi"][m]) for r in selected]
    for name, pairs in sets.items():
        if len(pairs) < 3:
            print(f"| {name} | {len(pairs)} | — (too few) | — |")
            continue
        rho, pval = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        print(f"| {name} | {len(pairs)} | {rho:.3f} | {pval:.3g} |")


if __name__ == "__main__":
    main()
