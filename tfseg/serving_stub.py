"""A stand-in for TensorFlow Serving: gRPC Predict and GetModelMetadata, the REST predict and metadata APIs.

The real `tensorflow_model_server` cannot be installed here (it is neither on PyPI nor in Debian), so
tests and demos start this instead. It serves the newest numbered version under --model_base_path
the way TF Serving does, by calling the SavedModel's signatures, with TF Serving's flag names:

    python -m tfseg.serving_stub --model_name tfseg --model_base_path saved_models/NAME \\
        --port 8500 --rest_api_port 8501

It covers what tfseg.client and operators' tools use: gRPC Predict (with output_filter) and
GetModelMetadata (signature_def), REST POST /v1/models/NAME[/versions/V]:predict ("instances" or
"inputs" JSON, {"b64": ...} for bytes), GET /v1/models/NAME[/versions/V]/metadata (the signatures, in
TF Serving's JSON shape) and GET /v1/models/NAME (status). It is not a production server: no request
batching, no model reloading or version policies, no Classify/Regress, one model.
Port 0 picks a free port; the chosen ports are printed on the "serving" line.
"""

import argparse
import sys

from tfseg import cli


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.serving_stub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="tfseg", help="name clients ask for (default: %(default)s)")
    parser.add_argument("--model_base_path", required=True,
                        help="folder of numbered SavedModel versions, e.g. saved_models/NAME")
    parser.add_argument("--port", type=cli.at_least(0), default=8500,
                        help="gRPC port; 0 picks a free one (default: 8500)")
    parser.add_argument("--rest_api_port", type=cli.at_least(0), default=8501,
                        help="REST port; 0 picks a free one (default: 8501)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    args = parser.parse_args(argv)
    from tfseg.serving.stub import serve  # TensorFlow loads here

    serve(args.model_name, args.model_base_path, args.host, args.port, args.rest_api_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
