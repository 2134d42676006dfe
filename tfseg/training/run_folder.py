"""A run folder as training writes and later stages read it: config, history, Keras files, the model.

File names come from tfseg.layout.RunFolder. A run resumes only with the config it was started with
(where and how fast it runs may change; what it computes may not).
"""

import csv
import io
import os
import shutil
from pathlib import Path

import keras

from tfseg import files
from tfseg.config import Config, load_config, save_config, to_dict
from tfseg.errors import ConfigError, DataError
from tfseg.layout import RunFolder, existing_run
from tfseg.model.float32 import float32_model

# Keys a resumed run may change: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = {"train.strategy", "train.cpu_replicas", "train.tpu", "train.jit_compile",
                     "train.profile_batches", "train.image_log_every"}


def read_history(run_dir: str | os.PathLike, last_epoch: int) -> list[dict]:
    """history.csv rows of epochs 1..last_epoch (a killed run may have logged one more)."""
    path = RunFolder(run_dir).history
    if not path.exists():
        return []
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(path.read_text()))]
    return [row for row in rows if 1 <= row["epoch"] <= last_epoch]


def write_history(run_dir: str | os.PathLike, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["epoch"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: int(v) if k == "epoch" else f"{v:.6g}" for k, v in row.items()})
    files.write_text(RunFolder(run_dir).history, out.getvalue())


def save_keras(path: Path, save) -> None:
    """Atomically write a Keras file (weights or model) with `save(path)`: Keras needs the real suffix."""
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    with files.atomic_path(path, suffix=suffix) as tmp:
        save(str(tmp))


def _flat(config: Config) -> dict:
    return {f"{section}.{key}": value for section, values in to_dict(config).items() for key, value in values.items()}


def check_run_dir(run_dir: str | os.PathLike, config: Config, *, fresh: bool) -> bool:
    """Whether to resume the run folder; a folder made with another config refuses to resume
    (ConfigError) unless fresh. Writes nothing: start_run_dir does, once the model is built."""
    run = RunFolder(run_dir)
    resume = run.config.exists() and not fresh
    if resume:
        old, new = _flat(load_config(run.config)), _flat(config)
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                   if old.get(k) != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(f"{run_dir}: cannot resume, the run was started with another config ("
                              + "; ".join(changed) + "); pass --fresh to start over, or use another --run-dir")
    return resume


def start_run_dir(run_dir: str | os.PathLike, config: Config, *, fresh: bool) -> None:
    """Clear a fresh run's outputs and write config.yaml (the chief does, before the first epoch)."""
    run = RunFolder(run_dir)
    if fresh:
        for path in run.training_outputs:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    save_config(config, run.config)


def load_run_model(run_dir: str | os.PathLike) -> tuple[Config, keras.Model, Path]:
    """(config, float32 Keras model, weights file used) of a run folder: its model.keras, the weights
    at the end of the schedule (or their moving average), chosen by nothing the validation folds said.
    A best.weights.h5 that older tfseg versions picked by validation Dice is ignored."""
    run = existing_run(run_dir)
    config = load_config(run.config)
    source = run.final_model
    if not source.exists():
        raise DataError(f"{source}: missing; not a finished tfseg run folder (train it, or resume it)")
    return config, float32_model(keras.models.load_model(source, compile=False)), source
