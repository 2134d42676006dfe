"""The operator's kit written beside each export (in assets.extra/): a request-batching parameters file
for TF Serving's --enable_batching --batching_parameters_file, and a models.config for serving several
versions. Values and their reasons: README, "Serve it with TensorFlow Serving"."""

import os
from pathlib import Path

from tfseg import files

BATCHING_FILE = "batching_parameters.txt"
MODELS_CONFIG_FILE = "models.config"

# TF Serving's BatchingParameters (session_bundle_config.proto) as text. Requests of up to 32 slices are
# merged: per-slice cost stops falling by 32 (bench serve); the 2 ms timeout is small next to a slice's
# cost, so a lone request waits little; one batch thread per core of the serving machine.
BATCHING = """\
# TF Serving request batching for this tfseg model:
#   tensorflow_model_server --enable_batching --batching_parameters_file=THIS_FILE ...
# Batching merges concurrent requests to one signature along their first axis. The PNG signatures
# (serving_default, masks_png, serving_volume, volume_probabilities) normalise intensities over every
# slice of one run, and the volume ones build contexts across it, so merged requests of different
# volumes would be mixed: turn batching on for servers whose clients send predict_float requests
# (normalised scans), and serve PNG clients from a server started without --enable_batching.
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: %(threads)d }
pad_variable_length_inputs: false
"""

MODELS_CONFIG = """\
# TF Serving model config: tensorflow_model_server --model_config_file=THIS_FILE ...
# Serves versions %(versions)s of %(name)s (TF Serving serves only the newest without a policy), with
# labels for a stable and a canary version; clients name a version (/versions/N) or a label (/labels/L).
model_config_list {
  config {
    name: "%(name)s"
    base_path: "/models/%(name)s"
    model_platform: "tensorflow"
    model_version_policy { specific { %(specific)s } }
    version_labels { key: "stable" value: %(stable)d }
    version_labels { key: "canary" value: %(canary)d }
  }
}
"""


def write_kit(extra_dir: str | os.PathLike, name: str, version: int, threads: int = 4) -> list[Path]:
    """Write batching_parameters.txt and models.config into a SavedModel's assets.extra folder."""
    extra_dir = Path(extra_dir)
    versions = sorted({max(1, version - 1), version})
    written = [extra_dir / BATCHING_FILE, extra_dir / MODELS_CONFIG_FILE]
    files.write_text(written[0], BATCHING % {"threads": threads})
    files.write_text(written[1], MODELS_CONFIG % {
        "name": name, "versions": " and ".join(map(str, versions)), "stable": versions[0], "canary": versions[-1],
        "specific": " ".join(f"versions: {v}" for v in versions)})
    return written
