import numpy as np
import pandas as pd
import pytest

from tfseg import CLASSES
from tfseg.errors import DataError
from tfseg.kaggle.folds import assign_folds


def _table(days_per_case, slices=(144, 80), seed=0) -> pd.DataFrame:
    """A per-slice table like tfseg.index's: given days per case, random organ presence per volume."""
    rng = np.random.default_rng(seed)
    rows = []
    for case, days in enumerate(days_per_case, start=1):
        depth = int(rng.choice(slices))
        for day in range(days):
            share = rng.uniform(0.05, 0.7, len(CLASSES))
            for _ in range(depth):
                organs = ("1 4" if rng.random() < p else "" for p in share)
                rows.append((case, f"case{case}_day{day}", *organs))
    return pd.DataFrame(rows, columns=["case", "case_day", *CLASSES])


def _fold_totals(table, folds) -> pd.DataFrame:
    organs = table[list(CLASSES)] != ""
    frame = pd.concat([table[["case", "case_day"]], organs], axis=1).assign(fold=table["case_day"].map(folds))
    return frame.groupby("fold").agg(volumes=("case_day", "nunique"), slices=("case", "size"),
                                     **{c: (c, "sum") for c in CLASSES})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_case_in_two_folds_and_every_volume_assigned(seed):
    rng = np.random.default_rng(seed)
    table = _table(rng.integers(1, 6, 23), seed=seed)
    folds = assign_folds(table, 5)
    assert set(folds) == set(table["case_day"])
    assert set(folds.values()) == set(range(5))
    fold_of_case = table.assign(fold=table["case_day"].map(folds)).groupby("case")["fold"].nunique()
    assert (fold_of_case == 1).all()


def test_full_scale_folds_are_balanced():
    """85 cases with 1 to 5 days (255 volumes, near the real 274): fold totals within a few % of the mean."""
    days = np.random.default_rng(3).permutation(np.repeat([1, 2, 3, 4, 5], [10, 20, 25, 20, 10]))
    table = _table(days, seed=3)
    totals = _fold_totals(table, assign_folds(table, 5))
    relative = totals / totals.mean()
    assert relative["volumes"].between(0.95, 1.05).all(), totals
    assert relative[["slices", *CLASSES]].stack().between(0.92, 1.08).all(), totals


def test_deterministic_whatever_the_row_order():
    table = _table([3, 1, 2, 4, 1, 1, 2, 3, 2, 1, 5, 1])
    assert assign_folds(table, 3) == assign_folds(table.sample(frac=1, random_state=1), 3)


def test_as_many_cases_as_folds_gives_one_case_each():
    table = _table([1, 3, 2])
    folds = assign_folds(table, 3)
    assert sorted(table.assign(f=table["case_day"].map(folds)).groupby("f")["case"].nunique()) == [1, 1, 1]


def test_fewer_cases_than_folds_is_a_data_error():
    with pytest.raises(DataError, match=r"only 2 case\(s\) for 5 folds.*--num-folds 2"):
        assign_folds(_table([2, 1]), 5)
