"""``modbal report``, ``modbal analyze competition|shape`` and ``modbal sweep`` (registered by
:func:`register` into the top-level parser of ``modbal/cli.py``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from ..metrics.competition import DEFAULT_ALPHA

SPLITS = ("train", "val", "test")
FIGURE_FORMATS = ("png", "svg", "pdf")  # modbal.report.plots.FORMATS, without importing matplotlib for --help


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..bench.grid import GridError
    from ..bench.study import StudyError
    from ..config import ConfigError
    from .sweep import SweepError

    return (ConfigError, SweepError, StudyError, GridError, FileNotFoundError)


def _guard(name: str, body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors a user can fix: one clear line on stderr, exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except _user_errors() as e:
            print(f"modbal {name}: error: {e}", file=sys.stderr)
            return 2

    return run


# -- report ------------------------------------------------------------------------------------
def _report(args: argparse.Namespace) -> int:
    from .html import write_report
    from .tables import load_runs

    runs = load_runs(args.runs)
    if not runs:
        raise FileNotFoundError(f"no run directories in {', '.join(args.runs)}")
    paths = write_report(runs, args.out, title=args.title, fmt=args.format)
    print(f"{len(runs)} runs → {paths['markdown']}, {paths['html']}, {paths['figures']}/*.{args.format}")
    return 0


# -- analyze -----------------------------------------------------------------------------------
def _analyze_competition(args: argparse.Namespace) -> int:
    from .analyze import analysis_targets, competition

    for run_dir in analysis_targets(args.runs):
        print(f"{run_dir}:")
        res = competition(run_dir, alpha=args.alpha, probe_split=args.probe_split, eval_split=args.eval_split,
                          concept_seeds=args.concept_seeds, checkpoint=args.checkpoint, retrain=args.retrain,
                          device=args.device, allow_shared_init=args.allow_shared_init,
                          concept_cache=args.concept_cache)
        std = res["scores_std"] if len(res["concept_seeds"]) > 1 else {}
        cells = [f"d_{m} = {d:.4f}" + (f" ± {std[m]:.4f}" if m in std else "") for m, d in res["scores"].items()]
        print("  competition strength " + "  ".join(cells) + f"  → {run_dir / 'competition.json'}")
    return 0


def _analyze_shape(args: argparse.Namespace) -> int:
    from .analyze import analysis_targets, shape

    for run_dir in analysis_targets(args.runs):
        res = shape(run_dir, split=args.split, muting=args.muting, checkpoint=args.checkpoint, device=args.device)
        print(f"{run_dir}: " + "  ".join(f"φ_{m} = {v:.4f}" for m, v in res["shapley"].items())
              + f"  cooperation = {res['cooperation']:.4f}  → {run_dir / 'shape.json'}")
    return 0


# -- sweep -------------------------------------------------------------------------------------
def _sweep(args: argparse.Namespace) -> int:
    from ..bench.cli import executor_from_args
    from .sweep import split_specs, sweep

    recipe = None if args.recipe in ("-", "defaults") else args.recipe
    axes, fixed = split_specs(args.axes)
    out = args.out or str(Path("runs") / f"sweep-{Path(recipe).stem if recipe else 'defaults'}")
    result = sweep(recipe, axes, out, jobs=args.jobs, fixed=fixed, report=not args.no_report,
                   threads=args.threads, analyze=args.analyze, concept_seeds=args.concept_seeds,
                   executor=executor_from_args(args, out), progress=args.progress)
    if result["failed"]:
        print(f"{len(result['failed'])} runs failed: {', '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 0


# -- registration ------------------------------------------------------------------------------
def _seed_list(text: str) -> list[int]:
    """``"3"``, ``"0,1,2"`` or ``"0:5"`` → a list of ints (argparse type; its errors exit 2)."""
    from .sweep import SweepError, expand_values

    try:
        return [int(v) for v in expand_values(text)]
    except (SweepError, ValueError):
        raise argparse.ArgumentTypeError(f"expected K, K1,K2,… or A:B of integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="weights to analyze (default: best)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")


def register(subparsers: Any) -> None:
    """Add ``report``, ``analyze`` and ``sweep`` to the top-level ``modbal`` parser."""
    p = subparsers.add_parser("report", help="aggregate run directories into report.md and report.html",
                              description="Group runs by dataset, fusion, method and every other setting that differs "
                                          "between them (mean ± std over seeds) and write report.md, a "
                                          "self-contained report.html and the figures in figures/.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.add_argument("--title", default="modbal report")
    p.add_argument("--format", choices=FIGURE_FORMATS, default="png",
                   help="file format of the figures in OUT/figures/ (default: png); the page embeds SVG with svg, "
                        "else PNG")
    p.set_defaults(func=_guard("report", _report))

    a = subparsers.add_parser("analyze", help="competition strength and SHAPE contributions of finished runs")
    sub = a.add_subparsers(dest="analysis", metavar="{competition,shape}", required=True)
    c = sub.add_parser("competition", help="d_m against uni-modal concepts (trained or reused in RUN_DIR/concepts/)",
                       description="Train (or reuse) a uni-modal concept per modality, fit a ridge probe from the "
                                   "run's fused representation to each concept's representation on the probe "
                                   "split, and score d_m on the evaluation split (0 = kept, 1 = lost). "
                                   "Writes RUN_DIR/competition.json.")
    _common(c)
    c.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"ridge penalty (default: {DEFAULT_ALPHA:g})")
    c.add_argument("--probe-split", choices=SPLITS, default="val", help="split the probe is fit on (default: val)")
    c.add_argument("--eval-split", choices=SPLITS, default="test", help="split d_m is scored on (default: test)")
    c.add_argument("--concept-seeds", type=_seed_list, default=None, metavar="SEEDS",
                   help="seeds of the concept models, averaged: K, a list 0,1,2 or a range 0:5 "
                        "(default: the run's seed + 1000)")
    c.add_argument("--allow-shared-init", action="store_true",
                   help="allow a concept seed equal to the run's seed (the concept then starts from the run's "
                        "initial weights, which lowers d_m by itself)")
    c.add_argument("--concept-cache", metavar="DIR", default=None,
                   help="keep concepts in DIR, shared by every run with the same dataset, model, optim and "
                        "train settings (default: each run's RUN_DIR/concepts/)")
    c.add_argument("--retrain", action="store_true", help="train the concepts again even when cached")
    c.set_defaults(func=_guard("analyze competition", _analyze_competition))
    s = sub.add_parser("shape", help="Shapley values of accuracy over coalitions of muted inputs (SHAPE)",
                       description="Evaluate every coalition of muted modalities and write RUN_DIR/shape.json "
                                   "with the Shapley value of accuracy per modality and the cooperation term.")
    _common(s)
    s.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    s.add_argument("--muting", choices=("inputs", "features"), default="inputs",
                   help="zeroed inputs (paper code) or zero-sample features (default: inputs)")
    s.set_defaults(func=_guard("analyze shape", _analyze_shape))

    w = subparsers.add_parser("sweep", help="run a grid of configs (cross product) and report it",
                              description="Run the cross product of KEY=v1,v2 and KEY=a:b (integers a..b-1) over "
                                          "RECIPE; single values apply to every run; fusion= is shorthand for "
                                          "model.fusion.name. Complete runs are skipped, interrupted ones resumed; "
                                          "runs train in local processes, on Ray or through submitit (Slurm).")
    w.add_argument("recipe", metavar="RECIPE", help="YAML recipe ('defaults' for none)")
    w.add_argument("axes", nargs="*", metavar="KEY=VALUES", help="e.g. method=joint,agm seed=0:5 fusion=concat,maxout")
    w.add_argument("--out", default=None, help="folder of the run directories (default: runs/sweep-<recipe>)")
    w.add_argument("--progress", action="store_true", help="a progress bar with ETA instead of a line per run")
    w.add_argument("--no-report", action="store_true", help="skip the report at the end")
    w.add_argument("--analyze", action="store_true",
                   help="also score every complete run (SHAPE, competition strength; concepts shared in "
                        "OUT/concept-cache) before the report")
    w.add_argument("--concept-seeds", type=_seed_list, default=None, metavar="SEEDS",
                   help="with --analyze: concept seeds, as for `modbal analyze competition` (default: run seed + 1000)")
    from ..bench.cli import add_executor_options

    add_executor_options(w)
    w.set_defaults(func=_guard("sweep", _sweep))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m modbal.report.cli``) until/besides ``modbal.cli``."""
    parser = argparse.ArgumentParser(prog="modbal")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
