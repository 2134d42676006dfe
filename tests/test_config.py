"""Config files and overrides: every bad key or value is a ConfigError naming it (exit 2 from train)."""

from pathlib import Path

import pytest

from tfseg import cli, train
from tfseg.config import Config, load_config, save_config, to_dict
from tfseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))

BAD_OVERRIDES = [
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=three", "train.epochs"),
    ("train.epoch=3", "train.epoch"),
    ("trian.epochs=3", "trian"),
    ("train.strategy=gpu", "train.strategy"),
    ("train.precision=float64", "train.precision"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("train.jit_compile=maybe", "train.jit_compile"),
    ("train.jit_compile=1", "train.jit_compile"),
    ("data.cache=disk", "data.cache"),
    ("augment.device=gpu", "augment.device"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch"),
    ("data.image_size=[100,100]", "data.image_size"),
    ("data.image_size=[64]", "data.image_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.val_folds=zero", "data.val_folds"),
    ("data.offsets=[0,0]", "data.offsets"),
    ("model.norm=layer", "model.norm"),
    ("model.dropout=1.5", "model.dropout"),
    ("loss.name=dice", "loss.name"),
    ("augment.rotation_degrees=lots", "augment.rotation_degrees"),
    ("epochs", "epochs"),
]

# (file text, what the message must name); type and key errors also name the file (value checks
# run on the merged config, after all sources, so they name only the key).
BAD_FILES = [
    ("train:\n  epochs: [1\n", "not valid YAML"),
    ("- a\n- b\n", "mapping of sections"),
    ("train: 5\n", "'train'"),
    ("train:\n  epoch: 3\n", "train.epoch"),
    ("optimizer:\n  name: sgd\n", "optimizer"),
    ("data:\n  image_size: [64]\n", "data.image_size"),
    ("train:\n  epochs: many\n", "train.epochs"),
    ("model:\n  norm: layer\n", "model.norm"),
    ("train:\n  warmup_epochs: 1\n  epochs: 0\n", "train.epochs"),
]
NAMES_FILE = 7


@pytest.mark.parametrize(("override", "key"), BAD_OVERRIDES)
def test_bad_override_names_the_key(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS[0], [override])
    assert cli.run(train.main, ["--config", str(CONFIGS[0]), "--run-dir", str(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and "Traceback" not in err


@pytest.mark.parametrize(("index", "text", "named"), [(i, *case) for i, case in enumerate(BAD_FILES)])
def test_bad_yaml_file_names_the_problem(index, text, named, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named) as err:
        load_config(path)
    assert (str(path) in str(err.value)) == (index < NAMES_FILE)
    assert cli.run(train.main, ["--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_flag_values_name_the_key(tmp_path, capsys):
    argv = ["--config", str(CONFIGS[0]), "--set", "train.epochs=0", "--run-dir", str(tmp_path)]
    assert cli.run(train.main, argv) == 2
    assert "train.epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # the flag's own minimum: an argument error, before the config
        train.main(["--config", str(CONFIGS[0]), "--epochs", "0", "--run-dir", str(tmp_path)])
    assert exit.value.code == 2 and "--epochs: must be at least 1" in capsys.readouterr().err
    for bad in ("x", "5,2", "0"):
        argv = ["--config", str(CONFIGS[0]), "--profile-batches", bad, "--run-dir", str(tmp_path / "run")]
        assert cli.run(train.main, argv) == 2
        assert "train.profile_batches" in capsys.readouterr().err
    assert cli.run(train.main, ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_files_round_trip(path, tmp_path):
    config = load_config(path)
    assert to_dict(config) != to_dict(Config()), "a config file should change some defaults"
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config and to_dict(again) == to_dict(config)


def test_shipped_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"default", "cpu", "smoke"}


def test_flags_override_the_config_file():
    args = train.parse_args(["--config", "configs/smoke.yaml", "--records", "123", "--val-folds", "0,2",
                             "--epochs", "7", "--strategy", "mirrored", "--precision", "float32",
                             "--cpu-replicas", "2", "--jit-compile", "true", "--tpu", "local",
                             "--profile-batches", "3,5",
                             "--set", "train.epochs=2", "--set", "model.base_filters=4"])
    config = load_config(CONFIGS[0], [*args.set, *train.flag_overrides(args)])
    d, t = config.data, config.train
    assert (d.records, d.val_folds) == ("123", (0, 2))  # a path that looks like a number stays a path
    assert (t.epochs, t.strategy, t.precision, t.cpu_replicas) == (7, "mirrored", "float32", 2)  # flag beats --set
    assert (t.jit_compile, t.tpu, t.profile_batches) == (True, "local", "3,5")
    assert config.model.base_filters == 4



@pytest.mark.parametrize(("val", "holdout", "expected"), [
    ([0], [], [1]),
    ([1], [], [0]),
    ([0], [1], "leave no fold"),
    ([0], [0], "also validate"),
    ([0], [5], "holdout_folds: \\[5\\] not in the records' folds"),
])
def test_holdout_folds_neither_train_nor_validate(records_dir, val, holdout, expected):
    from tfseg.training.trainer import train_folds

    config = load_config(None, [f"data.records={records_dir}", f"data.val_folds={val}",
                                f"data.holdout_folds={holdout}"])
    if isinstance(expected, list):
        assert train_folds(config) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            train_folds(config)
