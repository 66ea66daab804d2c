"""benchmarks/leaderboard_pages.py: the summary table of docs/leaderboard.md from a hand-made leaderboard.json."""

import pytest
from _benchmark_script import load_benchmark_script


@pytest.fixture(scope="module")
def pages():
    return load_benchmark_script("leaderboard_pages")


def row(label, mean, diff=None, p_holm=None):
    out = {"label": label, "acc": {"mean": mean, "std": 0.01}}
    if diff is not None:
        out["diff"] = {"mean": diff, "ci_lo": diff - 0.01, "ci_hi": diff + 0.01, "p_holm": p_holm}
    return out


def board(ensemble_above: bool):
    rows = [row("joint", 0.80), row("a", 0.84, 0.04, 0.01), row("b", 0.82, 0.02, 0.30),
            row("c", 0.75, -0.05, 0.02), row("d", 0.79, -0.01, 0.04), row("e", 0.83, 0.03, 0.049)]
    ensemble = {"acc": {"mean": 0.85}, "diff": {"mean": 0.05, "ci_lo": 0.02, "ci_hi": 0.08},
                "above_ref": ensemble_above}
    return {"study": "toy", "groups": [{"task": "t", "fusion": "concat", "reference": "joint", "rows": rows,
                                        "ensemble": ensemble}]}


def test_a_row_lists_the_significant_methods_by_their_difference(pages):
    (line,) = pages.summary_rows(board(ensemble_above=True))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["[toy](research/leaderboard/toy.md)", "t / concat", "80.0 ± 1.0", "85.0 (+5.0 [+2.0, +8.0])",
                     "a (+4.0, 0.01), e (+3.0, 0.049)", "c (-5.0, 0.02), d (-1.0, 0.04)"]


def test_without_a_significant_gain_the_best_method_and_no_gap_are_named(pages):
    b = board(ensemble_above=False)
    for r in b["groups"][0]["rows"][1:]:
        r["diff"]["p_holm"] = 0.5
    (line,) = pages.summary_rows(b)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:] == ["85.0 (+5.0: no gap)", "none (best a +4.0, Holm p 0.5)", "none"]


def test_the_table_between_the_markers_is_replaced_and_the_rest_kept(pages, tmp_path):
    page = tmp_path / "leaderboard.md"
    page.write_text(f"intro\n\n{pages.BEGIN}\n| old |\n{pages.END}\n\nafter\n")
    pages.write_summary([board(ensemble_above=True)], page)
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nafter\n") and "| old |" not in text
    assert text.count("| [toy](research/leaderboard/toy.md) |") == 1
    page.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        pages.write_summary([board(ensemble_above=True)], page)
