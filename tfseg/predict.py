"""Masks for new scans: run an exported SavedModel over a Kaggle-layout folder and write a submission.

`python -m tfseg.predict --model saved_models/NAME/1 --data-dir DIR` loads the SavedModel (no Keras
model, no run folder), sends each volume's scans to its volume_probabilities signature as the PNG files'
own bytes (the model builds the K-slice contexts), cleans the masks and writes submission.csv
(id,class,predicted; three rows per slice in tfseg.CLASSES order; RLE at the scan's resolution).

`python -m tfseg.predict --model saved_models/NAME/1 --scan VOLUME.nii.gz --out LABELS.nii.gz` predicts
one NIfTI volume and writes a NIfTI label map with the scan's affine and header, for 3D Slicer or
ITK-SNAP to overlay: labels 1 large bowel, 2 small bowel, 3 stomach, the higher label where organs
overlap. Slices run along the volume's third axis, each transposed in plane (image row = second axis);
intensities are used as they are when they are whole numbers in 0..65535, else rescaled linearly from
the volume's min..max (harmless: the model normalises each volume between percentiles). See tfseg.serving.nifti.

Normalisation happens over each request, so by default a request is a whole volume: exactly what
training and evaluate see. --batch-size N sends N context rows per request to serving_default instead
(normalised over those rows' slices only: on the hard synthetic data 0.007 % of the mask pixels
differ, mask Dice 0.99 against the whole volume's, in exchange for smaller requests).
"""

import argparse
import sys
from pathlib import Path

from tfseg import CLASSES, cli, layout
from tfseg.labels import legend


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SavedModel version folder written by tfseg.export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="Kaggle-layout folder (train.csv + train/, or test/)")
    source.add_argument("--scan", metavar="VOLUME.nii.gz",
                        help="one NIfTI volume (.nii or .nii.gz); writes a NIfTI label map (default --out: VOLUME "
                             "name + _labels.nii.gz)")
    parser.add_argument("--split", choices=("train", "test"),
                        help="which scans to predict (default: train if DATA_DIR/train.csv exists, else test)")
    parser.add_argument("--out", help="submission CSV to write (default: submission.csv), or with --scan the NIfTI "
                                      "label map")
    parser.add_argument("--overlays", metavar="DIR",
                        help="also write one PNG per volume with contours of a few slices showing each organ")
    parser.add_argument("--batch-size", type=cli.at_least(0), default=0,
                        help="slices per request to serving_default; 0 (default) sends whole volumes to the volume "
                             "signature, normalised exactly as in training")
    parser.add_argument("--case-days", help="only these volumes, comma-separated (e.g. case1_day2,case7_day0)")
    cli.add_folds(parser, "--folds", help="only the cases of these record folds (held-out volumes; folds from the "
                                          "records the model was trained on)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.scan:
        return predict_scan(parser, args)
    args.out = args.out or "submission.csv"
    case_days = [c.strip() for c in args.case_days.split(",") if c.strip()] if args.case_days else None
    from tfseg.kaggle.index import read_index
    from tfseg.kaggle.scans import check_scan_header

    layout.read_info(args.model)  # a wrong --model or data fails before TensorFlow loads
    for path in read_index(args.data_dir, args.split)["path"]:  # the model would reject them without naming them
        check_scan_header(path)
    from tfseg.serving.predict import predict, write_submission  # TensorFlow loads here

    submission, scores = predict(args.model, args.data_dir, split=args.split, batch_size=args.batch_size,
                                 case_days=case_days, folds=args.folds, overlays=args.overlays,
                                 progress=not args.no_progress)
    write_submission(submission, args.out)
    volumes = submission["id"].str.rsplit("_slice_", n=1).str[0].nunique()
    print(f"wrote {args.out}: {len(submission) // len(CLASSES)} slices of {volumes} volume(s)")
    if scores is not None:
        summary = scores.summary()
        print(f"score {summary['score']:.4f} (leaderboard metric: dice {summary['dice']:.4f}, hausdorff "
              f"{summary['hausdorff']:.4f}; per-organ 3D {summary['organ3d_score']:.4f}) against the folder's labels")
    if args.overlays:
        print(f"overlays in {args.overlays}")
    return 0


def predict_scan(parser: argparse.ArgumentParser, args) -> int:
    if args.case_days or args.folds or args.split:
        parser.error("--case-days, --folds and --split choose slices of a --data-dir; --scan is one volume")
    name = Path(args.scan).name.removesuffix(".gz").removesuffix(".nii")
    out = args.out or f"{name}_labels.nii.gz"
    from tfseg.serving.predict import predict_nifti  # TensorFlow loads here

    masks = predict_nifti(args.model, args.scan, out, batch_size=args.batch_size, overlays=args.overlays)
    counts = ", ".join(f"{organ} {int(masks[..., c].sum())}" for c, organ in enumerate(CLASSES))
    print(f"wrote {out}: label map of {len(masks)} slices ({counts} px; labels {legend()})")
    if args.overlays:
        print(f"overlays in {args.overlays}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
