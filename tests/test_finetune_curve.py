"""The learning-curve command's table and plot (backend/finetune/curve.py), on numbers: the jobs
behind them are the real fine-tuning job (tests/test_finetune_stages.py, the PH2 e2e tests)."""
from __future__ import annotations

from backend.finetune.curve import _on, plot, table


def _row(labels, noc90, promoted=True, first=None):
    row = {"labels": labels, "promoted": None if labels == 0 else promoted, "job_s": 300.0,
           "unseen": {"noc85": noc90 - 1, "noc90": noc90, "nof90": 1}}
    if labels:
        row["holdout"] = {"instances": 10, "parent": {"noc90": 8.0}, "candidate": {"noc90": 3.0}}
    if first:
        row["first_holdout"] = first
    return row


def test_first_holdout_compares_only_the_instances_both_rounds_have():
    per_instance = {"a": [3, 2], "b": [1, 1], "c": [2, 5], "new": [9, 1]}
    assert _on(per_instance, ["a", "b", "c", "gone"]) == {"instances": 3, "parent": 2.0, "candidate": 8 / 3,
                                                          "worse": 1, "better": 1}


def test_table_and_plot(tmp_path):
    rows = [_row(0, 9.0), _row(50, 4.5), _row(100, 3.6, promoted=False)]
    text = table(rows)
    assert text.splitlines()[0].count("|") == 9 and "first holdout" not in text
    assert "| 50 | 3.50 | 4.50 | 1 | -50% | 8.00 -> 3.00 (10) | yes | 5.0 min |" in text
    assert "| 100 | 2.60 | 3.60 | 1 | -60% | 8.00 -> 3.00 (10) | no | 5.0 min |" in text
    chained = [rows[0], _row(50, 4.5, first={"instances": 10, "parent": 8.0, "candidate": 3.0, "worse": 0, "better": 9}),
               _row(100, 3.6, first={"instances": 10, "parent": 3.0, "candidate": 2.5, "worse": 1, "better": 4})]
    text = table(chained)
    assert "first holdout NoC@90" in text.splitlines()[0]
    assert "| 3.00 -> 2.50 (1 worse) | yes |" in text
    png = plot(chained, tmp_path / "curve.png", "PH2", chain=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "curve.tmp.png").exists()
