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
from tfseg import client
from tfseg.data.context import context_rows
from tfseg.kaggle import index
from tfseg.serving.client import scan_files

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
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]  # BGR -> channels in CLASSES order
    assert set(np.unique(image)) <= {0, 255}
    return image // 255


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
    printed = capsys.readouterr().out
    assert printed.count(" -> ") == 2 * len(files)
    # what the SavedModel itself answers for the same request
    rows = context_rows([p.read_bytes() for p in files], (-2, 0, 2))
    expected = tf.saved_model.load(str(saved_model)).signatures["serving_default"](slices=tf.constant(rows))
    expected = expected["masks"].numpy()
    assert expected.sum() > 0
    for path, mask in zip(files, expected, strict=True):
        name = f"{path.stem}_mask.png"
        np.testing.assert_array_equal(read_mask(tmp_path / "grpc" / name), mask)
        assert (tmp_path / "rest" / name).read_bytes() == (tmp_path / "grpc" / name).read_bytes()


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
