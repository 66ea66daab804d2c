"""The README's Python API example runs as written (with a small loader defined here)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs_and_modulates():
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = [({"audio": torch.randn(16, 64, generator=g), "image": torch.randn(16, 784, generator=g)},
               torch.randint(10, (16,), generator=g)) for _ in range(3)]
    namespace = {"loader": loader, "print": lambda *a: None}
    exec(compile(code, str(README), "exec"), namespace)
    stats = namespace["method"].statistics()
    assert set(stats) >= {"kappa/audio", "kappa/image", "s/audio", "tau/image", "mono_acc/audio"}
    assert any(abs(stats[f"kappa/{m}"] - 1) > 1e-3 for m in ("audio", "image"))  # κ ≠ 1 after step 1
