"""Session-wide fixtures: one tiny synthetic dataset and its records, shared by every test module; and the
order the test files run in."""

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


def pytest_collection_modifyitems(items):
    """Files with slow tests first, each file's tests in their order. make test hands whole files to two
    processes in this order (--dist loadfile --no-loadscope-reorder), so the long files start early and the
    quick ones fill in at the end: by number of tests (xdist's default) the few-test slow files came last and
    one process ran them alone for minutes."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
