"""keras.applications encoders: every one builds in the UNet, weights load from a local file, bad files fail."""

import os
import socket
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from tfseg import cli, train
from tfseg.config import CHOICES, load_config
from tfseg.errors import ConfigError
from tfseg.model.unet import ENCODERS, build_unet

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
STRIDES = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # strides 2..32 of a 64 px input


def scans(shape, batch=2, seed=0):
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def b0_backbone():
    """A randomly initialised EfficientNetV2B0 backbone, as _backbone builds it."""
    return keras.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=(64, 64, 3),
                                               include_preprocessing=False)


def assert_same_weights(backbone: keras.Model, encoder: keras.Model):
    """Layer by layer (some names are numbered per process, e.g. EfficientNet B's normalization_N)."""
    saved, loaded = ([layer for layer in m.layers if layer.weights] for m in (backbone, encoder))
    assert [len(layer.weights) for layer in loaded] == [len(layer.weights) for layer in saved] != []
    for a, b in zip(saved, loaded, strict=True):
        for want, got in zip(a.get_weights(), b.get_weights(), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=b.name)


def test_config_choices_match_the_encoders():
    assert CHOICES["model.encoder"] == (None, *ENCODERS)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_builds_and_predicts(encoder):
    """With 5 context slices, which the backbone takes itself (no 1x1 conv down to RGB in front of it)."""
    model = build_unet((64, 64, 5), 3, depth=5, base_filters=4, encoder=encoder)
    probs = keras.ops.convert_to_numpy(model(scans((64, 64, 5)), training=False))
    assert probs.shape == (2, 64, 64, 3) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
    assert [tuple(o.shape[1:3]) for o in model.get_layer("encoder").outputs] == STRIDES
    assert model.get_layer("encoder").inputs[0].shape[-1] == 5
    assert not any(layer.name == "to_rgb" for layer in model.layers)


@pytest.mark.parametrize("encoder", ["efficientnetb4", "convnext_tiny"])
def test_new_encoder_structures_round_trip(encoder, tmp_path):
    """EfficientNet B's input scaling and ConvNeXt's stride-2 conv survive saving to .keras."""
    model = build_unet((64, 64, 5), 2, base_filters=4, encoder=encoder, presence_head=True)
    x = scans((64, 64, 5))
    before = model(x, training=False)
    model.save(tmp_path / "m.keras")
    after = keras.models.load_model(tmp_path / "m.keras")(x, training=False)
    for key in ("probabilities", "presence"):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(after[key]), keras.ops.convert_to_numpy(before[key]))


def test_efficientnet_b_sees_scans_in_the_range_its_rescaling_expects():
    """[0, 1] scans x 255, then the backbone's own 1/255: its normalisation gets the scans themselves."""
    encoder = build_unet((64, 64, 3), base_filters=4, encoder="efficientnetb4").get_layer("encoder")
    own = next(layer for layer in encoder.layers
               if isinstance(layer, keras.layers.Rescaling) and layer.name != "to_0_255")
    x = scans((64, 64, 3))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.Model(encoder.input, own.output)(x)), x, rtol=1e-6)


def test_convnext_has_no_preprocessing_and_its_own_stride2_conv():
    encoder = build_unet((64, 64, 3), base_filters=4, depth=2, encoder="convnext_tiny").get_layer("encoder")
    assert not any(isinstance(layer, keras.layers.Normalization | keras.layers.Rescaling) for layer in encoder.layers)
    assert encoder.outputs[0].shape[1:] == (32, 32, 64)  # stride2_conv
    assert encoder.outputs[1].shape[1:] == (16, 16, 96)  # stage 0
    assert encoder.get_layer("stride2_conv").strides == (2, 2)


@pytest.mark.parametrize(("encoder", "policy"), [  # gpu.yaml's encoder, and the two new structures
    ("efficientnetv2s", "mixed_float16"), ("efficientnetb4", "mixed_float16"), ("efficientnetb4", "mixed_bfloat16"),
    ("convnext_tiny", "mixed_float16"), ("convnext_tiny", "mixed_bfloat16")])
def test_encoders_under_mixed_precision(encoder, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_unet((64, 64, 5), base_filters=4, encoder=encoder)
        probs = model(scans((64, 64, 5)), training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    assert np.isfinite(keras.ops.convert_to_numpy(probs)).all()


def test_weights_from_a_local_file(tmp_path):
    saved = b0_backbone()
    path = tmp_path / "b0.weights.h5"
    saved.save_weights(path)
    model = build_unet((64, 64, 3), base_filters=4, encoder="efficientnetv2b0", encoder_weights=str(path))
    assert_same_weights(saved, model.get_layer("encoder"))
    fresh = build_unet((64, 64, 3), base_filters=4, encoder="efficientnetv2b0").get_layer("encoder")
    stem = [m.get_layer("stem_conv").get_weights()[0] for m in (fresh, saved)]
    assert not np.array_equal(*stem)


def test_weights_from_a_keras_style_h5_file(tmp_path):
    """The layout of the *_notop.h5 files Keras downloads (weights only, legacy HDF5), at another size."""
    saved = keras.applications.EfficientNetB4(include_top=False, weights=None, input_shape=(96, 96, 3))
    path = tmp_path / "efficientnetb4_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, saved)
    model = build_unet((64, 64, 3), base_filters=4, encoder="efficientnetb4", encoder_weights=str(path))
    assert_same_weights(saved, model.get_layer("encoder"))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    resnet = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    resnet.save_weights(folder / "resnet50.weights.h5")
    with h5py.File(folder / "resnet50_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, resnet)
    (folder / "text.weights.h5").write_text("not HDF5")
    return folder


# (encoder_weights for an efficientnetv2b0 encoder, what the ConfigError says); {} is the files' folder.
BAD_WEIGHTS = [
    ("{}/missing.weights.h5", r"file .*missing\.weights\.h5 for encoder 'efficientnetv2b0' does not exist"),
    ("{}/resnet50.weights.h5", r"resnet50\.weights\.h5 does not load into encoder 'efficientnetv2b0' \(keras\."
                               r"applications\.EfficientNetV2B0, include_top=False\): its weights do not match "
                               r"\(A total of \d+ objects could not be loaded"),
    ("{}/resnet50_notop.h5", r"resnet50_notop\.h5 does not load into encoder 'efficientnetv2b0'.*do not match "
                             r"\(Layer count mismatch"),
    ("{}/text.weights.h5", r"text\.weights\.h5 does not load into encoder 'efficientnetv2b0'.*not an HDF5 weights "
                           r"file \(.*file signature not found"),
    ("weights.pt", r"encoder_weights must be null, 'imagenet' or the path of a \.h5 / \.weights\.h5 file, got "
                   r"'weights\.pt'"),
    ("coco", r"encoder_weights must be null, 'imagenet' or the path"),
]


@pytest.mark.parametrize(("weights", "match"), BAD_WEIGHTS, ids=[w.rsplit("/")[-1] for w, _ in BAD_WEIGHTS])
def test_bad_weights_are_config_errors(weights, match, weight_files, recwarn):
    with pytest.raises(ConfigError, match=match):
        build_unet((64, 64, 3), base_filters=4, encoder="efficientnetv2b0",
                   encoder_weights=weights.format(weight_files))
    assert not recwarn.list  # the per-layer warnings of a failed load are not shown


@pytest.mark.parametrize(("weights", "ok"), [(None, True), ("imagenet", True), ("/x/b0.weights.h5", True),
                                             ("~/b0_notop.h5", True), ("weights.pt", False), ("", False)])
def test_config_accepts_null_imagenet_or_an_h5_path(weights, ok):
    override = f"model.encoder_weights={'null' if weights is None else repr(weights)}"
    if ok:
        assert load_config(None, [override]).model.encoder_weights == weights
    else:
        with pytest.raises(ConfigError, match="model.encoder_weights"):
            load_config(None, [override])


@pytest.mark.parametrize(("name", "message"), [("/no/such.weights.h5", "does not exist"),
                                               ("resnet50.weights.h5", "do not match")])
def test_bad_weights_file_from_the_command_line(records_dir, weight_files, tmp_path, capsys, name, message):
    path = weight_files / name if not name.startswith("/") else name
    argv = ["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), "--no-progress",
            "--set", f"data.records={records_dir}", "--set", "model.encoder=efficientnetv2b0",
            "--set", f"model.encoder_weights={path}"]
    assert cli.run(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing half-written: the run folder is made after the model


def test_imagenet_download_failure_is_explained_for_efficientnet_b(monkeypatch):
    """The scaled input (input_tensor) path still asks Keras for the ImageNet weights."""
    keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    if os.path.exists(os.path.join(keras_home, "models", "efficientnetb4_notop.h5")):
        pytest.skip("weights are cached")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded.*encoder_weights: null"):
        build_unet((64, 64, 3), encoder="efficientnetb4", encoder_weights="imagenet")


def _rgb_weights_file(encoder: str, folder: Path) -> Path:
    """A random 3-channel backbone of `encoder` saved as a local weights file, as _backbone builds it."""
    keras.utils.set_random_seed(1)
    if encoder == "efficientnetb4":  # Keras' own *_notop.h5 layout (legacy HDF5, by layer name)
        path = folder / "efficientnetb4_notop.h5"
        saved = keras.applications.EfficientNetB4(include_top=False, weights=None, input_shape=(64, 64, 3))
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, saved)
        return path
    constructor = getattr(keras.applications, ENCODERS[encoder][0])
    options = {} if encoder == "resnet50" else {"include_preprocessing": False}
    saved = constructor(include_top=False, weights=None, input_shape=(64, 64, 3), **options)
    path = folder / f"{encoder}.weights.h5"
    saved.save_weights(path)
    return path


def _outputs(model: keras.Model, layer: str, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(keras.Model(model.inputs[0], model.get_layer(layer).output)(x))


# encoder -> the layer read as "the stem's output" (EfficientNet B: its linear conv, see below)
STEMS = {"efficientnetv2b0": "stem_activation", "resnet50": "conv1_relu", "convnext_tiny": "convnext_tiny_stem",
         "efficientnetb4": "stem_conv"}


@pytest.mark.parametrize("encoder", STEMS)
def test_k_slices_inflate_the_pretrained_stem(encoder, tmp_path):
    """5 slices into a backbone whose RGB weights come from a file: a grey scan (the same on every slice)
    gives the 3-channel backbone's stem output and features on that grey image. EfficientNet B normalises
    each RGB channel with its own ImageNet mean, which one mean over K slices cannot reproduce: there the
    stem conv's response to a change of grey level is the RGB one (its output up to a constant per filter)."""
    path = _rgb_weights_file(encoder, tmp_path)
    rgb = build_unet((64, 64, 3), base_filters=4, encoder=encoder, encoder_weights=str(path)).get_layer("encoder")
    model = build_unet((64, 64, 5), base_filters=4, encoder=encoder, encoder_weights=str(path))
    assert not any(layer.name == "to_rgb" for layer in model.layers)
    k5 = model.get_layer("encoder")
    assert k5.inputs[0].shape[-1] == 5
    grey = scans((64, 64, 1), seed=3)
    dark = 0.5 * grey
    stem = STEMS[encoder]
    if encoder == "efficientnetb4":
        change_rgb = _outputs(rgb, stem, np.repeat(grey, 3, -1)) - _outputs(rgb, stem, np.repeat(dark, 3, -1))
        change_k5 = _outputs(k5, stem, np.repeat(grey, 5, -1)) - _outputs(k5, stem, np.repeat(dark, 5, -1))
        np.testing.assert_allclose(change_k5, change_rgb, rtol=1e-4, atol=1e-4 * np.abs(change_rgb).max())
        return
    want = _outputs(rgb, stem, np.repeat(grey, 3, -1))
    np.testing.assert_allclose(_outputs(k5, stem, np.repeat(grey, 5, -1)), want, rtol=1e-4, atol=1e-5)
    # ... and through the whole backbone (ConvNeXt's stride-2 conv is tfseg's own, random in both)
    first = 1 if encoder.startswith("convnext") else 0
    for got, expected in list(zip(k5(np.repeat(grey, 5, -1)), rgb(np.repeat(grey, 3, -1)), strict=True))[first:]:
        expected = keras.ops.convert_to_numpy(expected)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, rtol=1e-3,
                                   atol=1e-4 * np.abs(expected).max())
    if encoder in ("efficientnetv2b0", "resnet50"):  # the backbone as Keras builds it, not through tfseg
        saved = getattr(keras.applications, ENCODERS[encoder][0])(
            include_top=False, weights=None, input_shape=(64, 64, 3),
            **({} if encoder == "resnet50" else {"include_preprocessing": False}))
        saved.load_weights(path)
        np.testing.assert_allclose(_outputs(saved, stem, np.repeat(grey, 3, -1)), want, rtol=1e-5, atol=1e-6)

