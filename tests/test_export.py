"""SavedModel export: what TF Serving needs (layout, signatures, warm-up), same numbers as Keras, clear errors.

The tiny run and its export are built once per session under the session's temp folder (the builders
below are idempotent) and shared with test_evaluate, test_predict and test_client.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose

from tfseg import CLASSES, cli, export, files, layout
from tfseg.config import load_config, save_config
from tfseg.data import context, preprocess
from tfseg.errors import DataError
from tfseg.evaluation.postprocess import Postprocess, slice_masks
from tfseg.kaggle import index
from tfseg.model.float32 import float32_model
from tfseg.model.unet import build_unet
from tfseg.serving import savedmodel
from tfseg.serving.api import reason
from tfseg.training.run_folder import load_run_model

TINY = ["data.image_size=[64,64]", "data.offsets=[-2,0,2]", "model.depth=2", "model.base_filters=8",
        "model.block=plain", "train.precision=float32"]
K = 3


def tiny_run(records_dir, root: Path, presence_head: bool = False) -> Path:
    """A run folder made by hand: config.yaml + model.keras of an untrained, seeded 64 px UNet (with a
    presence head: root/run-presence, whose masks are drawn above 0.05 and gated below a presence of 0.5,
    so that the untrained model's gating has slices to empty)."""
    run = root / ("run-presence" if presence_head else "run")
    if not (run / "model.keras").exists():
        gating = ["model.presence_head=true", "train.threshold=0.05", "train.presence_threshold=0.5"]
        config = load_config(None, [f"data.records={records_dir}", *TINY, *(gating if presence_head else [])])
        keras.utils.set_random_seed(0)
        model = build_unet((64, 64, K), depth=2, base_filters=8, presence_head=presence_head)
        save_config(config, run / "config.yaml")
        model.save(run / "model.keras")
    return run


def tiny_export(records_dir, root: Path) -> Path:
    out = root / "saved_models" / "tiny" / "1"
    if not out.exists():
        savedmodel.export(tiny_run(records_dir, root), out, verbose=False)
    return out


def volume_pngs(synth_dir, case_day: str | None = None) -> tuple[str, list[bytes]]:
    """(case_day, scan file bytes in slice order) of one volume of the synthetic dataset."""
    table = index.read_index(synth_dir)
    case_day = case_day or table["case_day"].iloc[0]
    return case_day, [Path(p).read_bytes() for p in table.loc[table["case_day"] == case_day, "path"]]


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def run_dir(records_dir, tmp_path_factory):
    return tiny_run(records_dir, tmp_path_factory.getbasetemp() / "serving")


@pytest.fixture(scope="module")
def saved_model(records_dir, tmp_path_factory):
    return tiny_export(records_dir, tmp_path_factory.getbasetemp() / "serving")


@pytest.fixture(scope="module")
def loaded(saved_model):
    return tf.saved_model.load(str(saved_model))


def test_layout_warmup_and_info(saved_model):
    assert (saved_model / "saved_model.pb").is_file()
    assert (saved_model / "variables" / "variables.index").is_file()
    assert not [p for p in saved_model.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"
    from tensorflow_serving.apis import prediction_log_pb2

    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in
            tf.data.TFRecordDataset(str(saved_model / "assets.extra" / layout.WARMUP_FILE))]
    assert len(logs) == 2
    requests = {log.predict_log.request.model_spec.signature_name: log.predict_log.request for log in logs}
    assert sorted(requests) == ["serving_default", "serving_volume"]
    slices = tf.make_ndarray(requests["serving_default"].inputs["slices"])
    assert slices.shape == (1, K)
    volume = tf.make_ndarray(requests["serving_volume"].inputs["slices"])
    assert volume.shape == (8,)  # the middle of a 24-slice validation volume, in order
    for item in [*slices.ravel(), *volume]:  # real 16-bit scans from the validation records
        assert cv2.imdecode(np.frombuffer(item, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    info = layout.read_info(saved_model)
    assert info["classes"] == list(CLASSES) and info["offsets"] == [-2, 0, 2]
    assert info["max_image_size"] == 2048 and info["bit_depth"] == 16
    assert {"serving_volume", "volume_probabilities"} <= set(info["signatures"])
    assert [m["weight"] for m in info["members"]] == [1.0]
    assert info["input_size"] == [64, 64] and info["threshold"] == 0.5
    assert info["config"]["model"]["base_filters"] == 8
    assert info["min_component_fraction"] == info["config"]["train"]["min_component_fraction"]  # predict's 3D step


@pytest.mark.slow
def test_saved_model_cli_lists_both_signatures(saved_model):
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run([str(cli), "show", "--dir", str(saved_model), "--all"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    out = shown.stdout
    default = out[out.index("signature_def['serving_default']"):]
    floats = out[out.index("signature_def['predict_float']"):out.index("signature_def['serving_default']")]
    # rows of any K reach the graph's own check (and its sentence); predict_float's shape tells clients K
    assert "inputs['slices']" in default and "DT_STRING" in default and "(-1, -1)" in default
    assert "outputs['masks']" in default and "DT_UINT8" in default and "outputs['probabilities']" in default
    assert "inputs['scans']" in floats and f"(-1, 64, 64, {K})" in floats and "outputs['probabilities']" in floats


@pytest.mark.slow
def test_answers_in_a_fresh_process_without_tfseg(saved_model, tmp_path):
    script = (
        "import json, sys\n"
        "import numpy as np, tensorflow as tf\n"
        "from tensorflow_serving.apis import prediction_log_pb2\n"
        "path = sys.argv[1]\n"
        "model = tf.saved_model.load(path)\n"
        "raw = next(iter(tf.data.TFRecordDataset(path + '/assets.extra/tf_serving_warmup_requests'))).numpy()\n"
        "request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request\n"
        "slices = tf.constant(tf.make_ndarray(request.inputs['slices']))\n"
        "out = model.signatures['serving_default'](slices=slices)\n"
        "probs = model.signatures['predict_float'](scans=tf.zeros([2, 64, 64, 3]))['probabilities']\n"
        "print(json.dumps({'masks': out['masks'].shape.as_list(), 'dtype': out['masks'].dtype.name,\n"
        "                  'values': sorted(np.unique(out['masks'].numpy()).tolist()),\n"
        "                  'float': probs.shape.as_list(), 'tfseg': 'tfseg' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(saved_model)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tfseg"] is False
    assert result["masks"][0] == 1 and result["masks"][3] == 3 and result["dtype"] == "uint8"
    assert set(result["values"]) <= {0, 1}
    assert result["float"] == [2, 64, 64, 3]


def test_float_signature_matches_keras(run_dir, loaded):
    _, model, _ = load_run_model(run_dir)
    scans = np.random.default_rng(1).random((20, 64, 64, K), dtype=np.float32)  # 20: two chunks of 16
    got = loaded.signatures["predict_float"](scans=tf.constant(scans))["probabilities"].numpy()
    assert_allclose(got, model(scans, training=False).numpy(), atol=1e-5, rtol=0)


def test_png_signature_preprocesses_as_training(run_dir, loaded, synth_dir):
    """Whole-volume request == the evaluation pipeline (normalise per volume, resize, 2.5D stack, restore)."""
    config, model, _ = load_run_model(run_dir)
    _, pngs = volume_pngs(synth_dir)
    volume = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED) for b in pngs])
    scans = preprocess.resize_images(preprocess.normalize(volume, config.data.clip_percentiles)[..., None], (64, 64),
                               config.data)
    expected = model(context.context_stack(scans[..., 0], config.data.offsets), training=False)
    expected = preprocess.restore_size(expected, volume.shape[1:], config.data).numpy()
    # the request rows of tfseg.client / tfseg.predict against tfseg.data's 2.5D stacking
    out = loaded.signatures["serving_default"](slices=tf.constant(context.context_rows(pngs, config.data.offsets)))
    assert out["probabilities"].shape == (len(pngs), *volume.shape[1:], 3)
    assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5, rtol=0)
    assert (out["masks"].numpy() == slice_masks(Postprocess(), out["probabilities"].numpy())).all()


GOOD = png(np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7)
BAD_REQUESTS = {
    "not a PNG": ([[GOOD, b"GIF89a not a png at all", GOOD]], "not a PNG file"),
    "8-bit PNG": ([[GOOD, png(np.zeros((64, 48), np.uint8)), GOOD]], "not a 16-bit PNG"),
    "16-bit colour PNG": ([[png(np.zeros((64, 48, 3), np.uint16))] * K], "not a greyscale PNG"),
    "mixed sizes": ([[GOOD, GOOD, GOOD], [GOOD, png(np.zeros((64, 40), np.uint16)), GOOD]], "same width and height"),
    "empty request": (np.zeros((0, K), object), "holds no slices"),
    "truncated PNG": ([[GOOD[:80]] * K], "PNG"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_is_an_invalid_argument_error(loaded, case):
    request, message = BAD_REQUESTS[case]
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        loaded.signatures["serving_default"](slices=tf.constant(request, tf.string))
    assert message in err.value.message
    assert message in reason(err.value.message)


def test_the_signatures_declare_k_and_refuse_another(loaded):
    """predict_float's scans [None, h, w, K] declare K (TF Serving's metadata and saved_model_cli show it);
    the PNG rows take any K in their spec, so that another K reaches the graph's one-sentence check."""
    assert loaded.signatures["predict_float"].structured_input_signature[1]["scans"].shape.as_list() == \
        [None, 64, 64, K]
    for name in ("serving_default", "masks_png"):
        assert loaded.signatures[name].structured_input_signature[1]["slices"].shape.as_list() == [None, None]
        with pytest.raises(tf.errors.InvalidArgumentError) as err:
            loaded.signatures[name](slices=tf.constant([[GOOD, GOOD]]))
        assert reason(err.value.message) == (
            "each row of slices must hold K = 3 PNGs, the slices at offsets -2,0,2 the model was trained with "
            "(read them from its metadata); the rows of this request hold 2")


@pytest.mark.parametrize("offsets", [(-1, 1), (-2, 0, 2), (0,), (1, -3, 0)])
def test_distinct_slices_come_in_slice_order_whatever_the_offsets(offsets):
    """A whole volume's request decodes to the volume in slice order, so the serving graph's percentile
    clip equals training's, also where the subsample stride does not divide a slice (151 x 151 px)."""
    from tfseg.serving.signatures import decode_slices

    volume = np.random.default_rng(1).integers(0, 4000, (20, 151, 151), dtype=np.uint16)
    rows = context.context_rows([png(v) for v in volume], offsets)
    images, index = decode_slices(tf.constant(rows), offsets)
    np.testing.assert_array_equal(images.numpy(), volume)
    stacked = tf.gather(images, index).numpy()  # [N, K, H, W] as the model's channels
    np.testing.assert_array_equal(stacked, volume[np.asarray([[min(max(i + o, 0), 19) for o in offsets]
                                                              for i in range(20)])])
    clip = (0.5, 99.5)
    np.testing.assert_array_equal(preprocess.normalize(images, clip).numpy(),
                                  preprocess.normalize(volume, clip).numpy())


def test_one_request_of_any_size_works(loaded):
    out = loaded.signatures["serving_default"](slices=tf.constant([[GOOD] * K]))
    assert out["masks"].shape == (1, 64, 48, 3) and out["masks"].dtype == tf.uint8


def test_refuses_existing_version_unless_overwrite(run_dir, saved_model, tmp_path, capsys):
    stamp = (saved_model / "saved_model.pb").stat().st_mtime_ns
    assert cli.run(export.main, ["--run", str(run_dir), "--out", str(saved_model)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (saved_model / "saved_model.pb").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="numbered version folder"):
        savedmodel.export(run_dir, tmp_path / "tiny" / "latest")


def test_overwrite_swaps_the_whole_version(tmp_path):
    target = tmp_path / "m" / "2"
    (target / "variables").mkdir(parents=True)
    (target / "stale.txt").write_text("old export")
    with pytest.raises(DataError, match="already exists"), files.atomic_dir(target, overwrite=False) as tmp:
        (tmp / "saved_model.pb").write_bytes(b"new")
    assert (target / "stale.txt").exists()
    with files.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "saved_model.pb").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["saved_model.pb"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["2"], "temp or old folders left behind"


def test_failed_export_leaves_nothing(tmp_path):
    target = tmp_path / "m" / "1"
    with pytest.raises(RuntimeError), files.atomic_dir(target, overwrite=False) as tmp:
        (tmp / "saved_model.pb").write_bytes(b"half")
        raise RuntimeError("killed half-way")
    assert list((tmp_path / "m").iterdir()) == []


def test_mixed_precision_model_is_exported_in_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        mixed = build_unet((32, 32, K), depth=2, base_filters=4)
    finally:
        keras.config.set_dtype_policy(previous)
    clean = float32_model(mixed)
    assert all(layer.dtype_policy.name == "float32" for layer in clean._flatten_layers())
    for a, b in zip(mixed.get_weights(), clean.get_weights(), strict=True):
        assert (a == b).all()
    x = np.random.default_rng(0).random((2, 32, 32, K), dtype=np.float32)
    assert_allclose(clean(x, training=False).numpy(), mixed(x, training=False).numpy(), atol=2e-2)


def test_operator_kit_beside_the_export(saved_model):
    """models.config parses as TF Serving's ModelServerConfig; the batching file sets known fields."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    extra = saved_model / "assets.extra"
    config = text_format.Parse((extra / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == saved_model.parent.name and model.model_platform == "tensorflow"
    assert list(model.model_version_policy.specific.versions) == [1]
    # BatchingParameters is not in tensorflow-serving-api: check its lines against the proto's fields
    fields = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"}
    lines = [line for line in (extra / "batching_parameters.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    values = dict(re.fullmatch(r"(\w+) \{ value: (\d+) \}", line).groups() for line in lines if "{" in line)
    assert set(values) == fields and all(int(v) > 0 for v in values.values())
    assert "pad_variable_length_inputs: false" in lines
