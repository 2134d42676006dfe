"""Mixed precision proven by training: the same steps as float32 from the same weights, a loss scale
that reacts to non-finite gradients, and clipping of the unscaled gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfseg.config import load_config
from tfseg.data.pipeline import train_dataset
from tfseg.model.build import build_loss, build_model
from tfseg.training import strategy
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps

SMOKE = "configs/smoke.yaml"


@pytest.fixture(scope="module")
def batch(records_dir):
    config = load_config(SMOKE, [f"data.records={records_dir}", "data.batch_size=4"])
    x, y = next(iter(train_dataset(config, [1])))
    return x.numpy(), y.numpy()


def _train(records_dir, batch, precision: str, init=None, steps: int = 4, overrides=()):
    """(losses, weights, model, optimizer) of `steps` training steps on one batch under `precision`."""
    config = load_config(SMOKE, [f"data.records={records_dir}", "data.batch_size=4", *overrides])
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        model = build_model(config)
        if init is not None:
            model.set_weights(init)
        optimizer = make_optimizer(config.train, 100, precision)
        optimizer.build(model.trainable_variables)
        step = Steps(tf.distribute.get_strategy(), model, optimizer, build_loss(config), 4, config)
        batches = iter(tf.data.Dataset.from_tensors(batch).repeat())
        losses = [float(step.train_step(batches)) for _ in range(steps)]
    finally:
        keras.config.set_dtype_policy(previous)
    return losses, model.get_weights(), model, optimizer


@pytest.mark.parametrize(("precision", "tolerance"), [("mixed_float16", 0.02), ("mixed_bfloat16", 0.05)])
def test_mixed_precision_trains_like_float32(records_dir, batch, precision, tolerance):
    """Same initial weights, same batch, four steps: the loss trajectories agree to `tolerance` relative
    (float16 keeps 11 significant bits, bfloat16 8), and the weights stay close to float32's."""
    reference, ref_weights, _, _ = _train(records_dir, batch, "float32")
    losses, weights, _, _ = _train(records_dir, batch, precision, init=ref_weights_init(records_dir, batch))
    assert reference[-1] < reference[0] and losses[-1] < losses[0]  # both learn
    np.testing.assert_allclose(losses, reference, rtol=tolerance)
    init = ref_weights_init(records_dir, batch)
    moved = np.sqrt(sum(np.sum((w - w0) ** 2) for w, w0 in zip(ref_weights, init, strict=True)))
    apart = np.sqrt(sum(np.sum((w - r) ** 2) for w, r in zip(weights, ref_weights, strict=True)))
    # Over all weights the mixed run ends far nearer float32's than float32 moved from the start. (Per
    # weight no such bound holds: Adam turns the rounding noise of a near-zero gradient into a full step.)
    assert apart < 0.5 * moved, (apart, moved)


_INIT = {}


def ref_weights_init(records_dir, batch):
    """The float32 model's initial weights (seed 0), shared by every precision."""
    if "init" not in _INIT:
        config = load_config(SMOKE, [f"data.records={records_dir}", "data.batch_size=4"])
        keras.utils.set_random_seed(0)
        _INIT["init"] = build_model(config).get_weights()
    return _INIT["init"]


def test_loss_scale_skips_non_finite_steps_and_grows_again(records_dir, batch):
    """A step whose gradient is not finite changes no weight and halves the loss scale; finite steps
    after it raise the scale again (after dynamic_growth_steps of them)."""
    losses, _, model, optimizer = _train(records_dir, batch, "mixed_float16", init=ref_weights_init(records_dir, batch),
                                         steps=1)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    scale = float(optimizer.dynamic_scale)
    before = [w.copy() for w in model.get_weights()]
    bad = [tf.fill(v.shape, np.float32(np.inf)) for v in model.trainable_variables]
    optimizer.apply(bad, model.trainable_variables)
    assert float(optimizer.dynamic_scale) == scale / 2
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    optimizer.dynamic_growth_steps = 2
    good = [tf.zeros(v.shape) for v in model.trainable_variables]
    for _ in range(2):
        optimizer.apply(good, model.trainable_variables)
    assert float(optimizer.dynamic_scale) == scale


def test_clipping_acts_on_the_unscaled_gradient(records_dir, batch):
    """With clip_norm 1e-3 the inner optimizer receives a gradient of global norm 1e-3 under float32 and
    under mixed_float16's loss scale of 2^15 alike (Adam's first moment is (1 - beta_1) g after a step)."""
    norms = {}
    for precision in ("float32", "mixed_float16"):
        _, _, _, optimizer = _train(records_dir, batch, precision, init=ref_weights_init(records_dir, batch), steps=1,
                                    overrides=["train.clip_norm=0.001"])
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        first = [m for m in inner.variables if "momentum" in m.path and "velocity" not in m.path]
        norms[precision] = float(tf.linalg.global_norm([tf.cast(m, tf.float32) for m in first])) / (1 - inner.beta_1)
    assert norms["float32"] == pytest.approx(1e-3, rel=1e-3)
    assert norms["mixed_float16"] == pytest.approx(1e-3, rel=1e-2)


# (train.jit_compile, device kind, resolved precision, CPU with native bf16) -> XLA on?
JIT_RULES = [
    ("auto", "cpu", "float32", False, True),  # AVX2-only EPYC: XLA fuses the thin UNet's small ops (README)
    ("auto", "cpu", "float32", True, False),  # avx512_bf16 / AMX CPUs: XLA skips oneDNN's kernels
    ("auto", "cpu", "mixed_bfloat16", True, False),
    ("auto", "gpu", "mixed_float16", False, True),
    ("auto", "tpu", "mixed_bfloat16", False, True),
    (True, "cpu", "mixed_bfloat16", True, True),  # explicit choices are kept
    (False, "gpu", "mixed_float16", False, False),
]


@pytest.mark.parametrize("jit, kind, precision, bf16_cpu, expected", JIT_RULES)
def test_auto_jit_compile_follows_the_device_precision_and_cpu(monkeypatch, jit, kind, precision, bf16_cpu, expected):
    monkeypatch.setattr(strategy, "cpu_supports_bf16", lambda: bf16_cpu)  # what /proc/cpuinfo would say
    assert strategy.resolve_jit_compile(jit, kind, precision) is expected
