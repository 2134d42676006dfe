"""A damaged records folder is found before anything is made: train, cv and evaluate check the shards they
read against the manifest (size and sha256), and a shard damaged in the middle of a run stops it with
one clear line and a run that resumes once the records are remade."""

import shutil
import time
from pathlib import Path

import pytest

from tfseg import cli, cv, evaluate, files, layout, train
from tfseg.config import load_config, save_config
from tfseg.records import reader
from tfseg.records.writer import build_records
from tfseg.training import trainer

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
QUICK = ["--set", "train.steps_per_epoch=2", "--set", "train.image_log_every=0", "--epochs", "1"]


@pytest.fixture
def copy(records_dir, tmp_path):
    """A copy of the tiny records (fold 0 validates, fold 1 trains) and its fold-1 shard."""
    out = tmp_path / "records"
    shutil.copytree(records_dir, out)
    return out, next(out.glob("fold1-*.tfrecord"))


def truncate(shard: Path) -> None:
    with open(shard, "r+b") as f:
        f.truncate(1000)  # inside the first record: any read of the shard fails at once


def test_truncated_or_changed_shards_are_named(copy):
    records, shard = copy
    assert reader.damaged_shards(records) == []
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert reader.damaged_shards(records) == [f"{shard}: contents changed (sha256 differs from the manifest's)"]
    assert reader.damaged_shards(records, folds=[0]) == []  # only the folds asked for are read
    truncate(shard)
    assert reader.damaged_shards(records) == [f"{shard}: 1,000 bytes, the manifest says {len(data):,}"]
    shard.unlink()
    assert reader.damaged_shards(records) == [f"{shard}: missing"]


def test_a_manifest_without_checksums_is_checked_by_size(copy):
    records, shard = copy
    manifest = layout.read_manifest(records)
    for entry in manifest["shards"]:
        del entry["sha256"]
    files.write_json(records / layout.MANIFEST, manifest)
    assert reader.damaged_shards(records) == []
    truncate(shard)
    assert len(reader.damaged_shards(records)) == 1


def test_make_records_remakes_a_damaged_shard(copy, synth_dir):
    """The fix the error names works: the same make_records command rewrites the folder."""
    records, shard = copy
    truncate(shard)
    build_records(synth_dir, records, folds=2, workers=1, progress=False)
    assert reader.damaged_shards(records) == []


def test_the_check_costs_one_read(copy):
    records, _ = copy
    size = sum(p.stat().st_size for p in records.glob("*.tfrecord"))
    started = time.perf_counter()
    reader.check_shards(records)
    seconds = time.perf_counter() - started
    print(f"check_shards: {size / 1e6:.1f} MB in {seconds:.3f} s ({size / 1e6 / max(seconds, 1e-9):.0f} MB/s)")


def _run_folder(root: Path, records: Path) -> Path:
    run = root / "run"
    save_config(load_config(SMOKE, [f"data.records={records}", "data.val_folds=[1]"]), run / "config.yaml")
    return run


COMMANDS = {  # command -> (main, arguments given the records and the test folder, what it must not make)
    "train": (train.main, lambda r, d: ["--config", str(SMOKE), "--records", str(r), "--run-dir", str(d / "out"),
                                        "--no-progress"], "out"),
    "cv": (cv.main, lambda r, d: ["--config", str(SMOKE), "--records", str(r), "--folds", "0,1", "--out",
                                  str(d / "out"), "--no-progress"], "out"),
    "evaluate": (evaluate.main, lambda r, d: ["--run", str(_run_folder(d, r)), "--no-progress"], "run/eval"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_damaged_shard_stops_the_command_before_it_makes_anything(command, copy, tmp_path, capsys):
    records, shard = copy
    truncate(shard)
    main, argv, made = COMMANDS[command]
    assert cli.run(main, argv(records, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {shard}: 1,000 bytes, the manifest says"), err
    assert f"python -m tfseg.make_records --data-dir {layout.read_manifest(records)['settings']['data_dir']} " \
           f"--out {records} --num-folds 2" in err
    assert not (tmp_path / made).exists()


def test_a_shard_damaged_during_the_run_stops_it_clearly_and_the_run_resumes(copy, tmp_path, monkeypatch, capsys):
    records, shard = copy
    intact = shard.read_bytes()
    monkeypatch.setattr(trainer, "check_shards", lambda *args: None)  # damaged after the check at start-up
    truncate(shard)
    run = tmp_path / "run"
    argv = ["--config", str(SMOKE), "--records", str(records), "--run-dir", str(run), "--no-progress", *QUICK]
    assert cli.run(train.main, argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {shard}: 1,000 bytes"), err
    assert "became unreadable during training" in err and "run the same command again: it resumes" in err
    shard.write_bytes(intact)  # the records remade
    assert cli.run(train.main, argv) == 0
    assert len((run / "history.csv").read_text().splitlines()) == 2  # header and epoch 1
    assert (run / "model.keras").is_file()
