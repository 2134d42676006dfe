"""Cross-validation folds: whole cases (patients) per fold, balanced in volumes, slices and organ content.

A case's days are scans of one patient, so they share a fold; otherwise validation would see the
training patients. Assignment is greedy and deterministic: cases from largest to smallest (a seeded
shuffle breaks ties) each go to the fold where they least unbalance five totals (case-days, slices,
slices showing each organ), each relative to its per-fold target.
"""

import numpy as np
import pandas as pd

from tfseg import CLASSES
from tfseg.errors import DataError

FOLD_SEED = 0


def assign_folds(table: pd.DataFrame, n_folds: int, seed: int = FOLD_SEED) -> dict[str, int]:
    """case_day -> fold (0..n_folds-1) for a per-slice table with tfseg.index columns
    (case, case_day and one RLE column per class; "" where the organ is absent)."""
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, not {n_folds}")
    has_organ = table[list(CLASSES)].fillna("").astype(str).apply(lambda col: col.str.strip() != "")
    volumes = pd.concat([table[["case", "case_day"]], has_organ], axis=1).groupby(["case", "case_day"]).agg(
        slices=("case_day", "size"), **{c: (c, "sum") for c in CLASSES}).reset_index()
    cases = volumes.groupby("case").agg(volumes=("case_day", "size"), slices=("slices", "sum"),
                                        **{c: (c, "sum") for c in CLASSES})
    if len(cases) < n_folds:
        raise DataError(f"only {len(cases)} case(s) for {n_folds} folds: a fold holds whole cases "
                        f"(patients), so each fold needs one; use --num-folds {len(cases)} or fewer")
    amounts = cases.to_numpy(np.float64)  # [cases, quantities]
    totals = amounts.sum(axis=0)
    # Choosing the fold with the least weighted load minimises the sum of squared relative loads.
    weights = np.divide(1.0, (totals / n_folds) ** 2, out=np.zeros_like(totals), where=totals > 0)
    tie_break = np.random.default_rng(seed).permutation(len(cases))
    order = np.lexsort((tie_break, -(amounts * np.sqrt(weights)).sum(axis=1)))  # biggest cases first
    loads = np.zeros((n_folds, amounts.shape[1]))
    fold_of_case = {}
    for i in order:
        fold = int(np.argmin(loads @ (amounts[i] * weights)))
        loads[fold] += amounts[i]
        fold_of_case[cases.index[i]] = fold
    return {cd: fold_of_case[case] for case, cd in zip(volumes["case"], volumes["case_day"], strict=True)}
