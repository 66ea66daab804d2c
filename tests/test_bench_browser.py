"""The HTML leaderboard in a real headless browser: every figure decodes (naturalWidth > 0), no
external resource is referenced, and a screenshot renders."""
import re

import numpy as np
from _browser import chromium, loaded_image_widths, needs_chromium

from modbal.bench.html import leaderboard_html
from modbal.bench.stats import t_interval


def _stat(values):
    s = t_interval(values)
    return {"n": s.n, "mean": s.mean, "std": s.std, "ci_lo": s.lo, "ci_hi": s.hi}


def make_board(seed=0):
    """A leaderboard as modbal.bench.leaderboard builds it: one task, two fusions, an n/a cell."""
    rng = np.random.default_rng(seed)
    groups = []
    for fusion, shift in (("concat", 0.0), ("gated", -0.02)):
        rows = []
        for label, method, modality, base, cost in (
                ("unimodal fast", "unimodal", "fast", 0.70, 0.9), ("unimodal slow", "unimodal", "slow", 0.80, 0.9),
                ("joint", "joint", None, 0.84, 1.0), ("agm", "agm", None, 0.88, 2.1),
                ("ogm_ge", "ogm_ge", None, 0.85, 1.2)):
            accs = list(base + shift + 0.01 * rng.standard_normal(5))
            mono = {m: list(c + 0.02 * rng.standard_normal(5)) for m, c in (("fast", 0.6), ("slow", 0.7))}
            rows.append({"label": label, "method": method, "modality": modality, "status": "ok",
                         "budget": {"drawn": 3, "space": 9 if method == "agm" else 3}, "chosen": {"optim.lr": 0.03},
                         "seeds": [3, 4, 5, 6, 7], "test_acc": accs, "macro_f1": accs, "mono_acc": mono,
                         "acc": _stat(accs), "f1": _stat(accs), "mono": {m: _stat(v) for m, v in mono.items()},
                         "step_ratio": cost, "runs": 14, "train_s": 40.0,
                         **({"diff": {**_stat([0.01] * 5), "p": 0.01, "p_holm": 0.02}, "gap_closed": 0.4}
                            if method not in ("joint", "unimodal") else {})})
        rows.append({"label": "mses", "method": "mses", "modality": None, "status": "n/a", "budget": {"drawn": 3,
                     "space": 6}, "reason": "the encoders have no parameters"})
        ens = list(0.9 + shift + 0.01 * rng.standard_normal(5))
        ensemble = {"members": ["unimodal fast", "unimodal slow"], "seeds": [3, 4, 5, 6, 7], "test_acc": ens,
                    "macro_f1": ens, "acc": _stat(ens), "f1": _stat(ens)}
        groups.append({"task": "synthetic", "fusion": fusion, "modalities": ["fast", "slow"], "reference": "joint",
                       "rows": rows, "ensemble": ensemble})
    protocol = {"selection_seeds": [0, 1, 2], "report_seeds": [3, 4, 5, 6, 7], "budget": 3, "sampler_seed": 0,
                "select": "val acc", "lrs": [0.01, 0.03, 0.1], "tasks": {}}
    return {"study": "demo", "source": "demo.yaml", "description": "A leaderboard for the browser test.",
            "protocol": protocol, "tasks_na": {"mfeat": "no data"}, "groups": groups, "runs": 140, "train_s": 600.0}


def test_leaderboard_page_is_self_contained():
    page = leaderboard_html(make_board())
    assert page.count("<img ") == 4  # dot plot, cost, mono-modal per fusion (2)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "n/a: no data" in page and "n/a: the encoders have no parameters" in page


@needs_chromium
def test_leaderboard_images_load_in_headless_chromium(tmp_path):
    page = tmp_path / "leaderboard.html"
    page.write_text(leaderboard_html(make_board()))
    widths = loaded_image_widths(page.read_text(), tmp_path)
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    shot = tmp_path / "leaderboard.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri(), cwd=tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000
