"""The closing summary of a pipeline run: the score, where every output is, how to look at it.

`python -m tfseg.summary --run runs/demo [--model saved_models/demo/1] [--submission FILE]` reads
what evaluate, export and predict wrote; it computes nothing new, so it is instant.
"""

import argparse
import json
import sys
from pathlib import Path

from tfseg import cli, curves
from tfseg.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by tfseg.train and tfseg.evaluate")
    parser.add_argument("--model", help="SavedModel version folder written by tfseg.export")
    parser.add_argument("--submission", help="submission CSV written by tfseg.predict")
    parser.add_argument("--overlays", help="overlay folder written by tfseg.predict")
    args = parser.parse_args(argv)
    run = Path(args.run)
    summary_path = run / "eval" / "summary.json"
    if not summary_path.exists():
        raise DataError(f"{summary_path}: missing; run python -m tfseg.evaluate --run {run} first")
    summary = json.loads(summary_path.read_text())
    print("\n=== tfseg summary ===")
    print(f"held-out score  {summary['score']:.4f}  (dice {summary['dice']:.4f}, hausdorff "
          f"{summary['hausdorff']:.4f}) on {summary['num_volumes']} volume(s)")
    print(f"all-empty prediction would score {summary['empty_score']:.4f}")
    outputs = [("run folder (config, history.csv, checkpoints)", run),
               ("training curves (loss, per-class Dice)", run / curves.FILE_NAME),
               ("evaluation report", run / "eval"),
               ("SavedModel for TF Serving", args.model),
               ("submission", args.submission),
               ("overlay PNGs", args.overlays)]
    for label, path in outputs:
        if path is not None:
            print(f"{label:<48} {path}{'' if Path(path).exists() else '  (missing)'}")
    print(f"look at training curves:  tensorboard --logdir {run.parent} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
