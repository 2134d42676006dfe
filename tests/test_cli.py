"""The first hour with the commands: every console script answers --help and argument errors without
loading TensorFlow, TensorFlow's start-up lines stay hidden, counts below their minimum and bad fold
lists are argument errors, and bad input gets one `error:` line naming the file and the fix."""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tfseg import cli, client, cv, evaluate, export, inspect_records, make_records, predict, synth, tflog, train
from tfseg.bench.__main__ import main as bench_main
from tfseg.errors import ConfigError
from tfseg.kaggle import synth as synth_lib
from tfseg.records.writer import build_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
QUIET_ENV = {k: v for k, v in os.environ.items() if k != tflog.LEVEL}  # as a user's shell: no level chosen

# Imports a console script's main, then runs it with --help and with an unknown option, in a fresh process.
PROBE = """
import contextlib, io, json, sys, time
from importlib import import_module
start = time.perf_counter()
module, function = sys.argv[1].split(":")
main = getattr(import_module(module), function)
codes = []
for argv in (["--help"], ["--no-such-option"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exit:
            codes.append(exit.code)
print(json.dumps({"codes": codes, "tensorflow": "tensorflow" in sys.modules,
                  "seconds": time.perf_counter() - start}))
"""


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_and_argument_errors_load_no_tensorflow(script):
    """The cause of a slow --help is TensorFlow loading; the time is printed (pytest -s), not asserted."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, SCRIPTS[script]], cwd=ROOT, env=QUIET_ENV,
                          capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    print(f"{script}: --help and an argument error in {result['seconds']:.2f} s ({wall:.2f} s with Python's start)")
    assert result["codes"] == [0, 2]
    assert not result["tensorflow"], f"{script} imports TensorFlow before parsing its arguments"
    assert done.stderr == ""


def test_a_real_command_prints_no_tensorflow_lines(records_dir, tmp_path):
    """inspect_records --overlays reads the records with TensorFlow: nothing of TensorFlow's reaches stderr."""
    code = ("import sys; from tfseg.inspect_records import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' in sys.modules; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(records_dir), "--overlays", str(tmp_path), "--slices", "1"],
                          cwd=ROOT, env=QUIET_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    assert (tmp_path / "fold0.png").is_file()


@pytest.mark.parametrize(("line", "hidden"), [
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", True),
    ("I0000 00:00:1796599237.075190   11360 port.cc:153] oneDNN custom operations are on.\n", True),
    ("I0000 00:00:1796599237.075636   11360 cudart_stub.cc:31] Could not find cuda drivers on your machine\n", True),
    ("E0000 00:00:1796599309.414982   11932 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n", True),
    ("E0000 00:00:1796599309.414982   11932 some_op.cc:52] a real error\n", False),
    ("Traceback (most recent call last):\n", False),
])
def test_startup_lines_hidden_and_others_kept(line, hidden):
    assert bool(tflog.HIDDEN.match(line)) == hidden


@pytest.mark.parametrize(("level", "quiet"), [(None, True), ("2", True), ("3", True), ("1", False), ("0", False)])
def test_the_level_brings_the_lines_back(monkeypatch, level, quiet):
    monkeypatch.delenv(tflog.LEVEL, raising=False)
    if level is not None:
        monkeypatch.setenv(tflog.LEVEL, level)
    assert tflog.quiet() == quiet


@pytest.mark.parametrize(("given", "expected"), [(None, "2"), ("0", "0")])
def test_tensorflow_log_level(given, expected):
    env = dict(QUIET_ENV)
    if given is not None:
        env[tflog.LEVEL] = given
    code = "import os, tfseg; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == expected


# (command, arguments, fragment of the argparse error): all exit 2 before anything is read or written.
BAD_ARGUMENTS = [
    (evaluate.main, ["--run", "r", "--limit", "-1"], "--limit: must be at least 1, got -1"),
    (evaluate.main, ["--run", "r", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (evaluate.main, ["--run", "r", "--folds", "0,x"], "--folds: expected fold numbers like 0,1, got '0,x'"),
    (predict.main, ["--model", "m", "--data-dir", "d", "--batch-size", "-3"], "--batch-size: must be at least 0"),
    (predict.main, ["--model", "m", "--data-dir", "d", "--folds", "-1"], "--folds: expected fold numbers"),
    (make_records.main, ["--workers", "0"], "--workers: must be at least 1, got 0"),
    (make_records.main, ["--num-folds", "0"], "--num-folds: must be at least 1, got 0"),
    (make_records.main, ["--folds", "0"], "--folds: must be at least 1, got 0"),
    (make_records.main, ["--shard-mb", "0"], "--shard-mb: must be above 0, got 0"),
    (synth.main, ["--cases", "0"], "--cases: must be at least 1, got 0"),
    (synth.main, ["--days", "9"], "--days: invalid choice: 9"),
    (synth.main, ["--workers", "-2"], "--workers: must be at least 1, got -2"),
    (train.main, ["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (train.main, ["--budget-minutes", "-5"], "--budget-minutes: must be above 0, got -5"),
    (cv.main, ["--config", "c", "--out", "o", "--folds", "1,,a"], "--folds: expected fold numbers"),
    (export.main, ["--run", "r", "--chunk", "0"], "--chunk: must be at least 1, got 0"),
    (client.main, ["rest", "x.png", "--batch-size", "-1"], "--batch-size: must be at least 0, got -1"),
    (inspect_records.main, ["--slices", "0"], "--slices: must be at least 1, got 0"),
    (bench_main, ["records", "--num-folds", "0"], "--num-folds: must be at least 1, got 0"),
]


@pytest.mark.parametrize(("main", "argv", "fragment"), BAD_ARGUMENTS,
                         ids=[f"{m.__module__}:{' '.join(a[-2:])}" for m, a, _ in BAD_ARGUMENTS])
def test_bad_counts_and_folds_are_argument_errors(main, argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default output folders are relative: nothing may appear here
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--folds", "0,1"], ["--folds", "0", "1"], ["--folds", "0,1", "2"]])
def test_folds_take_one_syntax_everywhere(argv):
    """Which folds: `0,1` on every command (`0 1` works too); train's --val-folds is the same option."""
    parser = cli.argparse.ArgumentParser()
    cli.add_folds(parser, "--folds", help="folds")
    expected = [int(f) for f in " ".join(argv[1:]).replace(",", " ").split()]
    assert parser.parse_args(argv).folds == expected
    assert train.parse_args(["--val-folds", *argv[1:]]).val_folds == expected


def test_make_records_old_folds_spelling_still_works(synth_dir, records_dir, capsys):
    """--folds N (how many) is now --num-folds N: the old spelling works, with a deprecation warning."""
    argv = ["--data-dir", str(synth_dir), "--out", str(records_dir), "--no-progress"]
    assert cli.run(make_records.main, [*argv, "--folds", "2"]) == 0  # the records there: up to date, a no-op
    assert "--folds is deprecated, use --num-folds" in capsys.readouterr().err
    assert cli.run(make_records.main, [*argv, "--num-folds", "2"]) == 0
    assert "deprecated" not in capsys.readouterr().err


EIGHT_BIT = Path("data", "test", "case1", "case1_day0", "scans", "slice_0001_16_16_1.50_1.50.png")


def _eight_bit_layout(root: Path) -> Path:
    (root / EIGHT_BIT).parent.mkdir(parents=True)
    cv2.imwrite(str(root / EIGHT_BIT), np.zeros((16, 16), np.uint8))
    return root / "data"


def _model_folder(root: Path) -> Path:
    version = root / "models" / "tiny" / "3"  # what tfseg.export writes: NAME/VERSION/assets.extra/tfseg.json
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    (version / "assets.extra" / "tfseg.json").write_text("{}")
    return version


# (command, arguments given the test folder, fragments of the one error line): exit 2, nothing written.
BAD_INPUT = [
    pytest.param(predict.main, lambda d: ["--model", str(_model_folder(d)), "--data-dir", str(_eight_bit_layout(d))],
                 lambda d: [str(d / EIGHT_BIT), "8-bit greyscale PNG", "16-bit"], id="predict-8-bit-png"),
    pytest.param(predict.main, lambda d: ["--model", str(_model_folder(d).parent), "--data-dir", str(d)],
                 lambda d: ["models/tiny: a model folder of versions 3", "give a version folder", "models/tiny/3"],
                 id="predict-model-folder-without-version"),
    pytest.param(predict.main, lambda d: ["--model", str(d / "nothing"), "--data-dir", str(d)],
                 lambda d: ["nothing: no such SavedModel folder", "tfseg.export"], id="predict-missing-model"),
    pytest.param(evaluate.main, lambda d: ["--run", str(d / "runs" / "nope")],
                 lambda d: ["runs/nope: no such run folder", "tfseg.train"], id="evaluate-missing-run"),
]


@pytest.mark.parametrize(("main", "argv", "fragments"), BAD_INPUT)
def test_errors_name_the_file_and_the_fix(main, argv, fragments, tmp_path, capsys):
    argv = argv(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments(tmp_path):
        assert fragment in err, err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_synth_refuses_a_folder_made_with_other_options(synth_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in synth_dir.rglob("*")}
    assert cli.run(synth.main, ["--out", str(synth_dir), "--cases", "5", "--slices", "24", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cases 4 -> 5" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in synth_dir.rglob("*")} == before


@pytest.mark.parametrize(("call", "expected"), [
    (lambda d: synth_lib.plan_volumes(cases=2, days=9), "synthetic dataset: days 9 (need 1..5)"),
    (lambda d: synth_lib.plan_volumes(cases=0, num_slices=0), "cases 0 (need >= 1), slices 0 (need >= 1)"),
    (lambda d: build_records(d, d / "out", workers=0), "records: workers 0 (need >= 1)"),
    (lambda d: build_records(d, d / "out", folds=0, shard_mb=-1), "records: folds 0 (need >= 1), shard_mb -1"),
])
def test_range_errors_name_only_the_wrong_values(call, expected, tmp_path):
    with pytest.raises(ConfigError) as err:
        call(tmp_path)
    assert expected in str(err.value) and "None" not in str(err.value)
    assert not (tmp_path / "out").exists()
