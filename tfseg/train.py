"""Train the UNet on tfseg records: one command for one GPU, many GPUs, several machines, a TPU or the CPU.

`python -m tfseg.train --config configs/cpu.yaml` trains on the records' folds except --val-folds
and writes runs/<config name>/: config.yaml (the resolved config), history.csv, TensorBoard logs
(logs/), checkpoints/ (every epoch) and model.keras (the last weights, or their moving average with
train.ema: nothing is picked by the validation folds, which evaluate then scores). The same command
again resumes after the last finished epoch; --fresh starts over. --budget-minutes M trains for M
minutes, validation included: the run times its first steps and chooses the steps to take. Every
flag is a shortcut for a config override (--epochs 5 is --set train.epochs=5).
"""

import argparse
import json
import sys
from pathlib import Path

from tfseg import cli, layout
from tfseg.config import CHOICES, load_config

DEFAULT_CONFIG = "configs/default.yaml"
# Flag -> config key; every flag is an override of the config file.
FLAGS = {"records": "data.records", "val_folds": "data.val_folds", "epochs": "train.epochs",
         "strategy": "train.strategy", "precision": "train.precision", "cpu_replicas": "train.cpu_replicas",
         "jit_compile": "train.jit_compile", "tpu": "train.tpu", "profile_batches": "train.profile_batches",
         "budget_minutes": "train.budget_minutes"}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`section.key=value` overrides for the flags given (JSON values are valid YAML)."""
    out = []
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None and value is not False:
            out.append(f"{key}={value if flag == 'jit_compile' else json.dumps(value)}")
    if args.budget_minutes is not None:  # the budget chooses the steps, whatever the config file says
        out.append("train.steps_per_epoch=null")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfseg.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--records", help="records folder from tfseg.make_records (data.records)")
    cli.add_folds(parser, "--val-folds", help="held-out folds for validation; the others train (data.val_folds)")
    parser.add_argument("--run-dir", help=f"run folder (default: {layout.RUNS_DIR}/<config file name>)")
    parser.add_argument("--epochs", type=cli.at_least(1), help="number of epochs (train.epochs)")
    parser.add_argument("--budget-minutes", type=cli.positive, metavar="M",
                        help="train for M minutes, validation included; the run chooses its steps per epoch "
                             "(train.budget_minutes)")
    parser.add_argument("--strategy", choices=CHOICES["train.strategy"],
                        help="auto: TPU if one is named, else all GPUs if more than one, else default "
                             "(train.strategy)")
    parser.add_argument("--precision", choices=CHOICES["train.precision"],
                        help="auto: mixed_float16 on GPUs, mixed_bfloat16 on TPUs and on CPUs with native bf16, "
                             "else float32 (train.precision)")
    parser.add_argument("--cpu-replicas", type=cli.at_least(1), metavar="N",
                        help="split the CPU into N logical devices and mirror over them (tests; train.cpu_replicas)")
    parser.add_argument("--jit-compile", choices=("true", "false", "auto"), type=str.lower,
                        help="compile the forward and backward pass with XLA; auto: where it is faster for "
                             "the CPU or accelerator found (train.jit_compile)")
    parser.add_argument("--tpu", metavar="NAME", help="TPU name or 'local' (train.tpu; default: $TPU_NAME)")
    parser.add_argument("--profile-batches", metavar="START,STOP",
                        help="capture a TensorBoard profile of these steps, e.g. 10,20 (train.profile_batches)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set model.base_filters=16 (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: delete the run folder's checkpoints, history and logs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries only)")
    return parser.parse_args(argv)


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, [*args.set, *flag_overrides(args)])
    run_dir = Path(args.run_dir) if args.run_dir else Path(layout.RUNS_DIR) / Path(args.config).stem
    from tfseg.training.trainer import train  # TensorFlow loads here, after the arguments are checked

    result = train(config, run_dir, fresh=args.fresh, progress=not args.no_progress)
    if result.chief:
        last = result.history[-1] if result.history else {}
        summary = f"last val_dice {last['val_dice']:.4f}; " if "val_dice" in last else ""
        print(f"done in {result.minutes:.1f} min: {summary}{layout.RunFolder(run_dir).final_model}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
