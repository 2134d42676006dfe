"""The configs users run, trained: cpu.yaml, default.yaml and cpu3d.yaml on 1 and on 2 replicas, validated;
the first two exported and asked a serving request; default.yaml also takes a step at its real input size.

Only what makes them cheap is overridden (image size, depth, steps, and for the real size the batch); their
norm, loss, augmentation, XLA and precision settings stay as shipped. Each config trains in a process of its
own, both at once (tracing and compiling, most of the time, use one core each): the CPU must be split into 2
devices before TensorFlow starts, and every MirroredStrategy of a process numbers its collectives from the
same keys (TF 2.21), so a second one training another model fails with "Shape mismatch in the collective
instance".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tfseg.config import load_config, to_dict
from tfseg.data.pipeline import train_dataset
from tfseg.model.build import build_loss, build_model
from tfseg.training import strategy
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps
from tfseg.training.trainer import train_folds

ROOT = Path(__file__).parents[1]
CONFIGS = ["cpu", "default", "cpu3d"]
SMALL = ["data.image_size=[32,32]", "model.depth=3", "train.epochs=1", "train.steps_per_epoch=2",
         "train.image_log_every=0"]
# A 3D config's patch shrinks with the image: 8 slices of 32 x 32, z pooled at the 3 stages left.
SMALL_3D = ["data.patch_size=[8,32,32]", "model.z_pools=3"]
REPLICAS = {2: ["train.strategy=mirrored", "train.cpu_replicas=2"], 1: ["train.strategy=default"]}
# Exported and asked a request: cpu.yaml's 1-replica run (what `make demo` exports) and default.yaml's
# 2-replica one (synchronised batch norm), so both configs, both replica counts and every layer kind;
# not all four runs, as an export costs ~10 s here. cpu3d is trained, not exported (3D export: issue 23).
EXPORTED = {"cpu": 1, "default": 2}

TRAIN = """
import json, sys
from tfseg.config import load_config, to_dict
from tfseg.serving.savedmodel import export
from tfseg.training import strategy
from tfseg.training.trainer import train

strategy.split_cpu(2)  # before anything initialises TensorFlow
config_file, records, out = sys.argv[1:4]
small, replicas, exported = map(json.loads, sys.argv[4:])


runs = {}
for n, overrides in replicas.items():  # the mirrored run first: the default strategy has no collectives
    result = train(load_config(config_file, [f"data.records={records}", *small, *overrides]), f"{out}/run{n}",
                   progress=False)
    runs[n] = {"config": to_dict(result.config), "history": result.history}
    if int(n) == exported:
        runs[n]["exported"] = str(export(f"{out}/run{n}", f"{out}/model{n}/1", verbose=False))
print("RESULT " + json.dumps(runs))
"""


ANSWER = """
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2


def answer(path):
    # What TF Serving does with an export: load it and answer the warm-up request it ships (16-bit scans).
    raw = next(iter(tf.data.TFRecordDataset(path + "/assets.extra/tf_serving_warmup_requests"))).numpy()
    slices = tf.make_ndarray(prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request.inputs["slices"])
    got = tf.saved_model.load(path).signatures["serving_default"](slices=tf.constant(slices))
    probabilities = got["probabilities"].numpy()
    return {"request": list(slices.shape), "png": list(tf.io.decode_png(slices[0, 0], dtype=tf.uint16).shape),
            "masks": got["masks"].shape.as_list(), "dtype": got["masks"].dtype.name,
            "values": sorted(np.unique(got["masks"].numpy()).tolist()),
            "probabilities": [float(probabilities.min()), float(probabilities.max())],
            "tfseg_imported": any(m.split(".")[0] == "tfseg" for m in sys.modules)}


print("RESULT " + json.dumps({name: answer(path) for name, path in json.loads(sys.argv[1]).items()}))
"""


def shipped_config(name: str):
    return load_config(ROOT / "configs" / f"{name}.yaml")


def small(name: str) -> list[str]:
    return SMALL + (SMALL_3D if shipped_config(name).model.kind == "3d" else [])


@pytest.fixture(scope="module")
def shipped(records_dir, tmp_path_factory):
    """{config name: ({replicas: {"config": resolved, "history": rows, and "served" if exported}}, log)}."""
    out = tmp_path_factory.mktemp("shipped")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    served_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # tfseg cannot even be imported there
    procs = {}
    for name in CONFIGS:  # output to files: nobody reads one's pipe while the test waits for the other
        with open(out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", TRAIN, ROOT / "configs" / f"{name}.yaml", records_dir, out / name,
                 *map(json.dumps, (small(name), REPLICAS, EXPORTED.get(name, 0)))],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    runs = {}
    try:
        for name, proc in procs.items():
            proc.wait(timeout=600)
            log = (out / f"{name}.log").read_text()
            assert proc.returncode == 0, log[-3000:]
            result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
            runs[name] = ({int(n): run for n, run in result.items()}, log)
        # A fresh process without tfseg loads each export and answers its request, as TF Serving would.
        exported = {name: runs[name][0][replicas]["exported"] for name, replicas in EXPORTED.items()}
        served = subprocess.run([sys.executable, "-c", ANSWER, json.dumps(exported)], env=served_env, cwd=out,
                                capture_output=True, text=True, timeout=300)
        assert served.returncode == 0, served.stderr[-3000:]
        for name, answer in json.loads(served.stdout.split("RESULT ", 1)[1]).items():
            runs[name][0][EXPORTED[name]]["served"] = answer
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains_and_validates_on_1_and_2_replicas(shipped, name):
    by_replicas, log = shipped[name]
    assert sorted(by_replicas) == [1, 2]
    as_shipped = to_dict(shipped_config(name))
    precision = strategy.resolve_precision(as_shipped["train"]["precision"], "cpu")
    for replicas, run in by_replicas.items():
        assert f"({replicas} replicas on cpu)" in log
        config, (row,) = run["config"], run["history"]
        for section in ("augment", "loss"):
            assert config[section] == as_shipped[section], (name, section)
        assert config["train"]["precision"] == precision
        assert np.isfinite(row["loss"]) and np.isfinite(row["val_loss"]) and 0 <= row["val_dice"] <= 1
        if as_shipped["model"]["presence_head"]:  # cpu and default ship one; a 3D model has none
            assert 0 <= row["val_presence_f1"] <= 1
    norms = {replicas: run["config"]["model"]["norm"] for replicas, run in by_replicas.items()}
    # cpu.yaml says batch, cpu3d.yaml group; default.yaml says auto: synchronised when 2 replicas hold 8 slices each.
    expected = {"cpu": "batch", "cpu3d": "group"}
    assert norms == ({1: expected[name], 2: expected[name]} if name in expected else {1: "batch", 2: "sync_batch"})


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTED)
def test_shipped_config_exports_and_answers_a_serving_request(shipped, name):
    answer = shipped[name][0][EXPORTED[name]]["served"]
    assert not answer["tfseg_imported"]
    height, width, _ = answer["png"]
    assert answer["request"] == [1, len(shipped_config(name).data.offsets)]
    assert answer["masks"] == [1, height, width, 3] and answer["dtype"] == "uint8"  # at the scans' own size
    assert set(answer["values"]) <= {0, 1}
    assert 0 <= answer["probabilities"][0] <= answer["probabilities"][1] <= 1


@pytest.mark.slow
def test_default_config_at_its_real_size_takes_a_step(records_dir):
    """default.yaml as shipped (320 px, its model, norm, loss, augmentation, precision and XLA choice, resolved
    as train() resolves them) takes a step through its real input pipeline and the real step code, with a
    batch of 2 slices instead of 16: a 320 px step of 16 takes ~15 s on 2 cores."""
    config = load_config(ROOT / "configs" / "default.yaml", [f"data.records={records_dir}", "data.batch_size=2"])
    default = strategy.make_strategy("default")
    precision = strategy.resolve_precision(config.train.precision, "cpu")
    config.train.jit_compile = strategy.resolve_jit_compile(config.train.jit_compile, "cpu", precision)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        model = build_model(config)
        optimizer = make_optimizer(config.train, 10, precision)
        optimizer.build(model.trainable_variables)
        steps = Steps(default, model, optimizer, build_loss(config), config.data.batch_size, config)
        batches = iter(default.experimental_distribute_dataset(train_dataset(config, train_folds(config))))
        loss = float(steps.train_step(batches))
    finally:
        keras.config.set_dtype_policy(previous_policy)
    assert model.input_shape == (None, 320, 320, 3)
    assert model.get_layer("enc0_1_conv").compute_dtype == precision.removeprefix("mixed_")
    assert np.isfinite(loss) and int(optimizer.iterations.numpy()) == 1
