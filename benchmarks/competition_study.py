"""Competition strength on the synthetic task: stability, fusions, agreement with SHAPE.

Questions the AGM paper leaves open (see docs/competition.md):
  1. is d_m stable across random initializations of the mono-modal concept?
  2. how does it behave across fusion strategies?
  3. does it agree with SHAPE contributions (Spearman rank correlation)?

For every fusion × method (joint, agm) × run seed, a multimodal model is trained on
recipes/synthetic.yaml; for every fusion × modality × concept seed, a uni-modal concept (method
``unimodal``, the same config otherwise) is trained once and shared by the runs of that fusion.
d_m is scored for every (run, concept seed) pair: ridge probe fit on the validation split,
scored on the test split. φ_m are the Shapley values of test accuracy (zeroed inputs).

    python benchmarks/competition_study.py                       # ≈ 3–5 min on one CPU thread
    python benchmarks/competition_study.py --fusions concat --seeds 1 --concept-seeds 3 --epochs 3

Prints Markdown tables; all run directories stay under --out (reruns reuse finished runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from modbal.config import load_recipe
from modbal.metrics.competition import competition_scores
from modbal.metrics.shape import model_shape_scores
from modbal.report.analyze import load_trained, split_loader
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
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "synthetic.yaml"))
    p.add_argument("--fusions", default="concat,maxout")
    p.add_argument("--methods", default="joint,agm")
    p.add_argument("--seeds", type=int, default=2, help="multimodal runs per fusion × method")
    p.add_argument("--concept-seeds", type=int, default=5, help="concept initializations per modality")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the recipe's)")
    p.add_argument("--alpha", type=float, default=120.0, help="ridge penalty")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/competition_study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fusions, methods = args.fusions.split(","), args.methods.split(",")
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    t0 = time.perf_counter()

    rows = []  # one per multimodal run
    for fusion in fusions:
        fuse = [f"model.fusion={{name: {fusion}}}"]
        # the concepts of this fusion: trained once, shared by every run of the fusion
        concept_dirs: dict[tuple[str, int], Path] = {}
        base = load_recipe(args.recipe, fuse + extra)
        modalities = list(build_data(base)["modalities"])
        for m in modalities:
            for k in range(args.concept_seeds):
                d = out / fusion / "concepts" / f"{m}-seed{k}"
                _run(load_recipe(args.recipe, fuse + extra + ["method=unimodal", f"method.modality={m}", f"seed={k}"]), d)
                concept_dirs[(m, k)] = d
        for method in methods:
            for seed in range(args.seeds):
                run_dir = out / fusion / f"{method}-seed{seed}"
                _run(load_recipe(args.recipe, fuse + extra + [f"method={method}", f"seed={seed}"]), run_dir)
                model, config, data = load_trained(run_dir)
                bs = int(config["train"]["eval_batch_size"] or config["train"]["batch_size"])
                probe, evaluation = split_loader(data, "val", bs), split_loader(data, "test", bs)
                d_by_seed: dict[str, list[float]] = {m: [] for m in data["modalities"]}
                for k in range(args.concept_seeds):
                    concepts = {m: load_trained(concept_dirs[(m, k)], data=data)[0] for m in data["modalities"]}
                    for m, d in competition_scores(model, concepts, probe, evaluation, alpha=args.alpha).items():
                        d_by_seed[m].append(d)
                shape = model_shape_scores(model, split_loader(data, "test", bs), muting="inputs")
                summary = json.loads((run_dir / "summary.json").read_text())
                rows.append({"fusion": fusion, "method": method, "seed": seed, "acc": summary["test"]["acc"],
                             "d": d_by_seed, "phi": shape["shapley"], "cooperation": shape["cooperation"],
                             "modalities": list(data["modalities"])})
    concept_acc = {}
    for fusion in fusions:
        for path in sorted((out / fusion / "concepts").iterdir()):
            s = json.loads((path / "summary.json").read_text())
            concept_acc.setdefault((fusion, path.name.rsplit("-seed", 1)[0]), []).append(s["test"]["acc"])
    elapsed = time.perf_counter() - t0
    mods = rows[0]["modalities"]

    print(f"## Competition strength on the synthetic task ({len(rows)} runs, {args.concept_seeds} concept "
          f"seeds, α = {args.alpha:g}, {elapsed / 60:.1f} min)\n")
    print("d_m: mean ± std over run seeds × concept seeds; φ_m: Shapley value of test accuracy (points).\n")
    print("| fusion | method | runs | test acc (%) | " + " | ".join(f"d_{m}" for m in mods) + " | "
          + " | ".join(f"φ_{m} (%)" for m in mods) + " |")
    print("|" + "---|" * (3 + 1 + 2 * len(mods)))
    for fusion in fusions:
        for method in methods:
            g = [r for r in rows if r["fusion"] == fusion and r["method"] == method]
            cells = [_fmt([d for r in g for d in r["d"][m]]) for m in mods]
            cells += [_fmt([r["phi"][m] for r in g], 1, 100) for m in mods]
            print(f"| {fusion} | {method} | {len(g)} | {_fmt([r['acc'] for r in g], 1, 100)} | " + " | ".join(cells) + " |")

    print("\n### Stability across concept initializations\n")
    print("Within-run std: std of d_m over the concept seeds for one multimodal model (mean over runs); "
          "between-run std: std over runs of the concept-seed mean.\n")
    print("| fusion | modality | concept test acc (%) | within-run std of d | between-run std of d | range over concept seeds (mean) |")
    print("|---|---|---|---|---|---|")
    for fusion in fusions:
        g = [r for r in rows if r["fusion"] == fusion]
        for m in mods:
            within = statistics.fmean(statistics.stdev(r["d"][m]) for r in g) if args.concept_seeds > 1 else float("nan")
            means = [statistics.fmean(r["d"][m]) for r in g]
            between = statistics.stdev(means) if len(means) > 1 else float("nan")
            spread = statistics.fmean(max(r["d"][m]) - min(r["d"][m]) for r in g)
            print(f"| {fusion} | {m} | {_fmt(concept_acc[(fusion, m)], 1, 100)} | {within:.3f} | {between:.3f} | {spread:.3f} |")

    print("\n### Agreement with SHAPE (Spearman ρ between d_m and φ_m)\n")
    print("A modality whose concept is lost (high d_m) should contribute little (low φ_m): ρ < 0 means agreement.\n")
    print("| pairs | n | Spearman ρ | p |")
    print("|---|---|---|---|")
    sets = {"all (run, modality)": [(statistics.fmean(r["d"][m]), r["phi"][m]) for r in rows for m in mods]}
    for m in mods:
        sets[f"{m} only"] = [(statistics.fmean(r["d"][m]), r["phi"][m]) for r in rows]
    for name, pairs in sets.items():
        if len(pairs) < 3:
            print(f"| {name} | {len(pairs)} | — (too few) | — |")
            continue
        rho, pval = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        print(f"| {name} | {len(pairs)} | {rho:.3f} | {pval:.3g} |")


if __name__ == "__main__":
    main()
