"""Import a script of ``benchmarks/`` as a module, or skip the test where the checkout has none."""
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (skips when it is absent)."""
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"no benchmarks/{name}.py in this checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
