"""configs/gpu.yaml's model at its real size (384 px, 5 context slices) takes training steps on the CPU in
float32 through the real step code, within this machine's memory."""

import resource
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfseg.config import load_config
from tfseg.model.build import build_loss, build_model
from tfseg.training import strategy
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps

GPU = Path(__file__).parents[1] / "configs" / "gpu.yaml"
BATCH = 2
MAX_RSS = 20 * 2**30  # bytes; the machine has 24 GiB


@pytest.mark.slow
def test_gpu_recipe_trains_at_its_real_size():
    config = load_config(GPU, [f"data.batch_size={BATCH}", "train.precision=float32", "train.warmup_epochs=0"])
    height, width = config.data.image_size
    channels = len(config.data.offsets)
    assert (height, width, channels) == (384, 384, 5)
    assert (config.model.encoder, config.model.presence_head) == ("efficientnetv2s", True)
    start = time.monotonic()
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        default = strategy.make_strategy("default")
        with default.scope():
            model = build_model(config)
            optimizer = make_optimizer(config.train, 10, "float32")
            optimizer.build(model.trainable_variables)
            steps = Steps(default, model, optimizer, build_loss(config), BATCH, config)
        rng = np.random.default_rng(0)
        x = rng.random((BATCH, height, width, channels), dtype=np.float32)
        y = np.zeros((BATCH, height, width, 3), np.float32)
        y[0, 100:200, 120:260, 0] = y[0, 180:300, 60:160, 1] = y[1, 150:250, 200:330, 2] = 1  # organs, and one missing
        batches = iter(default.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)).repeat()))
        logits = model.get_layer("logits").kernel
        before = keras.ops.convert_to_numpy(logits)
        losses = [float(steps.train_step(batches))]  # no warm-up: the first step moves the weights
        after = keras.ops.convert_to_numpy(logits)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(f"gpu.yaml at {height}x{width}x{channels}, batch {BATCH}, float32 on CPU: {model.count_params():,} "
          f"parameters, losses {losses}, {time.monotonic() - start:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    assert np.isfinite(losses).all()
    assert not np.array_equal(after, before)
    assert peak < MAX_RSS, f"peak resident memory {peak / 2**30:.1f} GiB"
