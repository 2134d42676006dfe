"""TF Serving client, REST and gRPC, end to end against a server in a real subprocess.

The server is tfseg.serving_stub, a STAND-IN for tensorflow_model_server (which cannot be installed
here: it is neither on PyPI nor in Debian). It serves the exported SavedModel's signatures through TF
Serving's gRPC PredictionService and REST predict API, on free ports of 127.0.0.1.
"""

import base64
import json
import re
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from tests import processes
from tests.test_export import saved_model, volume_pngs  # noqa: F401  (session-wide tiny export)
from tfseg import client, layout
from tfseg.data.context import context_rows
from tfseg.errors import DataError
from tfseg.kaggle import index
from tfseg.labels import label_map, one_hot
from tfseg.serving import client as client_lib
from tfseg.serving.client import (
    facts_from_signatures,
    model_offsets,
    png_mask,
    read_mask_image,
    scan_files,
)

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"gRPC (\S+), REST http://(\S+) ")


@pytest.fixture(scope="module")
def server(saved_model, tmp_path_factory):  # noqa: F811
    """{"grpc": host:port, "rest": host:port} of a serving_stub subprocess serving the tiny export."""
    log = tmp_path_factory.mktemp("stub") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tfseg.serving_stub", "--model_name", "tfseg",
                                 "--model_base_path", str(saved_model.parent), "--port", "0", "--rest_api_port", "0"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline, line = time.monotonic() + 180, ""
        while not READY.search(line):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serving_stub did not start:\n{log.read_text()[-3000:]}")
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        grpc_url, rest_url = READY.search(line).groups()
        yield {"grpc": grpc_url, "rest": rest_url}
    finally:
        processes.stop(proc)


@pytest.fixture(scope="module")
def scan_dir(synth_dir, tmp_path_factory):
    """Four consecutive slices of one synthetic volume, as files."""
    table = index.read_index(synth_dir)
    out = tmp_path_factory.mktemp("scans")
    for path in table["path"].iloc[10:14]:
        shutil.copy(path, out)
    return out


def read_mask(path: Path) -> np.ndarray:
    """A written mask file (CLASS_COLORS, overlaps resolved) -> 0/1 masks [H, W, 3]."""
    return read_mask_image(path)


def shown(mask: np.ndarray) -> np.ndarray:
    """What a mask file keeps of a mask: one organ per pixel (tfseg.labels' overlap rule)."""
    return one_hot(label_map(mask))


def test_context_rows_clamp_at_the_ends():
    assert context_rows(list("abcd"), (-2, 0, 2)) == [
        ["a", "a", "c"], ["a", "b", "d"], ["a", "c", "d"], ["b", "d", "d"]]
    assert context_rows(["x"], (-1, 0, 1)) == [["x", "x", "x"]]


def test_scan_files_expand_folders_in_order(scan_dir, tmp_path):
    names = sorted(p.name for p in scan_dir.iterdir())
    assert [p.name for p in scan_files([str(scan_dir)])] == names
    with pytest.raises(FileNotFoundError, match="no such scan"):
        scan_files([str(tmp_path / "missing.png")])


@pytest.mark.slow
def test_grpc_and_rest_write_the_served_masks(server, saved_model, scan_dir, tmp_path, capsys):  # noqa: F811
    files = sorted(scan_dir.iterdir())
    assert client.main(["grpc", "--url", server["grpc"], "--out", str(tmp_path / "grpc"), str(scan_dir)]) == 0
    assert client.main(["rest", "--url", server["rest"], "--out", str(tmp_path / "rest"),
                        *map(str, files)]) == 0
    # context rows need the offsets: TF Serving's metadata has K, the export's tfseg.json the offsets
    assert client.main(["rest", "--url", server["rest"], "--out", str(tmp_path / "rows"), "--batch-size", "2",
                        "--model", str(saved_model), str(scan_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" -> ") == 3 * len(files)
    # what the SavedModel itself answers: the slices sent as one volume (the default), or as context
    # rows two at a time (--batch-size 2, each request normalised over its own slices)
    signatures = tf.saved_model.load(str(saved_model)).signatures
    pngs = [p.read_bytes() for p in files]
    expected = signatures["serving_volume"](slices=tf.constant(pngs))["masks_png"].numpy()
    rows = context_rows(pngs, (-2, 0, 2))
    in_pairs = np.concatenate([signatures["serving_default"](slices=tf.constant(rows[i:i + 2]))["masks"].numpy()
                               for i in range(0, len(rows), 2)])
    assert in_pairs.sum() > 0
    for path, answer, pair_mask in zip(files, expected, in_pairs, strict=True):
        name = f"{path.stem}_mask.png"
        np.testing.assert_array_equal(read_mask(tmp_path / "grpc" / name), shown(png_mask(answer)))
        assert (tmp_path / "rest" / name).read_bytes() == (tmp_path / "grpc" / name).read_bytes()
        np.testing.assert_array_equal(read_mask(tmp_path / "rows" / name), shown(pair_mask))


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_rest_columnar_form_other_signature_and_status(server, synth_dir):
    base = f"http://{server['rest']}/v1/models/tfseg"
    with urllib.request.urlopen(base, timeout=30) as response:
        assert json.load(response)["model_version_status"][0]["state"] == "AVAILABLE"
    _, pngs = volume_pngs(synth_dir)
    b64 = [{"b64": base64.b64encode(p).decode()} for p in pngs[:3]]
    status, answer = post(f"{base}:predict", {"inputs": {"slices": [b64]}})
    assert status == 200 and np.asarray(answer["outputs"]["masks"]).shape == (1, 266, 266, 3)
    status, answer = post(f"{base}/versions/1:predict",
                          {"signature_name": "predict_float", "instances": np.zeros((2, 64, 64, 3)).tolist()})
    assert status == 200 and np.asarray(answer["predictions"]).shape == (2, 64, 64, 3)
    status, answer = post(f"{base}/versions/7:predict", {"inputs": {"slices": [b64]}})
    assert status == 404 and "version 7" in answer["error"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_rejections_are_reported(server, protocol, tmp_path, capsys):
    eight_bit = tmp_path / "eight_bit.png"
    cv2.imwrite(str(eight_bit), np.zeros((32, 32), np.uint8))
    assert client.main([protocol, "--url", server[protocol], "--out", str(tmp_path), str(eight_bit)]) == 1
    err = capsys.readouterr().err
    assert ("INVALID_ARGUMENT" if protocol == "grpc" else "HTTP 400") in err and "not a 16-bit PNG" in err
    assert client.main([protocol, "--url", server[protocol], "--model-name", "other", str(eight_bit)]) == 1
    assert ("NOT_FOUND" if protocol == "grpc" else "HTTP 404") in capsys.readouterr().err
    assert not list(tmp_path.glob("*_mask.png"))


@pytest.mark.slow
def test_masks_png_signature_gives_the_masks_of_serving_default(server, saved_model, synth_dir):  # noqa: F811
    """Slice by slice the same masks, as PNGs; over REST a fraction of serving_default's JSON."""
    _, pngs = volume_pngs(synth_dir)
    rows = context_rows(pngs, (-2, 0, 2))
    signatures = tf.saved_model.load(str(saved_model)).signatures
    masks = signatures["serving_default"](slices=tf.constant(rows))["masks"].numpy()
    encoded = signatures["masks_png"](slices=tf.constant(rows))["masks_png"].numpy()
    assert len(encoded) == len(rows)
    for png, mask in zip(encoded, masks, strict=True):
        np.testing.assert_array_equal(png_mask(png), mask)
    base = f"http://{server['rest']}/v1/models/tfseg:predict"
    instances = [{"slices": [{"b64": base64.b64encode(p).decode()} for p in row]} for row in rows]
    sizes = {}
    for name in ("masks_png", "serving_default"):
        body = json.dumps({"signature_name": name, "instances": instances}).encode()
        request = urllib.request.Request(base, data=body)
        with urllib.request.urlopen(request, timeout=300) as response:
            sizes[name] = len(response.read())
    assert sizes["masks_png"] * 10 < sizes["serving_default"]


def saved_model_cli_signatures(export_dir: Path) -> dict:
    """{signature: {"inputs"|"outputs": {key: (dtype, shape)}}} as `saved_model_cli show --all` prints them."""
    cli_path = Path(sys.executable).parent / "saved_model_cli"
    done = subprocess.run([str(cli_path), "show", "--dir", str(export_dir), "--all"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out, signature, side = {}, None, None
    for line in done.stdout.splitlines():
        if m := re.match(r"signature_def\['(\w+)'\]:", line):
            signature = m.group(1)
            out[signature] = {"inputs": {}, "outputs": {}}
        elif m := re.match(r"\s+(inputs|outputs)\['(\w+)'\] tensor_info:", line):
            side, key = m.groups()
        elif signature and side and (m := re.match(r"\s+dtype: (\w+)", line)):
            out[signature][side][key] = [m.group(1)]
        elif signature and side and (m := re.match(r"\s+shape: (?:\(([^)]*)\)|unknown_rank)", line)):
            dims = (m.group(1) or "").replace(" ", "").split(",")
            out[signature][side][key].append(tuple(int(d) for d in dims if d))
    return out


def metadata_signatures(signature_defs: dict) -> dict:
    """The same table from a metadata answer's signature_def map (TF Serving's JSON field names)."""
    out = {}
    for name, sig in signature_defs.items():
        out[name] = {side: {key: [info.get("dtype", "DT_INVALID"),
                                  tuple(int(d["size"]) for d in info.get("tensor_shape", {}).get("dim", []))]
                            for key, info in sig.get(side, {}).items()} for side in ("inputs", "outputs")}
    return out


@pytest.mark.slow
def test_metadata_over_rest_and_grpc_matches_saved_model_cli(server, saved_model):  # noqa: F811
    import grpc
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, prediction_service_pb2_grpc

    expected = saved_model_cli_signatures(saved_model)
    assert {"serving_default", "masks_png", "predict_float"} <= set(expected)
    for path in ("", "/versions/1"):
        with urllib.request.urlopen(f"http://{server['rest']}/v1/models/tfseg{path}/metadata", timeout=60) as response:
            answer = json.load(response)
        assert answer["model_spec"] == {"name": "tfseg", "signature_name": "", "version": "1"}
        signature_defs = answer["metadata"]["signature_def"]["signature_def"]
        assert metadata_signatures(signature_defs) == expected
        assert signature_defs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="tfseg"),
                                                             metadata_field=["signature_def"])
    with grpc.insecure_channel(server["grpc"]) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=60)
        bad = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="tfseg"),
                                                             metadata_field=["labels"])
        with pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(bad, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert response.model_spec.version.value == 1
    defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(defs)
    as_json = json_format.MessageToDict(defs, preserving_proto_field_name=True)["signature_def"]
    assert metadata_signatures(as_json) == expected
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{server['rest']}/v1/models/other/metadata", timeout=60)
    assert missing.value.code == 404


FACTS = {"k": 3, "input_size": [64, 64], "offsets": [-2, 0, 2]}
UNKNOWN = {**FACTS, "offsets": None}  # what TF Serving's metadata tells


@pytest.mark.parametrize(("facts", "offsets", "batch_size", "expected"), [
    (FACTS, None, 0, [-2, 0, 2]),
    (FACTS, [-2, 0, 2], 2, [-2, 0, 2]),
    (FACTS, [-1, 0, 1], 0, "--offsets -1,0,1, but model.+trained with offsets -2,0,2"),
    (FACTS, [-1, 1], 2, "2 slices per row, but model takes K = 3 \\(offsets -2,0,2\\)"),
    (UNKNOWN, None, 0, None),
    (UNKNOWN, [-1, 0, 1], 2, [-1, 0, 1]),
    (UNKNOWN, [0], 0, "1 slices per row, but model takes K = 3;"),
    (UNKNOWN, None, 2, "gives K = 3, not the offsets"),
])
def test_model_offsets_agree_or_name_both(facts, offsets, batch_size, expected):
    if isinstance(expected, str):
        with pytest.raises(DataError, match=expected):
            model_offsets(facts, offsets, "model", batch_size)
    else:
        assert model_offsets(facts, offsets, "model", batch_size) == expected


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_uses_the_model_facts_and_refuses_others(server, saved_model, scan_dir, protocol,  # noqa: F811
                                                        tmp_path, capsys):
    url = server[protocol]
    signature_defs = client_lib.metadata_signatures(protocol, url, "tfseg", 60)
    info = layout.read_info(saved_model)
    assert facts_from_signatures(signature_defs) == {"k": len(info["offsets"]), "input_size": info["input_size"],
                                                     "offsets": None}
    assert client.main([protocol, "--url", url, "--model", str(saved_model.parent), "--batch-size", "2",
                        "--out", str(tmp_path / "ok"), str(scan_dir)]) == 0
    assert "model: K = 3 slices per context row (offsets -2,0,2), model size 64 x 64" in capsys.readouterr().out
    for extra, named in [(["--model", str(saved_model), "--offsets=-1,0,1"], ["-1,0,1", "-2,0,2"]),
                         (["--offsets=-1,1"], ["-1,1", "K = 3"]),
                         (["--batch-size", "2"], ["K = 3", "--model"])]:
        assert client.main([protocol, "--url", url, "--out", str(tmp_path / "no"), *extra, str(scan_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and all(n in err[0] for n in named), err
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_wrong_slice_count_gets_one_sentence(server, synth_dir):
    """A row of 4 slices to a K = 3 model: INVALID_ARGUMENT (HTTP 400) and one sentence, over REST and gRPC."""
    import grpc
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    _, pngs = volume_pngs(synth_dir)
    b64 = [{"b64": base64.b64encode(p).decode()} for p in pngs[:4]]
    status, answer = post(f"http://{server['rest']}/v1/models/tfseg:predict", {"instances": [{"slices": b64}]})
    expected = ("each row of slices must hold K = 3 PNGs, the slices at offsets -2,0,2 the model was trained with "
                "(read them from its metadata); the rows of this request hold 4")
    assert status == 400 and answer["error"] == expected
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="tfseg"))
    request.inputs["slices"].CopyFrom(tf.make_tensor_proto([pngs[:4]], dtype=tf.string))
    with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as err:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == expected
