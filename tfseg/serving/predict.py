"""Predict over a Kaggle-layout folder with an exported SavedModel (`python -m tfseg.predict`): whole
volumes sent as the PNG files' own bytes to the volume signature (or as K-slice context rows), cleaned
masks, a submission table, scores when the folder has labels, and overlay pictures."""

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from tfseg import CLASSES, files, layout
from tfseg.data.context import context_rows
from tfseg.draw import draw_contours, pick_slices, save_grid
from tfseg.errors import DataError
from tfseg.evaluation.metric import Scores
from tfseg.evaluation.postprocess import Postprocess
from tfseg.kaggle import rle
from tfseg.kaggle.index import read_index
from tfseg.kaggle.scans import encode_png, read_scan
from tfseg.labels import label_map
from tfseg.layout import SIGNATURE, VOLUME_PROBABILITIES, read_info
from tfseg.serving import nifti
from tfseg.serving.api import reason


class Served:
    """The signatures predict calls, keeping the loaded SavedModel alive: `volume` (volume_probabilities,
    None in exports older than it) for whole volumes, `rows` (serving_default) for K-slice context rows."""

    def __init__(self, path: str | Path):
        self.loaded = tf.saved_model.load(str(path))
        self.rows = self.loaded.signatures[SIGNATURE]
        self.volume = self.loaded.signatures.get(VOLUME_PROBABILITIES)


def load_model(path: str | Path) -> tuple[Served, dict]:
    """(the SavedModel's signatures, tfseg.json info) of an exported SavedModel."""
    info = read_info(path)
    if list(info["classes"]) != list(CLASSES):
        raise DataError(f"{path}: model classes {info['classes']} differ from tfseg's {list(CLASSES)}")
    return Served(path), info


def predict_volume(serve: Served, pngs: list[bytes], offsets, batch_size: int = 0, *, post: Postprocess | None = None,
                   name: str = "volume") -> np.ndarray:
    """Masks uint8 [D, H, W, 3] for one volume's scans (PNG bytes in slice order), cleaned by `post`.
    batch_size 0: the whole volume in one volume_probabilities call (normalised as in training); N > 0:
    serving_default requests of N context rows, each normalised over its own slices."""
    try:
        if batch_size <= 0 and serve.volume is not None:
            masks = serve.volume(slices=tf.constant(pngs, tf.string))["masks"].numpy()
        else:
            rows = context_rows(pngs, offsets)
            step = batch_size if batch_size > 0 else len(rows)
            masks = np.concatenate([serve.rows(slices=tf.constant(rows[start:start + step], tf.string))["masks"].numpy()
                                    for start in range(0, len(rows), step)])
    except tf.errors.InvalidArgumentError as err:
        raise DataError(f"{name}: the model rejected the scans: {reason(err.message)}") from None
    return (post or Postprocess()).clean(masks)


def select(table: pd.DataFrame, case_days=None, folds=None, fold_cases: dict | None = None) -> pd.DataFrame:
    """Rows of the chosen case-days and/or the cases of the chosen record folds (fold_cases: fold -> case
    numbers, as tfseg.json keeps them)."""
    if case_days:
        unknown = sorted(set(case_days) - set(table["case_day"]))
        if unknown:
            raise DataError(f"--case-days: {', '.join(unknown)} not in the data folder")
        table = table[table["case_day"].isin(case_days)]
    if folds:
        if not fold_cases:
            raise DataError("--folds: the model does not list the cases of its records' folds (tfseg.json "
                            "fold_cases); export it again with this tfseg, or choose --case-days")
        unknown = sorted({int(f) for f in folds} - {int(k) for k in fold_cases})
        if unknown:
            raise DataError(f"--folds: fold(s) {unknown} not among the model's record folds "
                            f"{sorted(int(k) for k in fold_cases)}")
        cases = {int(c) for k, listed in fold_cases.items() if int(k) in set(folds) for c in listed}
        table = table[table["case"].isin(cases)]
    if table.empty:
        raise DataError("no slices left after --case-days / --folds")
    return table


def overlay_grid(path: Path, case_day: str, scans: list, pred: np.ndarray, truth=None, count: int = 6) -> None:
    """Contours of a few slices showing every predicted organ (solid: truth when known, dashed: predicted).
    scans: the slices' files, or the slices themselves [H, W]."""
    chosen = pick_slices(pred, count)
    images = [draw_contours(read_scan(scans[i]) if isinstance(scans[i], str | Path) else scans[i],
                            None if truth is None else truth[i], pred[i]) for i in chosen]
    save_grid(images, [f"{case_day} slice {i + 1}" for i in chosen], path, pred=True)


def predict(model: str | Path, data_dir: str | Path, *, split: str | None = None, batch_size: int = 0,
            case_days=None, folds=None, overlays: str | Path | None = None, progress: bool = True
            ) -> tuple[pd.DataFrame, Scores | None]:
    """(submission table, the Scores of the volumes when the folder has labels, else None) for a
    Kaggle-layout folder."""
    serve, info = load_model(model)
    split = split or ("train" if Path(data_dir, "train.csv").exists() else "test")
    table = select(read_index(data_dir, split), case_days, folds, info.get("fold_cases"))
    post = Postprocess.from_info(info, layout.info_path(model))
    rows, scores = [], Scores() if split == "train" else None
    bar = tqdm(total=len(table), unit="slice", desc="predict", disable=not progress)
    for case_day, volume in table.groupby("case_day", sort=False):
        pngs = [Path(p).read_bytes() for p in volume["path"]]
        masks = predict_volume(serve, pngs, info["offsets"], batch_size, post=post, name=case_day)
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
            scores.add(case_day, masks, truth)
        if overlays:
            overlay_grid(Path(overlays) / f"{case_day}.png", case_day, list(volume["path"]), masks, truth)
        bar.update(len(volume))
    bar.close()
    return pd.DataFrame(rows, columns=["id", "class", "predicted"]), scores


def predict_nifti(model: str | Path, scan: str | Path, out: str | Path, *, batch_size: int = 0,
                  overlays: str | Path | None = None) -> np.ndarray:
    """Predict one NIfTI volume and write its label map (tfseg.labels numbers) to `out` on the scan's grid,
    affine and header (tfseg.serving.nifti: orientation, intensities); returns the masks uint8 [D, H, W, 3]. The
    scan is checked before the model loads, and nothing is written if anything fails."""
    if not nifti.is_nifti(out):
        raise DataError(f"--out {out}: the label map of a NIfTI scan is a NIfTI file; name it .nii.gz or .nii")
    image = nifti.load(scan)
    slices = nifti.read_slices(image, scan)
    serve, info = load_model(model)
    post = Postprocess.from_info(info, layout.info_path(model))
    masks = predict_volume(serve, [encode_png(s) for s in slices], info["offsets"], batch_size, post=post,
                           name=str(scan))
    nifti.write_label_map(label_map(masks), image, out)
    if overlays:
        name = Path(scan).name.removesuffix(".gz").removesuffix(".nii")
        overlay_grid(Path(overlays) / f"{name}.png", name, list(slices), masks)
    return masks


def write_submission(submission: pd.DataFrame, path: str | Path) -> None:
    with files.atomic_path(path) as tmp:
        submission.to_csv(tmp, index=False)
