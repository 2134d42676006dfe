"""Masks for new scans: run an exported SavedModel over a Kaggle-layout folder and write a submission.

`python -m tfseg.predict --model saved_models/NAME/1 --data-dir DIR` loads the SavedModel (no Keras
model, no run folder), sends each volume's scans to its serving_default signature as the PNG files'
own bytes, K-slice contexts built from the model's offsets, and writes submission.csv
(id,class,predicted; three rows per slice in tfseg.CLASSES order; RLE at the scan's resolution).

Normalisation happens over each request, so by default a request is a whole volume: exactly what
training and evaluate see. --batch-size N sends N slices per request instead (normalised over those
slices only: a little different from training, in exchange for smaller requests).
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from tfseg import CLASSES, cli, components, export, files, index, metric, overlay, records, rle, scans
from tfseg.client import context_rows
from tfseg.errors import DataError


def load_model(path: str | Path):
    """(serving_default signature, tfseg.json info) of an exported SavedModel."""
    info = export.read_info(path)
    if list(info["classes"]) != list(CLASSES):
        raise DataError(f"{path}: model classes {info['classes']} differ from tfseg's {list(CLASSES)}")
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]

    def serve(slices, _owner=loaded):  # _owner keeps the variables alive as long as `serve`
        return signature(slices=slices)

    return serve, info


def predict_volume(serve, pngs: list[bytes], offsets, batch_size: int = 0, *,
                   min_component: int = 0, min_fraction: float = 0.0, name: str = "volume") -> np.ndarray:
    """Masks uint8 [D, H, W, 3] for one volume's scans (PNG bytes in slice order)."""
    rows = context_rows(pngs, offsets)
    step = batch_size if batch_size > 0 else len(rows)
    masks = []
    for start in range(0, len(rows), step):
        try:
            out = serve(tf.constant(rows[start:start + step], tf.string))
        except tf.errors.InvalidArgumentError as err:
            raise DataError(f"{name}: the model rejected the scans: {export.reason(err.message)}") from None
        masks.append(out["masks"].numpy())
    return components.clean(np.concatenate(masks), min_component, min_fraction)


def select(table: pd.DataFrame, case_days=None, folds=None, records_dir=None) -> pd.DataFrame:
    """Rows of the chosen case-days and/or the cases of the chosen record folds."""
    if case_days:
        unknown = sorted(set(case_days) - set(table["case_day"]))
        if unknown:
            raise DataError(f"--case-days: {', '.join(unknown)} not in the data folder")
        table = table[table["case_day"].isin(case_days)]
    if folds:
        manifest = records.read_manifest(records_dir)
        cases = {int(c) for f in manifest["folds"] if f["fold"] in set(folds) for c in f["case_ids"]}
        table = table[table["case"].isin(cases)]
    if table.empty:
        raise DataError("no slices left after --case-days / --folds")
    return table


def overlay_slices(pred: np.ndarray, count: int) -> list[int]:
    """Indices (in slice order) of up to `count` slices of [D, H, W, C] masks that show every predicted
    organ: each class's largest slices in turn (the stomach is small next to the bowels: ranked by
    total area it would never be shown), then the slices with the most organ overall."""
    area = pred.sum(axis=(1, 2), dtype=np.int64)  # [D, C]; signed: -area of uint8 sums would wrap
    per_class = [[i for i in np.argsort(-area[:, c], kind="stable") if area[i, c] > 0] for c in range(area.shape[1])]
    candidates = [*itertools.chain.from_iterable(itertools.zip_longest(*per_class)),
                  *np.argsort(-area.sum(axis=1), kind="stable")]
    chosen = dict.fromkeys(int(i) for i in candidates if i is not None)
    return sorted(list(chosen)[:count])


def overlay_grid(path: Path, case_day: str, scan_paths: list[str], pred: np.ndarray, truth=None,
                 count: int = 6) -> None:
    """Contours of a few slices showing every predicted organ (solid: truth when known, dashed: predicted)."""
    chosen = overlay_slices(pred, count)
    images = [overlay.draw_contours(scans.read_scan(scan_paths[i]), None if truth is None else truth[i], pred[i])
              for i in chosen]
    overlay.save_grid(images, [f"{case_day} slice {i + 1}" for i in chosen], path, pred=True)


def predict(model: str | Path, data_dir: str | Path, *, split: str | None = None, batch_size: int = 0,
            case_days=None, folds=None, overlays: str | Path | None = None, progress: bool = True
            ) -> tuple[pd.DataFrame, list[dict]]:
    """(submission table, per-volume scores when the folder has labels) for a Kaggle-layout folder."""
    serve, info = load_model(model)
    split = split or ("train" if Path(data_dir, "train.csv").exists() else "test")
    table = select(index.read_index(data_dir, split), case_days, folds, info["config"]["data"]["records"])
    rows, scores = [], []
    bar = tqdm(total=len(table), unit="slice", desc="predict", disable=not progress)
    for case_day, volume in table.groupby("case_day", sort=False):
        pngs = [Path(p).read_bytes() for p in volume["path"]]
        masks = predict_volume(serve, pngs, info["offsets"], batch_size, min_component=info["min_component"],
                               min_fraction=info.get("min_component_fraction", 0.0), name=case_day)
        shape = (int(volume["height"].iloc[0]), int(volume["width"].iloc[0]))
        if masks.shape[1:3] != shape:
            raise DataError(f"{case_day}: scans decode to {masks.shape[2]} x {masks.shape[1]} (W x H) but their "
                            f"file names say {shape[1]} x {shape[0]}")
        for slice_id, mask in zip(volume["id"], masks, strict=True):
            rows += [(slice_id, name, rle.encode(mask[..., c])) for c, name in enumerate(CLASSES)]
        truth = None
        if split == "train":
            truth = np.stack([np.stack([rle.decode(r[c], shape) for c in CLASSES], axis=-1)
                              for _, r in volume.iterrows()])
            scores.append({"case_day": case_day} | metric.score_volume(masks, truth))
        if overlays:
            overlay_grid(Path(overlays) / f"{case_day}.png", case_day, list(volume["path"]), masks, truth)
        bar.update(len(volume))
    bar.close()
    return pd.DataFrame(rows, columns=["id", "class", "predicted"]), scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SavedModel version folder written by tfseg.export")
    parser.add_argument("--data-dir", required=True, help="Kaggle-layout folder (train.csv + train/, or test/)")
    parser.add_argument("--split", choices=("train", "test"),
                        help="which scans to predict (default: train if DATA_DIR/train.csv exists, else test)")
    parser.add_argument("--out", default="submission.csv", help="submission CSV to write (default: %(default)s)")
    parser.add_argument("--overlays", metavar="DIR",
                        help="also write one PNG per volume with contours of a few slices showing each organ")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="slices per request; 0 (default) sends whole volumes, normalised exactly as in "
                             "training")
    parser.add_argument("--case-days", help="only these volumes, comma-separated (e.g. case1_day2,case7_day0)")
    parser.add_argument("--folds", type=int, nargs="+",
                        help="only the cases of these record folds (held-out volumes; folds from the records "
                             "the model was trained on)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    case_days = [c.strip() for c in args.case_days.split(",") if c.strip()] if args.case_days else None
    submission, scores = predict(args.model, args.data_dir, split=args.split, batch_size=args.batch_size,
                                 case_days=case_days, folds=args.folds, overlays=args.overlays,
                                 progress=not args.no_progress)
    with files.atomic_path(args.out) as tmp:
        submission.to_csv(tmp, index=False)
    volumes = submission["id"].str.rsplit("_slice_", n=1).str[0].nunique()
    print(f"wrote {args.out}: {len(submission) // len(CLASSES)} slices of {volumes} volume(s)")
    if scores:
        summary = metric.summarize(scores)
        print(f"score {summary['score']:.4f} (dice {summary['dice']:.4f}, hausdorff {summary['hausdorff']:.4f}) "
              f"against the folder's labels")
    if args.overlays:
        print(f"overlays in {args.overlays}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
