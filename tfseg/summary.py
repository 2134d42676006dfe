"""The closing summary of a pipeline run: the score, where every output is, how to look at it.

`python -m tfseg.summary --run runs/demo [--model saved_models/demo/1] [--submission FILE]` reads
what evaluate, export and predict wrote; it computes nothing new, so it is instant.
"""

import argparse
import sys

from tfseg import cli


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by tfseg.train and tfseg.evaluate")
    parser.add_argument("--model", help="SavedModel version folder written by tfseg.export")
    parser.add_argument("--submission", help="submission CSV written by tfseg.predict")
    parser.add_argument("--overlays", help="overlay folder written by tfseg.predict")
    args = parser.parse_args(argv)
    from tfseg.evaluation.report import pipeline_summary

    print(pipeline_summary(args.run, args.model, args.submission, args.overlays))
    return 0


if __name__ == "__main__":
    sys.exit(main())
