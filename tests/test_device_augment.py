"""augment.device: accelerator trains exactly as host mode does, under 2 mirrored CPU replicas with XLA.

The comparison runs in a subprocess: logical CPU devices can only be set up before TensorFlow
initialises, which the pytest process has long done.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]

TRAIN_BOTH = """
import json, sys
from tfseg.training import strategy
strategy.split_cpu(2)  # before anything initialises TensorFlow
import keras
from tfseg.config import load_config
from tfseg.data.pipeline import train_dataset
from tfseg.model.build import build_loss, build_model
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps

two = strategy.make_strategy("mirrored", cpu_replicas=2)
out = {}
for device in ("host", "accelerator"):
    config = load_config(sys.argv[1], [
        f"data.records={sys.argv[2]}", "data.batch_size=4", "data.deterministic=true", "train.jit_compile=true",
        "model.depth=2", "model.base_filters=4", "augment.enabled=true", "augment.grid_distortion=0.03",
        "augment.dropout_holes=1", f"augment.device={device}"])
    keras.utils.set_random_seed(0)
    with two.scope():
        model = build_model(config)
        optimizer = make_optimizer(config.train, 10, "float32")
        optimizer.build(model.trainable_variables)
        steps = Steps(two, model, optimizer, build_loss(config), 4, config)
    data = two.distribute_datasets_from_function(
        lambda context: train_dataset(config, [1], input_context=context, global_batch_size=4))
    batches = iter(data)
    losses = [float(steps.train_step(batches)) for _ in range(3)]
    out[device] = {"losses": losses, "weights": [w.tolist() for w in model.get_weights()], "jit": steps.jit_compile}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_accelerator_augmentation_trains_like_host_augmentation(records_dir):
    """Same seed, same stream, XLA in both: augmenting inside the replica step (2 replicas) gives the losses
    and weights that augmenting in the input pipeline gives. Both run the same warp on the same inputs, so
    only float rounding may differ: losses to 1e-5, weights to 1e-5 of their norm (Adam turns rounding
    noise in near-zero gradients into learning-rate-sized steps, so XLA against TensorFlow's kernels would
    differ by ~1e-3 of the norm here: both sides compile). A missing or different augmentation changes
    the losses by percents."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", TRAIN_BOTH, ROOT / "configs" / "smoke.yaml", records_dir],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    host, device = out["host"], out["accelerator"]
    assert host["jit"] is True and device["jit"] is True
    np.testing.assert_allclose(device["losses"], host["losses"], rtol=1e-5)
    difference = np.sqrt(sum(np.sum((np.array(a) - np.array(b)) ** 2)
                             for a, b in zip(host["weights"], device["weights"], strict=True)))
    norm = np.sqrt(sum(np.sum(np.array(a) ** 2) for a in host["weights"]))
    assert difference <= 1e-5 * norm
