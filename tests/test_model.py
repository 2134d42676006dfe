"""UNet builder: shapes, float32 outputs under mixed precision, .keras round trips, bad options."""

import os
import socket

import keras
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from tfseg.model.unet import build_unet

TINY = {"depth": 2, "base_filters": 4}
VARIANTS = {  # every option value appears at least once
    "plain": {},
    "residual_group_norm": {"block": "residual", "norm": "group"},
    "resize_no_norm_dropout": {"upsample": "resize", "norm": "none", "dropout": 0.2},
    "coord_channels": {"coord_channels": True},
}


def scans(shape, batch=2):
    return np.random.default_rng(0).random((batch, *shape), dtype=np.float32)


def assert_round_trip(model, x, path):
    """Saving to .keras and loading gives the same outputs; return them."""
    before = keras.ops.convert_to_numpy(model(x, training=False))
    model.save(path)
    loaded = keras.models.load_model(path)
    assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), before)
    return before


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_shape_range_and_round_trip(variant, tmp_path):
    model = build_unet((32, 32, 3), num_classes=3, **TINY, **VARIANTS[variant])
    probs = assert_round_trip(model, scans((32, 32, 3)), tmp_path / "m.keras")
    assert probs.shape == (2, 32, 32, 3) and probs.dtype == np.float32
    assert ((probs > 0) & (probs < 1)).all()  # independent sigmoids, not a softmax
    assert not np.allclose(probs.sum(axis=-1), 1.0)


@pytest.mark.parametrize(("encoder", "channels"), [("resnet50", 3), ("efficientnetv2b0", 5)])
def test_encoders_round_trip(encoder, channels, tmp_path):
    model = build_unet((64, 64, channels), num_classes=2, base_filters=4, encoder=encoder)
    probs = assert_round_trip(model, scans((64, 64, channels)), tmp_path / "m.keras")
    assert probs.shape == (2, 64, 64, 2) and probs.dtype == np.float32
    backbone = model.get_layer("encoder")  # one sub-model, so it can be frozen for warm-up
    assert [tuple(o.shape[1:3]) for o in backbone.outputs] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert not any(layer.name == "to_rgb" for layer in model.layers)  # the backbone takes the slices itself
    assert backbone.inputs[0].shape[-1] == channels


def test_shallow_encoder_cuts_the_backbone():
    model = build_unet((64, 64, 3), base_filters=4, depth=3, encoder="resnet50")
    assert model.get_layer("encoder").outputs[-1].shape[1:] == (8, 8, 512)  # conv3_block4_out
    assert model.count_params() < 2_000_000  # stages 4 and 5 (~22M weights) are not built


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_precision_outputs_float32(policy, variant):
    model = build_unet((32, 32, 3), **TINY, **VARIANTS[variant])
    assert model.get_layer("logits").compute_dtype == policy.removeprefix("mixed_")
    probs = model(scans((32, 32, 3)), training=False)
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    assert tuple(probs.shape) == (2, 32, 32, 3) and np.isfinite(keras.ops.convert_to_numpy(probs)).all()


def test_policy_fixture_restored():
    assert keras.mixed_precision.global_policy().name == "float32"


def test_fully_convolutional_when_size_is_none():
    model = build_unet((None, None, 3), **TINY)
    assert model(scans((32, 48, 3), batch=1)).shape == (1, 32, 48, 3)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"input_shape": (30, 32, 3)}, "multiples of 2\\*\\*depth = 4"),
    ({"input_shape": (32, 32, 3), "depth": 6}, "multiples of 2\\*\\*depth = 64"),
    ({"input_shape": (32, 32)}, "input_shape"),
    ({"input_shape": (32, 32, 0)}, "input_shape"),
    ({"block": "dense"}, "block"),
    ({"norm": "layer"}, "norm"),
    ({"upsample": "nearest"}, "upsample"),
    ({"encoder": "vgg16"}, "encoder"),
    ({"encoder_weights": "imagenet"}, "needs an encoder"),
    ({"encoder": "resnet50", "encoder_weights": "coco"}, "encoder_weights"),
    ({"encoder": "resnet50", "depth": 6}, "depth"),
    ({"depth": 0}, "depth"),
    ({"num_classes": 0}, "num_classes"),
    ({"base_filters": 0}, "base_filters"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_unet(**{"input_shape": (32, 32, 3), **TINY, **kwargs})


def test_imagenet_download_failure_is_explained(monkeypatch):
    keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    cached = os.path.join(keras_home, "models", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    if os.path.exists(cached):
        pytest.skip(f"weights are cached in {cached}")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded.*encoder_weights: null.*~/.keras/models"):
        build_unet((64, 64, 3), encoder="resnet50", encoder_weights="imagenet")


def expected_params(channels, classes, base, depth):
    """Weights of the plain / batch-norm / transpose UNet, counted by hand."""
    def block(cin, f):  # two bias-free 3x3 convs, each + batch norm (4 weights per channel)
        return 9 * cin * f + 4 * f + 9 * f * f + 4 * f

    width = [base * 2**i for i in range(depth + 1)]
    encoder = sum(block(channels if i == 0 else width[i - 1], width[i]) for i in range(depth + 1))
    decoder = sum(4 * width[i + 1] * width[i] + width[i] + block(2 * width[i], width[i]) for i in range(depth))
    return encoder + decoder + width[0] * classes + classes


@pytest.mark.parametrize(("channels", "classes", "base", "depth"), [(3, 3, 4, 2), (1, 2, 8, 3), (5, 3, 16, 4)])
def test_parameter_count(channels, classes, base, depth):
    model = build_unet((None, None, channels), classes, base_filters=base, depth=depth)
    assert model.count_params() == expected_params(channels, classes, base, depth)


def test_coord_channels_tell_places_apart():
    """A scan that is the same everywhere gets the same output at every interior pixel from a plain UNet
    (only the zero padding tells places apart), and different outputs with the coordinate channels."""
    flat = np.full((1, 64, 64, 3), 0.5, np.float32)
    spread = {}
    for coords in (False, True):
        keras.utils.set_random_seed(0)
        model = build_unet((64, 64, 3), num_classes=3, depth=1, base_filters=4, norm="none", upsample="resize",
                           coord_channels=coords)
        probs = keras.ops.convert_to_numpy(model(flat, training=False))[0, 16:-16, 16:-16]
        spread[coords] = float(probs.std(axis=(0, 1)).max())
    assert spread[False] < 1e-4 < 1e-3 < spread[True], spread  # float round-off only, then real differences
    with pytest.raises(Exception, match="coord_channels works with the built-in encoder only"):
        build_unet((64, 64, 3), encoder="resnet50", coord_channels=True)
