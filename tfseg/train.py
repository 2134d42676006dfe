"""Train the UNet on tfseg records: one command for one GPU, many GPUs, several machines, a TPU or the CPU.

`python -m tfseg.train --config configs/cpu.yaml` trains on the records' folds except --val-folds
and writes runs/<config name>/: config.yaml (the resolved config), history.csv, TensorBoard logs
(logs/), checkpoints/ (every epoch), best.weights.h5 (best validation Dice) and model.keras. The
same command again resumes after the last finished epoch; --fresh starts over. Every flag is a
shortcut for a config override (--epochs 5 is --set train.epochs=5).
"""

import argparse
import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import keras
import tensorflow as tf

from tfseg import cli, data, loop, losses, paths, records
from tfseg import model as model_lib
from tfseg import strategy as strategy_lib
from tfseg.config import CHOICES, Config, load_config, save_config, to_dict
from tfseg.errors import ConfigError

DEFAULT_CONFIG = "configs/default.yaml"
# Flag -> config key; every flag is an override of the config file.
FLAGS = {"records": "data.records", "val_folds": "data.val_folds", "epochs": "train.epochs",
         "strategy": "train.strategy", "precision": "train.precision", "cpu_replicas": "train.cpu_replicas",
         "jit_compile": "train.jit_compile", "tpu": "train.tpu", "profile_batches": "train.profile_batches"}
# Keys a resumed run may change: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = {"train.strategy", "train.cpu_replicas", "train.tpu", "train.jit_compile",
                     "train.profile_batches", "train.image_log_every"}
RUN_OUTPUTS = ("config.yaml", loop.HISTORY, loop.CHECKPOINTS, loop.LOGS, loop.BEST_WEIGHTS, loop.FINAL_MODEL)


@dataclasses.dataclass
class Result:
    model: keras.Model
    history: list[dict]
    config: Config  # with the strategy and precision actually used
    chief: bool


def build_model(config: Config) -> keras.Model:
    """The UNet of config.model for config.data's input (under the current dtype policy)."""
    m = config.model
    return model_lib.build_unet((*config.data.image_size, len(config.data.offsets)), 3, depth=m.depth,
                                base_filters=m.base_filters, block=m.block, norm=m.norm, dropout=m.dropout,
                                upsample=m.upsample, encoder=m.encoder, encoder_weights=m.encoder_weights)


def build_loss(config: Config) -> keras.losses.Loss:
    c = config.loss
    options = {"bce_dice": {"bce_weight": c.bce_weight, "dice_weight": c.dice_weight, "batch_dice": c.batch_dice},
               "tversky": {"alpha": c.tversky_alpha, "beta": c.tversky_beta},
               "focal": {"gamma": c.focal_gamma, "alpha": c.focal_alpha}}[c.name]
    return losses.get_loss(c.name, **options)


def train_folds(config: Config) -> list[int]:
    folds = int(records.read_manifest(config.data.records)["settings"]["folds"])
    val = set(config.data.val_folds)
    if not val <= set(range(folds)):
        raise ConfigError(f"data.val_folds: {sorted(val - set(range(folds)))} not in the records' folds "
                          f"0..{folds - 1} ({config.data.records})")
    rest = [f for f in range(folds) if f not in val]
    if not rest:
        raise ConfigError(f"data.val_folds: {sorted(val)} leaves no fold of {config.data.records} to train on")
    return rest


def _flat(config: Config) -> dict:
    return {f"{section}.{key}": value for section, values in to_dict(config).items() for key, value in values.items()}


def prepare_run_dir(run_dir: Path, config: Config, *, fresh: bool, chief: bool) -> bool:
    """Check the run folder against `config` and write config.yaml; return whether to resume.

    A folder made with another config refuses to resume (ConfigError) unless fresh, which clears it.
    """
    saved = run_dir / "config.yaml"
    resume = saved.exists() and not fresh
    if resume:
        old, new = _flat(load_config(saved)), _flat(config)
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                   if old.get(k) != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(f"{run_dir}: cannot resume, the run was started with another config ("
                              + "; ".join(changed) + "); pass --fresh to start over, or use another --run-dir")
    if chief:
        if fresh:
            for name in RUN_OUTPUTS:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        save_config(config, saved)
    return resume


def train(config: Config, run_dir: str | Path, *, fresh: bool = False, progress: bool = True) -> Result:
    """Train under the strategy and precision of config.train; see the module docstring."""
    run_dir, t = Path(run_dir), config.train
    loop.parse_profile(t.profile_batches)  # a bad value fails now, not mid-run
    strategy = strategy_lib.make_strategy(t.strategy, t.tpu, t.cpu_replicas)
    kind = strategy_lib.device_kind(strategy)
    resolved = copy.deepcopy(config)
    resolved.train.strategy = strategy_lib.resolve_name(t.strategy, t.tpu, t.cpu_replicas)
    resolved.train.precision = precision = strategy_lib.resolve_precision(t.precision, kind)
    chief = strategy_lib.is_chief(strategy)
    log = loop.Log(chief, progress)
    folds = train_folds(config)
    batch = config.data.batch_size
    if batch % strategy.num_replicas_in_sync:
        raise ConfigError(f"data.batch_size: {batch} is not divisible by the {strategy.num_replicas_in_sync} replicas")
    resume = prepare_run_dir(run_dir, resolved, fresh=fresh, chief=chief)
    steps_per_epoch = t.steps_per_epoch or max(1, data.count_slices(config.data.records, folds,
                                                                    config.data.keep_empty) // batch)
    log(f"strategy {resolved.train.strategy} ({strategy.num_replicas_in_sync} replicas on {kind}), precision "
        f"{precision}{', XLA' if t.jit_compile else ''}; train folds {folds}, validation folds "
        f"{list(config.data.val_folds)}; {steps_per_epoch} steps of {batch} per epoch; run folder {run_dir}")

    def val_pairs(context: tf.distribute.InputContext | None = None):
        per_replica = context.get_per_replica_batch_size(batch) if context else batch
        ds = data.eval_dataset(config, config.data.val_folds, per_replica).map(lambda d: (d["image"], d["mask"]))
        return ds.shard(context.num_input_pipelines, context.input_pipeline_id) if context else ds

    write_dir = strategy_lib.write_dir(run_dir, strategy)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # global by Keras' design; restored below
    try:
        keras.utils.set_random_seed(config.data.seed)
        with strategy.scope():
            model = build_model(config)
            optimizer = loop.make_optimizer(t, steps_per_epoch, precision)
            optimizer.build(model.trainable_variables)
            loss = build_loss(config)
        train_data = strategy.distribute_datasets_from_function(
            lambda context: data.train_dataset(config, folds, input_context=context, global_batch_size=batch))
        val_data = strategy.distribute_datasets_from_function(val_pairs)
        images = loop.validation_images(val_pairs()) if chief and t.image_log_every else (None, None)
        history = loop.fit(strategy=strategy, model=model, optimizer=optimizer, loss=loss, config=config,
                           train_data=train_data, val_data=val_data, image_data=images,
                           steps_per_epoch=steps_per_epoch, run_dir=run_dir, write_dir=write_dir, chief=chief,
                           resume=resume, log=log)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        strategy_lib.remove_write_dir(write_dir, run_dir)
    return Result(model, history, resolved, chief)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`section.key=value` overrides for the flags given (JSON values are valid YAML)."""
    out = []
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None and value is not False:
            out.append(f"{key}={json.dumps(value)}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfseg.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--records", help="records folder from tfseg.make_records (data.records)")
    parser.add_argument("--val-folds", type=lambda s: [int(f) for f in s.split(",")], metavar="K,...",
                        help="held-out folds for validation; the others train (data.val_folds)")
    parser.add_argument("--run-dir", help=f"run folder (default: {paths.RUNS_DIR}/<config file name>)")
    parser.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    parser.add_argument("--strategy", choices=CHOICES["train.strategy"],
                        help="auto: TPU if one is named, else all GPUs if more than one, else default "
                             "(train.strategy)")
    parser.add_argument("--precision", choices=CHOICES["train.precision"],
                        help="auto: mixed_float16 on GPUs, mixed_bfloat16 on TPUs and on CPUs with native bf16, "
                             "else float32 (train.precision)")
    parser.add_argument("--cpu-replicas", type=int, metavar="N",
                        help="split the CPU into N logical devices and mirror over them (tests; train.cpu_replicas)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the forward and backward pass with XLA (train.jit_compile)")
    parser.add_argument("--tpu", metavar="NAME", help="TPU name or 'local' (train.tpu; default: $TPU_NAME)")
    parser.add_argument("--profile-batches", metavar="START,STOP",
                        help="capture a TensorBoard profile of these steps, e.g. 10,20 (train.profile_batches)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set model.base_filters=16 (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: delete the run folder's checkpoints, history and logs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, [*args.set, *flag_overrides(args)])
    run_dir = Path(args.run_dir) if args.run_dir else Path(paths.RUNS_DIR) / Path(args.config).stem
    try:
        result = train(config, run_dir, fresh=args.fresh, progress=not args.no_progress)
    except loop.TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.chief:
        best = max(result.history, key=lambda row: row["val_dice"], default=None)
        summary = f"best val_dice {best['val_dice']:.4f} at epoch {int(best['epoch'])}; " if best else ""
        print(f"done: {summary}{run_dir}/{loop.FINAL_MODEL}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
