"""The real `tensorboard` binary serves a smoke run's scalars and validation images over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests import processes
from tfseg.config import load_config
from tfseg.layout import RunFolder
from tfseg.training.trainer import train

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(records_dir, tmp_path_factory):
    config = load_config(SMOKE, [f"data.records={records_dir}", "train.epochs=2", "train.steps_per_epoch=2",
                                 "train.image_log_every=1"])
    run_dir = tmp_path_factory.mktemp("runs") / "tb"
    return train(config, run_dir, progress=False), run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_run(smoke_run, tmp_path):
    result, run_dir = smoke_run
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    binary = Path(sys.executable).parent / "tensorboard"
    with open(tmp_path / "tensorboard.log", "w") as log:
        proc = subprocess.Popen([str(binary), "--logdir", str(RunFolder(run_dir).logs), "--host", "127.0.0.1",
                                 "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        tags, deadline = {}, time.monotonic() + 120
        while not ({"loss", "learning_rate"} <= set(tags.get("train", {}))
                   and {"dice", "loss"} <= set(tags.get("validation", {}))):
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"scalars never appeared: {tags}"
            time.sleep(0.5)
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError):
                continue
        assert {"dice_large_bowel", "dice_small_bowel", "dice_stomach"} <= set(tags["validation"])
        query = urllib.parse.urlencode({"tag": "loss", "run": "train"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [p[1] for p in points] == [1, 2]  # (wall time, step, value) per epoch
        assert [p[2] for p in points] == pytest.approx([row["loss"] for row in result.history], rel=1e-5)
        images = get_json(f"{base}/data/plugin/images/tags")
        assert "predictions" in images["validation"]
    finally:
        processes.stop(proc)
