"""Session-wide fixtures: one tiny synthetic dataset and its records, shared by every test module."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A tiny synthetic dataset in the Kaggle layout: 4 cases, 24 slices per volume."""
    from tfseg.kaggle import synth

    return synth.make_dataset(tmp_path_factory.mktemp("synth"), cases=4, seed=0, num_slices=24,
                              workers=1, progress=False)


@pytest.fixture(scope="session")
def records_dir(synth_dir, tmp_path_factory):
    """TFRecords of the tiny dataset, 2 folds (cases grouped)."""
    from tfseg.records.writer import build_records

    out = tmp_path_factory.mktemp("records") / "tiny"
    build_records(synth_dir, out, folds=2, workers=1, progress=False)
    return out
