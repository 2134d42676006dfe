"""The GPU recipes' models at their real size take training steps on the CPU in float32 through the real step
code, within this machine's memory: configs/gpu.yaml (384 px, 5 context slices) and configs/gpu3d.yaml (its
3D patches)."""

import contextlib
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

CONFIGS = Path(__file__).parents[1] / "configs"
BATCH = 2
MAX_RSS = 20 * 2**30  # bytes; the machine has 24 GiB


@contextlib.contextmanager
def float32_steps(config, x, y):
    """(model, step): the config's model built in float32 on the default strategy, and a function taking one
    training step on the batch (x, y) through the real step code, returning its loss."""
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        default = strategy.make_strategy("default")
        with default.scope():
            model = build_model(config)
            optimizer = make_optimizer(config.train, 10, "float32")
            optimizer.build(model.trainable_variables)
            steps = Steps(default, model, optimizer, build_loss(config), len(x), config)
        batches = iter(default.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)).repeat()))
        yield model, lambda: float(steps.train_step(batches))
    finally:
        keras.config.set_dtype_policy(previous_policy)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one_step_at_real_size(config, x, y, what: str, start: float) -> None:
    """One training step on (x, y): finite loss, the logits kernel moved (no warm-up: the first step moves
    the weights), peak memory within the machine's; prints what it measured."""
    with float32_steps(config, x, y) as (model, step):
        logits = model.get_layer("logits").kernel
        before = keras.ops.convert_to_numpy(logits)
        losses = [step()]
        after = keras.ops.convert_to_numpy(logits)
    peak = peak_rss()
    print(f"{what}, float32 on CPU: {model.count_params():,} parameters, losses {losses}, "
          f"{time.monotonic() - start:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    assert np.isfinite(losses).all()
    assert not np.array_equal(after, before)
    assert peak < MAX_RSS, f"peak resident memory {peak / 2**30:.1f} GiB"


def recipe(name: str, batch: int):
    return load_config(CONFIGS / f"{name}.yaml", [f"data.batch_size={batch}", "train.precision=float32",
                                                  "train.warmup_epochs=0"])


@pytest.mark.slow
def test_gpu_recipe_trains_at_its_real_size():
    config = recipe("gpu", BATCH)
    height, width = config.data.image_size
    channels = len(config.data.offsets)
    assert (height, width, channels) == (384, 384, 5)
    assert (config.model.encoder, config.model.presence_head) == ("efficientnetv2s", True)
    start = time.monotonic()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, height, width, channels), dtype=np.float32)
    y = np.zeros((BATCH, height, width, 3), np.float32)
    y[0, 100:200, 120:260, 0] = y[0, 180:300, 60:160, 1] = y[1, 150:250, 200:330, 2] = 1  # organs, and one missing
    one_step_at_real_size(config, x, y, f"gpu.yaml at {height}x{width}x{channels}, batch {BATCH}", start)


@pytest.mark.slow
def test_gpu3d_recipe_takes_a_step_at_its_real_size():
    """gpu3d.yaml's 3D UNet at its real patch size, one patch (the recipe's 2 are per GPU), one step as for
    gpu.yaml: a step at this size takes minutes on a 2-core CPU."""
    config = recipe("gpu3d", 1)
    patch = d, h, w = tuple(config.data.patch_size)
    assert (config.model.kind, patch) == ("3d", (48, 192, 192))
    start = time.monotonic()
    x = np.random.default_rng(0).random((1, *patch, 1), dtype=np.float32)
    y = np.zeros((1, *patch, 3), np.float32)
    y[0, d // 4:d // 2, h // 4:h // 2, w // 4:w // 2, 0] = y[0, d // 2:, h // 2:, w // 3:w // 2, 1] = 1
    one_step_at_real_size(config, x, y, f"gpu3d.yaml patch {patch}, batch 1", start)
