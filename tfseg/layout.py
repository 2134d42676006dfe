"""Where things are: default folders, and the file names inside the three folders tfseg writes.

A records folder (make_records), a run folder (train, evaluate) and a SavedModel version folder
(export) are read by later stages and by users; their names live here only, so no module spells one
again. TensorFlow-free, like everything else at the bottom of the package.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tfseg.errors import DataError

# Default locations, relative to the working directory, so every command runs out of the box.
SYNTH_DATA_DIR = "data/synth"  # the built-in synthetic dataset (Kaggle layout)
RECORDS_DIR = "records/synth"  # TFRecords made from it
RUNS_DIR = "runs"
SAVED_MODELS_DIR = "saved_models"


# ---- records folder ------------------------------------------------------------------------------

MANIFEST = "manifest.json"  # written last: its presence means the folder is complete
SHARD_PATTERN = re.compile(r"fold(\d+)-(\d{5})-of-(\d{5})\.tfrecord")


def shard_name(fold: int, index: int, count: int) -> str:
    return f"fold{fold}-{index:05d}-of-{count:05d}.tfrecord"


def shard_fold(name: str) -> int:
    return int(SHARD_PATTERN.fullmatch(Path(name).name).group(1))


def read_manifest(records_dir: str | os.PathLike) -> dict:
    """The manifest written last by make_records: its presence means the records are complete."""
    path = Path(records_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{records_dir}: no {MANIFEST}; not a complete tfseg records folder "
                        "(run python -m tfseg.make_records)")
    return json.loads(path.read_text())


# ---- run folder ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFolder:
    """The files of runs/NAME: train writes all but eval/, which evaluate writes."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / "config.yaml")  # the resolved config
    history = property(lambda self: self.path / "history.csv")  # one row per epoch
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_weights = property(lambda self: self.path / "best.weights.h5")  # older runs' pick by validation Dice
    final_model = property(lambda self: self.path / "model.keras")
    logs = property(lambda self: self.path / "logs")  # TensorBoard: logs/train and logs/validation
    curves = property(lambda self: self.path / "curves.png")
    eval_dir = property(lambda self: self.path / "eval")

    def limited_eval_dir(self, limit: int) -> Path:
        """evaluate --limit N's report: beside eval/, never over it."""
        return self.path / f"eval-limit{limit}"

    @property
    def training_outputs(self) -> tuple[Path, ...]:
        """What `train --fresh` removes."""
        return (self.config, self.history, self.checkpoints, self.logs, self.best_weights, self.final_model)


def existing_run(run_dir: str | os.PathLike) -> RunFolder:
    """The RunFolder of a folder tfseg.train wrote; DataError saying what run_dir is instead."""
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise DataError(f"{run_dir}: no such run folder; give a folder tfseg.train wrote ({RUNS_DIR}/NAME), or "
                        f"train one: python -m tfseg.train --config FILE --run-dir {run_dir}")
    if not run.config.exists():
        raise DataError(f"{run_dir}: not a run folder (no {run.config.name}); give a folder tfseg.train wrote "
                        f"({RUNS_DIR}/NAME)")
    return run


def fold_runs(cv_dir: str | os.PathLike) -> list[Path]:
    """The fold run folders of a cross-validation folder (tfseg.cv): CV/fold0, CV/fold1, ..., by fold."""
    runs = sorted((p for p in Path(cv_dir).glob("fold*") if p.name[4:].isdigit() and p.is_dir()),
                  key=lambda p: int(p.name[4:]))
    if not runs:
        raise DataError(f"{cv_dir}: no fold run folders (fold0, fold1, ...); run python -m tfseg.cv first")
    return runs


def fold_run(cv_dir: str | os.PathLike, fold: int) -> Path:
    return Path(cv_dir) / f"fold{fold}"


CV_SUMMARY = "cv.json"  # in a cross-validation folder
CV_TABLE = "cv.txt"

# evaluate's report, in RUN/eval or another folder
EVAL_SUMMARY = "summary.json"
EVAL_PER_VOLUME = "per_volume.csv"
EVAL_SCORES_PLOT = "scores.png"


# ---- SavedModel version folder -------------------------------------------------------------------

SIGNATURE = "serving_default"  # slices string [N, K] 16-bit PNGs -> probabilities, masks
PREDICT_FLOAT = "predict_float"  # scans float32 [N, h, w, K] -> probabilities
MASKS_PNG = "masks_png"  # slices as serving_default -> masks_png: one RGB PNG per slice (REST clients)
VOLUME_SIGNATURE = "serving_volume"  # slices string [D], one whole volume -> masks_png string [D]
VOLUME_PROBABILITIES = "volume_probabilities"  # slices string [D] -> probabilities, masks (evaluate --model)
ASSETS_EXTRA = "assets.extra"  # TF Serving reads the warm-up file here; tfseg keeps its metadata beside it
WARMUP_FILE = "tf_serving_warmup_requests"
INFO_FILE = "tfseg.json"
MAX_IMAGE_SIZE = 2048  # default limit on a served scan's declared width and height (export --max-image-size)


def warmup_path(saved_model: str | os.PathLike) -> Path:
    return Path(saved_model) / ASSETS_EXTRA / WARMUP_FILE


def info_path(saved_model: str | os.PathLike) -> Path:
    return Path(saved_model) / ASSETS_EXTRA / INFO_FILE


def read_info(saved_model: str | os.PathLike) -> dict:
    """The tfseg.json written beside a SavedModel by export (classes, offsets, post-processing, config)."""
    path = info_path(saved_model)
    if not path.exists():
        numbered = versions(saved_model)
        if numbered:  # the model folder TF Serving takes, given where one of its versions is wanted
            raise DataError(f"{saved_model}: a model folder of versions {', '.join(map(str, numbered))}, not a "
                            f"SavedModel; give a version folder, e.g. {Path(saved_model) / str(numbered[-1])}")
        if not Path(saved_model).is_dir():
            raise DataError(f"{saved_model}: no such SavedModel folder; export one with python -m tfseg.export "
                            f"--run RUN --out {saved_model}")
        raise DataError(f"{saved_model}: no {ASSETS_EXTRA}/{INFO_FILE}; not a SavedModel written by tfseg.export "
                        f"(export one with python -m tfseg.export --run RUN --out {SAVED_MODELS_DIR}/NAME/1)")
    return json.loads(path.read_text())


def versions(model_dir: str | os.PathLike) -> list[int]:
    """Numbered version folders holding a saved_model.pb, ascending (TF Serving serves the largest)."""
    base = Path(model_dir)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())


def next_version(model_dir: str | os.PathLike) -> int:
    base = Path(model_dir)
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(taken, default=0) + 1
