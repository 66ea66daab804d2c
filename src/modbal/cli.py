"""The ``modbal`` command: train from a recipe, evaluate a run, run the demo, and plug-ins.

Packages add subcommands through ``register(subparsers)`` (``modbal.datasets.cli``,
``modbal.report.cli``); each subcommand sets ``func(args) -> int``. Errors a user can fix print
one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

DESCRIPTION = """\
modbal: modality balancing (AGM and baselines) for multimodal models in plain PyTorch.

Train a recipe, overriding any setting with dotted key=value pairs (values are typed as YAML):
  modbal train recipes/synthetic.yaml
  modbal train synthetic method=agm method.alpha=1.5 seed=2        # a built-in recipe by name
  modbal train recipes/avmnist_late.yaml train.epochs=50 train.device=cuda --run-dir runs/av
Continue an interrupted run exactly where its last checkpoint left it:
  modbal train --resume --run-dir runs/av
Re-evaluate a run's best checkpoint:        modbal eval runs/av
Joint vs AGM on a built-in task (<1 min):  modbal demo
Does my task suffer from competition?      modbal diagnose synthetic
Several processes (DDP; same command):      torchrun --nproc-per-node 2 -m modbal.cli train RECIPE
"""

TRAIN_HELP = """\
Train one run. Results go to the run directory (default runs/<dataset>/<fusion>/<method>-seed<seed>-<time>):
config.yaml, steps.jsonl, epochs.jsonl, summary.json, checkpoints/{best,last}.pt, log.txt.

Overrides: key=value with dotted keys, e.g. seed=3 train.epochs=20 optim.lr=1e-3
  method=agm          switch method (takes that method's block from the recipe's `methods:`)
  method.alpha=2.5    set one of the method's arguments
  dataset.num_train=500 model.fusion.name=sum train.device=cuda train.amp=bf16
"""


class UserError(Exception):
    """A problem the user can fix (exit status 2)."""


def _fail(message: str) -> int:
    print(f"modbal: error: {message}", file=sys.stderr)
    return 2


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_recipe
    from .datasets.io import DatasetFormatError
    from .train.run import DistributedTimeout, run_experiment

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)  # `modbal train --resume --run-dir D key=value` style
        recipe = None
    if recipe is None and not args.resume:
        return _fail("train needs a RECIPE (a YAML file, or a built-in name such as synthetic), "
                     "or --resume --run-dir DIR")
    try:
        config = load_recipe(recipe, overrides) if recipe is not None else None
        if config is None and overrides:
            raise ConfigError("overrides need a RECIPE (a resumed run uses its saved config.yaml)")
        summary = run_experiment(config, args.run_dir, resume=args.resume, quiet=args.quiet)
    except (ConfigError, DatasetFormatError) as e:
        return _fail(str(e))
    except (FloatingPointError, DistributedTimeout) as e:
        print(f"modbal: training stopped: {e}", file=sys.stderr)
        return 1
    if summary.get("status") != "complete":
        print(f"modbal: run ended with status {summary.get('status')!r}", file=sys.stderr)
        return 1
    test = summary["test"]
    mono = " ".join(f"{m}={test.get(f'mono_acc/{m}', float('nan')):.4f}" for m in summary["modalities"])
    print(f"{summary['method']} on {summary['dataset']} ({summary['fusion']}), seed {summary['seed']}: "
          f"best epoch {summary['best_epoch']}; test acc {test['acc']:.4f}, macro-F1 {test['macro_f1']:.4f}; "
          f"mono acc {mono}")
    print(f"run directory: {summary['run_dir']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .datasets.io import DatasetFormatError
    from .train.run import evaluate_run

    try:
        metrics = evaluate_run(args.run_dir, checkpoint=args.checkpoint, split=args.split, device=args.device)
    except (ConfigError, DatasetFormatError) as e:
        return _fail(str(e))
    except FloatingPointError as e:
        print(f"modbal: evaluation stopped: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.run_dir} ({args.checkpoint} checkpoint, {args.split} split)")
        for k, v in metrics.items():
            print(f"  {k:<24} {v:.4f}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .demo import run_demo

    try:
        run_demo(dataset=args.dataset, seeds=args.seeds, epochs=args.epochs, out=args.out,
                 methods=tuple(args.methods.split(",")), quiet=args.quiet, fmt=args.format)
    except ConfigError as e:
        return _fail(str(e))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modbal", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"modbal {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a Python module first (code of yours that registers methods, fusions, encoders or "
                             "datasets; runs with the command's rights); repeatable, accepted anywhere on the "
                             "command line, recorded in each run's config.yaml (imports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one run from a recipe", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="YAML recipe, or the name of a built-in one (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, typed as YAML")
    p.add_argument("--run-dir", help="run directory (default: from the recipe's run_dir, or under runs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint (exactly)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or console log (for CI)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint",
                       description="Evaluate a run directory's checkpoint on one split and print the metrics.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo",
                       help="joint vs AGM on a built-in task, 2 seeds, table + plot (under a minute on 2 CPU cores)",
                       description="Train joint and AGM on a built-in dataset for a few seeds, print a "
                                   "results table and write runs/demo/ with its runs, figures (accuracy and loss "
                                   "curves, coefficients coef/<m>, accuracy per seed, confusion matrices) and report.")
    p.add_argument("--dataset", default="avdigits",
                   help="built-in dataset: avdigits (real MNIST digits + eSpeak speech, built offline on first use) "
                        "or synthetic (default: avdigits)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per method (default: 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's setting)")
    p.add_argument("--methods", default="joint,agm",
                   help="comma-separated methods; unimodal:<modality> adds uni-modal reference runs "
                        "(default: joint,agm)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure files (default: png)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_cmd_demo)

    for module in ("modbal.datasets.cli", "modbal.report.cli", "modbal.bench.cli", "modbal.diagnose"):
        try:
            plugin = importlib.import_module(module)
        except ImportError as e:
            if e.name is None or not module.startswith(e.name):  # the plug-in exists but is broken
                print(f"modbal: warning: skipping the {module} commands ({e})", file=sys.stderr)
            continue
        plugin.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .extras import MissingExtraError
    from .plugins import PluginError, session, split_import_args

    try:  # --import modules first, for every command (and the processes it starts)
        modules, argv = split_import_args(sys.argv[1:] if argv is None else argv)
        with session(modules):
            return _run_command(argv)
    except (PluginError, MissingExtraError) as e:
        return _fail(str(e))


def _run_command(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    field = next((f for f in ("overrides", "axes") if isinstance(getattr(args, f, None), list)), None)
    if extra and field and all("=" in a and not a.startswith("-") for a in extra):
        setattr(args, field, getattr(args, field) + extra)  # key=value after an option (`train R --quiet seed=1`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from .config import ConfigError
    from .datasets.io import DatasetFormatError
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetFormatError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("modbal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
