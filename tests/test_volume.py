"""The whole-volume signatures, the normalisation rule, fusion of several runs and the PNG header checks.

Every SavedModel here answers in a fresh process that does not import tfseg (one process for all the
requests of this module, `answers`); the expected numbers come from tfseg's training functions.

The normalisation rule: intensities are clipped to percentiles over the slices one request holds. A
volume sent whole (serving_volume, or serving_default with every context row) therefore gets training's
numbers; a slice sent alone is normalised over its K context slices, and agrees with the whole volume
exactly when those slices have the volume's intensity distribution.
"""

import json
import pickle
import struct
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest
from numpy.testing import assert_allclose

from tests.test_export import TINY, png, run_dir, saved_model, tiny_run, volume_pngs  # noqa: F401
from tfseg import cli, export, layout
from tfseg.config import load_config, save_config
from tfseg.data import context, preprocess
from tfseg.model.unet import build_unet
from tfseg.serving.client import png_mask
from tfseg.training.run_folder import load_run_model

OFFSETS = (-2, 0, 2)
STRING_SIGNATURES = ("serving_default", "masks_png", "serving_volume", "volume_probabilities")

# Runs the requests of a pickle file [(id, model path, signature, slices)] and pickles {id: outputs as
# numpy, or {"error": message}}; prints whether tfseg got imported.
ANSWER = """
import pickle, sys
import tensorflow as tf
requests = pickle.load(open(sys.argv[1], "rb"))
models, answers = {}, {}
for key, path, signature, slices in requests:
    model = models.setdefault(path, tf.saved_model.load(path))
    try:
        out = model.signatures[signature](slices=tf.constant(slices, tf.string))
        answers[key] = {name: value.numpy() for name, value in out.items()}
    except tf.errors.InvalidArgumentError as err:
        answers[key] = {"error": err.message}
pickle.dump(answers, open(sys.argv[2], "wb"))
print("tfseg imported:", "tfseg" in sys.modules)
"""


def declares(width: int, height: int) -> bytes:
    """A 4 x 4 16-bit PNG whose header (with a valid CRC) declares width x height."""
    small = png(np.zeros((4, 4), np.uint16))
    chunk = b"IHDR" + struct.pack(">II", width, height) + small[24:29]
    return small[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


def rolled_volume(depth: int = 12) -> np.ndarray:
    """A volume whose slices are one image rolled, its values clipped so that more than 0.5 % of them sit
    at each end: the 0.5 and 99.5 percentiles of any set of its slices are the same two numbers."""
    y, x = np.mgrid[:70, :60]
    image = np.clip(1700 + 1200 * np.sin(x / 7.0) * np.cos(y / 11.0), 1000, 2500).astype(np.uint16)
    return np.stack([np.roll(image, 5 * i, axis=1) for i in range(depth)])


def add_run(root, name: str, overrides: list[str], shape, seed: int, num_classes: int = 3):
    """A run folder of an untrained tiny UNet (like test_export.tiny_run) with other settings."""
    run = root / name
    if not (run / "model.keras").exists():
        save_config(load_config(None, [*TINY, *overrides]), run / "config.yaml")
        keras.utils.set_random_seed(seed)
        build_unet(shape, num_classes, depth=2, base_filters=8).save(run / "model.keras")
    return run


@pytest.fixture(scope="module")
def runs(records_dir, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "serving"
    records = f"data.records={records_dir}"
    return {"a": tiny_run(records_dir, root),
            "b": add_run(root, "run_b", [records], (64, 64, 3), seed=1),
            "two_classes": add_run(root, "run_two_classes", [records], (64, 64, 3), seed=2, num_classes=2),
            "small": add_run(root, "run_small", [records, "data.image_size=[32,32]"], (32, 32, 3), seed=3)}


@pytest.fixture(scope="module")
def fused(runs, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "serving" / "saved_models" / "fused" / "1"
    if not out.exists():
        assert cli.run(export.main, ["--run", str(runs["a"]), "--run", str(runs["b"]), "--weight", "3",
                                     "--weight", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def volumes(synth_dir):
    _, pngs = volume_pngs(synth_dir)
    return {"synth": pngs, "rolled": [png(v) for v in rolled_volume()]}


@pytest.fixture(scope="module")
def answers(saved_model, fused, volumes, tmp_path_factory):  # noqa: F811
    """Every request of this module, answered by the SavedModels in one fresh process without tfseg."""
    tiny, requests = str(saved_model), []
    for name, pngs in volumes.items():
        rows = context.context_rows(pngs, OFFSETS)
        requests += [(f"{name}/volume", tiny, "volume_probabilities", pngs),
                     (f"{name}/volume_png", tiny, "serving_volume", pngs),
                     (f"{name}/rows", tiny, "serving_default", rows)]
        requests += [(f"{name}/row{i}", tiny, "serving_default", [row]) for i, row in enumerate(rows)]
    requests.append(("fused/volume", str(fused), "volume_probabilities", volumes["synth"]))
    requests.append(("fused/rows", str(fused), "serving_default", context.context_rows(volumes["synth"], OFFSETS)))
    good = volumes["synth"][0]
    for case, (pngs, _) in BAD_VOLUMES.items():
        requests.append((f"bad/{case}", tiny, "serving_volume", [good if p == "good" else p for p in pngs]))
    for signature in STRING_SIGNATURES:
        huge = [good, declares(100_000, 100_000)]
        slices = huge if "volume" in signature else [[good, huge[1], good]]
        requests.append((f"huge/{signature}", tiny, signature, slices))
    folder = tmp_path_factory.mktemp("fresh")
    (folder / "requests.pkl").write_bytes(pickle.dumps(requests))
    done = subprocess.run([sys.executable, "-c", ANSWER, "requests.pkl", "answers.pkl"], capture_output=True,
                          text=True, cwd=folder, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tfseg imported: False" in done.stdout
    return pickle.loads((folder / "answers.pkl").read_bytes())


def decode(pngs: list[bytes]) -> np.ndarray:
    import cv2

    return np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED) for b in pngs])


def expected(run, images: np.ndarray, groups=None) -> np.ndarray:
    """Training's numbers: probabilities [D, H, W, 3] of the run's Keras model for a volume, normalised
    over the whole volume, or (groups: per slice, the slice indices its request held) over each group."""
    config, model, _ = load_run_model(run)
    d = config.data
    depth = len(images)
    index = np.clip(np.arange(depth)[:, None] + np.asarray(d.offsets)[None], 0, depth - 1)
    if groups is None:
        groups = [range(depth)] * depth
    rows = []
    for i, group in enumerate(groups):
        group = sorted(set(group))
        scans = preprocess.resize_images(preprocess.normalize(images[group], d.clip_percentiles)[..., None],
                                         tuple(d.image_size), d)[..., 0].numpy()
        rows.append(np.transpose(scans[np.searchsorted(group, index[i])], (1, 2, 0)))
    probabilities = model(np.stack(rows), training=False)
    return preprocess.restore_size(probabilities, images.shape[1:], d).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["synth", "rolled"])
def test_a_volume_sent_whole_gets_training_numbers(answers, runs, volumes, name):
    images = decode(volumes[name])
    want = expected(runs["a"], images)
    volume = answers[f"{name}/volume"]
    assert volume["probabilities"].shape == (*images.shape, 3)
    assert_allclose(volume["probabilities"], want, atol=1e-5, rtol=0)
    # serving_default given every context row of the volume is the same request in another shape
    assert_allclose(answers[f"{name}/rows"]["probabilities"], volume["probabilities"], atol=1e-5, rtol=0)
    masks = np.stack([png_mask(p) for p in answers[f"{name}/volume_png"]["masks_png"]])
    np.testing.assert_array_equal(masks, volume["masks"])


@pytest.mark.slow
def test_slice_by_slice_follows_the_rule(answers, runs, volumes):
    """One slice per request: normalised over its K context slices (exactly), so it differs from the
    whole volume on scans whose slices differ in intensities, and agrees where they do not."""
    offsets = np.asarray(OFFSETS)
    for name in ("synth", "rolled"):
        images = decode(volumes[name])
        alone = np.concatenate([answers[f"{name}/row{i}"]["probabilities"] for i in range(len(images))])
        groups = [np.clip(i + offsets, 0, len(images) - 1) for i in range(len(images))]
        assert_allclose(alone, expected(runs["a"], images, groups), atol=1e-5, rtol=0)
        whole = answers[f"{name}/volume"]["probabilities"]
        if name == "rolled":  # every request holds the volume's intensities: the rule says they agree
            assert_allclose(alone, whole, atol=1e-5, rtol=0)
        else:
            assert np.abs(alone - whole).max() > 1e-3


@pytest.mark.slow
def test_fusion_averages_members_with_their_weights(answers, runs, volumes, fused):
    images = decode(volumes["synth"])
    want = 0.75 * expected(runs["a"], images) + 0.25 * expected(runs["b"], images)
    assert_allclose(answers["fused/volume"]["probabilities"], want, atol=1e-5, rtol=0)
    assert_allclose(answers["fused/rows"]["probabilities"], want, atol=1e-5, rtol=0)
    info = layout.read_info(fused)
    assert [m["weight"] for m in info["members"]] == [0.75, 0.25]
    assert [m["path"].split("/")[-2] for m in info["members"]] == ["run", "run_b"]


BAD_VOLUMES = {
    "mixed sizes": (["good", png(np.zeros((64, 40), np.uint16)), "good"], "same width and height"),
    "empty request": ([], "holds no slices"),
    "8-bit PNG": (["good", png(np.zeros((266, 266), np.uint8))], "not a 16-bit PNG"),
    "not a PNG": (["good", b"GIF89a not a png at all"], "not a PNG file"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_VOLUMES)
def test_bad_volume_requests_are_invalid_arguments(answers, case):
    message = BAD_VOLUMES[case][1]
    assert message in answers[f"bad/{case}"].get("error", "no error")


@pytest.mark.slow
@pytest.mark.parametrize("signature", STRING_SIGNATURES)
def test_a_png_declaring_a_huge_image_is_refused_before_decoding(answers, signature):
    error = answers[f"huge/{signature}"].get("error", "no error")
    assert "outside 1..2048 px" in error and "max_image_size" in error


@pytest.mark.parametrize("member, setting", [("two_classes", "outputs 2 classes"),
                                              ("small", "data.image_size is [32, 32]")])
def test_members_that_cannot_be_fused_are_refused(runs, member, setting, tmp_path, capsys):
    out = tmp_path / "m" / "1"
    assert cli.run(export.main, ["--run", str(runs["a"]), "--run", str(runs[member]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {runs[member]}: " in err and setting in err
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())


def test_weights_must_match_the_members(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        export.main(["--run", str(runs["a"]), "--run", str(runs["b"]), "--weight", "1", "--out", str(tmp_path / "1")])
    assert exit_code.value.code == 2 and "one positive weight per member (2)" in capsys.readouterr().err
    assert not (tmp_path / "1").exists()


@pytest.mark.slow
def test_evaluate_scores_a_fused_model(runs, fused, tmp_path):
    from tfseg import evaluate

    assert evaluate.main(["--run", str(runs["a"]), "--model", str(fused), "--out", str(tmp_path), "--limit", "1",
                          "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == str(fused) and summary["num_volumes"] == 1 and 0 <= summary["score"] <= 1
