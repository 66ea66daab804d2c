"""Optional dependencies: imported where they are used, with an error naming the extra to install.

The core install (``pip install modbal``) is what a balancing method in one's own training loop
needs: torch, numpy, pyyaml, tqdm. Dataset loaders, figures and experiment loggers come with the
extras ``data``, ``report``, ``tensorboard`` and ``wandb`` (``all`` for everything).
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: which extra brings each optional top-level package
EXTRAS = {
    "scipy": "data", "h5py": "data", "PIL": "data", "mlxtend": "data", "espeakng_loader": "data",
    "matplotlib": "report", "tensorboard": "tensorboard", "wandb": "wandb",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"scipy.signal"``), or raise :class:`MissingExtraError` naming the
    extra that installs it and what needed it (``purpose``, e.g. ``"the avdigits dataset"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports failed: show that error
        extra = EXTRAS.get(top, "all")
        raise MissingExtraError(f"{purpose} needs the optional package {top!r}, which is not installed: "
                                f"pip install 'modbal[{extra}]'") from e
