"""bench/train.py's budgets: a recipe's own budget wins over the common one (bench/train_gpu.sh passes both)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def test_a_recipes_own_budget_wins_over_the_common_one():
    budgets = bench_train.recipe_budgets(2.0, {"baseline": None, "mmar": 0.6})
    assert budgets == {"baseline": 2.0, "mmar": 0.6}


def test_without_budgets_each_recipe_gets_its_default():
    assert bench_train.recipe_budgets(None, {"baseline": None, "mmar": None}) == bench_train.DEFAULT_BUDGETS_MIN
    assert bench_train.recipe_budgets(None, {"baseline": 8.0, "mmar": None}) == {"baseline": 8.0, "mmar": 30.0}
