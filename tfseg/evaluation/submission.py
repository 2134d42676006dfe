"""Score a Kaggle-format submission (id,class,predicted) against train.csv-style labels with the
leaderboard metric, the way the competition's grader does: every labelled slice and class needs a row,
masks are decoded at the size the scan file names give, case-days are stacked in slice order.
TensorFlow-free and fast: a whole fold's submission takes seconds."""

import os
from pathlib import Path

import numpy as np
import pandas as pd

from tfseg import CLASSES
from tfseg.errors import DataError
from tfseg.evaluation.metric import Scores
from tfseg.kaggle import rle
from tfseg.kaggle.index import ID_PATTERN, read_labels, scan_sizes

COLUMNS = ("id", "class", "predicted")


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """The submission as one row per slice id with a predicted RLE column per class; DataError names
    the line of a bad row (unknown class, malformed id, a (id, class) pair given twice)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: submission file does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    if missing := [c for c in COLUMNS if c not in table.columns]:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(COLUMNS)}; "
                        f"found {','.join(map(str, table.columns))})")
    line = table.index + 2  # as a person counts lines: the header is line 1
    checks = [(~table["id"].str.fullmatch(ID_PATTERN.pattern),
               "id {id!r} is not of the form case{{C}}_day{{D}}_slice_{{SSSS}}"),
              (~table["class"].isin(CLASSES), f"unknown class {{cls!r}} (expected one of {', '.join(CLASSES)})"),
              (table.duplicated(["id", "class"]), "a second row for id {id!r} and class {cls!r}")]
    for bad, message in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            where = message.format(id=table["id"].iloc[i], cls=table["class"].iloc[i])
            raise DataError(f"{path} line {line[i]}: {where}")
    table["line"] = line
    return table


def _masks(rles, shape, where) -> np.ndarray:
    """Decoded masks [D, H, W, 3] of one case-day from RLEs [D, 3]; DataError says `where(k, c)` an RLE
    does not fit the scan."""
    out = np.zeros((len(rles), *shape, len(CLASSES)), np.uint8)
    for k, row in enumerate(rles):
        for c in range(len(CLASSES)):
            try:
                out[k, ..., c] = rle.decode(row[c], shape)
            except ValueError as err:
                raise DataError(f"{where(k, c)}: {err} ({shape[1]} x {shape[0]} scan)") from None
    return out


def score_submission(submission: str | os.PathLike, labels: str | os.PathLike, data_dir: str | os.PathLike, *,
                     only_submitted_volumes: bool = False, empty_dice: str = "skip",
                     hausdorff: str = "joined") -> tuple[dict, list[dict]]:
    """(summary, per-volume rows) of a submission: see metric.Scores. Every labelled (id, class) must be
    in the submission and every submitted one in the labels; only_submitted_volumes scores just the
    case-days the submission has (every slice of those still needed)."""
    submission, labels, data_dir = Path(submission), Path(labels), Path(data_dir)
    table = read_submission(submission)
    truth = read_labels(labels)
    sizes = scan_sizes(data_dir).set_index("id")
    if only_submitted_volumes:
        case_days = set(table["id"].str.rsplit("_slice_", n=1).str[0])
        truth = truth[truth["id"].str.rsplit("_slice_", n=1).str[0].isin(case_days)]
    wanted = {(i, c) for i in truth["id"] for c in CLASSES}
    given = set(zip(table["id"], table["class"], strict=True))
    if extra := sorted(given - wanted):
        line = table.loc[(table["id"] == extra[0][0]) & (table["class"] == extra[0][1]), "line"].iloc[0]
        raise DataError(f"{submission} line {line}: id {extra[0][0]!r} class {extra[0][1]} is not in {labels} "
                        f"({len(extra)} such row(s))")
    if missing := sorted(wanted - given):
        raise DataError(f"{submission}: no row for id {missing[0][0]!r} class {missing[0][1]}, which {labels} "
                        f"lists ({len(missing)} row(s) missing)")
    if unsized := sorted(set(truth["id"]) - set(sizes.index)):
        raise DataError(f"{data_dir}: no scan file for {unsized[0]!r} ({len(unsized)} labelled slice(s) without "
                        "one): the scan file names give the mask sizes")
    predicted = table.pivot(index="id", columns="class", values="predicted").reindex(columns=list(CLASSES))
    pred_lines = table.pivot(index="id", columns="class", values="line").reindex(columns=list(CLASSES))
    truth = truth.set_index("id").join(sizes)
    scores, rows = Scores(empty_dice=empty_dice, hausdorff=hausdorff), []
    for case_day, volume in truth.sort_values(["case_day", "slice"]).groupby("case_day", sort=True):
        shape = (int(volume["height"].iloc[0]), int(volume["width"].iloc[0]))
        if len(volume[["height", "width"]].drop_duplicates()) > 1:
            raise DataError(f"{data_dir}: the scans of {case_day} differ in size; a case-day is one volume")
        ids = list(volume.index)
        lines = pred_lines.loc[ids].to_numpy()
        pred = _masks(predicted.loc[ids].to_numpy(), shape,
                      lambda k, c, lines=lines: f"{submission} line {lines[k, c]}")
        true = _masks(volume[list(CLASSES)].to_numpy(), shape,
                      lambda k, c, ids=ids: f"{labels}: id {ids[k]!r} class {CLASSES[c]}")
        rows.append(scores.add(case_day, pred, true))
    if not rows:
        raise DataError(f"{labels}: no labelled slice to score")
    return scores.summary(), rows
