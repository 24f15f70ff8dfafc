"""benchmarks/quality_sweep.py without training: its table and its deadline (each real cell is a whole run)."""

from __future__ import annotations

import sys
import time

from components.config import PACKAGE_ROOT

sys.path.insert(0, str(PACKAGE_ROOT / "benchmarks"))
import quality_sweep


def _cell(variant: str, seed: int, test: float, stopped: str = "max epochs") -> dict:
    return {"variant": variant, "seed": seed, "test": test, "val": 0.5, "fit": 0.9, "stopped": stopped}


def test_the_table_marks_deadline_and_early_stops_apart_and_averages_finished_cells() -> None:
    cells = [_cell("base", 42, 0.6), _cell("base", 7, 0.4, "early stop: no better val macro-F1 for 15 epochs"),
             _cell("long", 42, 0.5, "time budget of 3 min reached"), {"variant": "long", "seed": 7, "failed": "exit 1"}]
    lines = quality_sweep._table(cells, ["base", "long"], [42, 7])
    base, long = lines[1].split(), lines[2].split()
    assert base == ["base", "0.600", "(0.50)", "0.400", "(0.50)e", "0.500", "2/2", "0.900"]
    assert long == ["long", "0.500", "(0.50)*", "exit", "1", "0.500*", "1/2!", "0.900"]  # one split, deadline-stopped


def test_no_run_starts_after_the_deadline(tmp_path) -> None:
    job = {"variant": "base", "seed": 42, "overrides": {}}
    assert quality_sweep._run(job, "cpu", time.time() - 1, tmp_path)["skipped"] == "deadline"
