"""Strategies: the auto rules, 2 mirrored CPU replicas == 1 replica (and augmenting on the device == on
the host), and 2 real multiworker processes == 1 process, through a lost worker and a resume.

Multi-device tests run in subprocesses: logical devices and multiworker collectives can only be set
up before TensorFlow initialises, which the pytest process has long done. The model uses group norm
here: batch norm statistics are per replica by design (each replica normalises its own half batch),
so only a batch-independent norm makes 2 replicas compute exactly what 1 replica does.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tfseg.errors import ConfigError
from tfseg.training import strategy

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

MIRRORED = """
import json, sys
import keras
import numpy as np
import tensorflow as tf
from tfseg.data.pipeline import train_dataset
from tfseg.model.build import build_loss, build_model
from tfseg.training import strategy
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps
from tfseg.config import load_config

strategy.split_cpu(2)  # before anything initialises TensorFlow
one, two = strategy.make_strategy("default"), strategy.make_strategy("mirrored", cpu_replicas=2)
out = {}
for variant, overrides in json.loads(sys.argv[4]).items():
    config = load_config(sys.argv[1], [f"data.records={sys.argv[2]}", "data.batch_size=4", *overrides])
    x, y = (t.numpy() for t in next(iter(train_dataset(config, [1]))))
    init, out[variant] = None, {}
    for name, s in (("one", one), ("two", two)):
        with s.scope():
            model = build_model(config)
            init = model.get_weights() if init is None else init
            model.set_weights(init)
            optimizer = make_optimizer(config.train, 10, "float32")
            optimizer.build(model.trainable_variables)
            steps = Steps(s, model, optimizer, build_loss(config), 4, config)
        batches = iter(s.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)).repeat()))
        losses = [float(steps.train_step(batches)) for _ in range(2)]
        weights = [w.tolist() for w in model.get_weights()]  # after two steps
        losses += [float(steps.train_step(batches)) for _ in range(2)]
        out[variant][name] = {"replicas": s.num_replicas_in_sync, "losses": losses, "weights": weights}
    out[variant]["init"] = [w.tolist() for w in init]
for device in ("host", "accelerator"):  # augmenting in the pipeline or in the replica step, XLA in both
    config = load_config(sys.argv[1], [
        f"data.records={sys.argv[2]}", "data.batch_size=4", "data.deterministic=true", "train.jit_compile=true",
        "model.depth=2", "model.base_filters=4", "model.block=plain", "augment.enabled=true",
        "augment.grid_distortion=0.03", "augment.dropout_holes=1", f"augment.device={device}"])
    keras.utils.set_random_seed(0)
    # Asked for again, as train() would: another MirroredStrategy instance would reuse the first one's
    # collective keys and fail on this other model ("Shape mismatch in the collective instance").
    mirrored = strategy.make_strategy("mirrored", cpu_replicas=2)
    with mirrored.scope():
        model = build_model(config)
        optimizer = make_optimizer(config.train, 10, "float32")
        optimizer.build(model.trainable_variables)
        steps = Steps(mirrored, model, optimizer, build_loss(config), 4, config)
    batches = iter(mirrored.distribute_datasets_from_function(
        lambda context: train_dataset(config, [1], input_context=context, global_batch_size=4)))
    losses = [float(steps.train_step(batches)) for _ in range(3)]
    out[device] = {"losses": losses, "weights": [w.tolist() for w in model.get_weights()], "jit": steps.jit_compile,
                   "same_strategy": mirrored is two}
print("RESULT " + json.dumps(out))
"""

SUMMING = """
import json
from tfseg.training import strategy
from tfseg.training.steps import replica_sgd_update

strategy.split_cpu(2)
print("RESULT " + json.dumps(replica_sgd_update(strategy.make_strategy("mirrored", cpu_replicas=2))))
"""

# The two workers train what one process can reproduce: deterministic input pipelines (every seed from
# the config), and group norm with global batch Dice, which are exact across replica counts (VARIANTS).
MULTIWORKER = ["model.norm=group", "loss.batch_dice=true", "data.deterministic=true", "train.epochs=3",
               "train.steps_per_epoch=3"]

WORKER = """
import json, sys
import numpy as np
from tfseg.config import load_config
from tfseg.training.loop import TrainingStopped
from tfseg.training.trainer import train

config = load_config(sys.argv[1], [f"data.records={sys.argv[2]}", "train.strategy=multiworker",
                                   "train.image_log_every=1", *json.loads(sys.argv[3])])
try:
    result = train(config, sys.argv[4], progress=False)
except TrainingStopped as err:  # as python -m tfseg.train reports it
    sys.exit(f"error: {err}")
np.savez(sys.argv[5], *result.model.get_weights())
"""

# What the two workers compute, in one process without any strategy: worker i's replica takes the batches
# of input pipeline i of 2, so the global batch is both pipelines' batches side by side. Resumed workers
# rebuild their pipelines, so the batches start over after epoch argv[4] (the epochs they resumed after).
ONE_PROCESS = """
import json, sys
import keras
import numpy as np
import tensorflow as tf
from tfseg.config import load_config
from tfseg.data.pipeline import train_dataset
from tfseg.model.build import build_loss, build_model
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps
from tfseg.training.trainer import train_folds

config = load_config(sys.argv[1], [f"data.records={sys.argv[2]}", "train.strategy=default", *json.loads(sys.argv[3])])
resumed_after, steps_per_epoch, batch = int(sys.argv[4]), config.train.steps_per_epoch, config.data.batch_size
keras.utils.set_random_seed(config.data.seed)  # as train() does before it builds the model
model = build_model(config)
init = model.get_weights()
optimizer = make_optimizer(config.train, steps_per_epoch, "float32")
optimizer.build(model.trainable_variables)
steps = Steps(tf.distribute.get_strategy(), model, optimizer, build_loss(config), batch, config)

def global_batches():
    pipelines = [train_dataset(config, train_folds(config), input_context=tf.distribute.InputContext(2, i, 2),
                               global_batch_size=batch) for i in range(2)]
    return iter(tf.data.Dataset.zip(*pipelines).map(lambda a, b: (tf.concat([a[0], b[0]], 0),
                                                                  tf.concat([a[1], b[1]], 0))))

losses = []
for epoch in range(config.train.epochs):
    if epoch in (0, resumed_after):
        batches = global_batches()
    losses.append(sum(float(steps.train_step(batches)) for _ in range(steps_per_epoch)) / steps_per_epoch)
np.savez(sys.argv[5], *init)
np.savez(sys.argv[6], *model.get_weights())
print("RESULT " + json.dumps(losses))
"""

# A worker that stops answering is declared dead after strategy.HEARTBEAT_TIMEOUT_S (10 s) without
# heartbeats; the survivor then stops 11-18 s after the freeze here. The bound leaves room for a loaded machine.
LOST_WORKER_BOUND_S = 60


def run_python(code: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_auto_rules(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    assert strategy.resolve_name("auto") == "default"  # this machine: no GPU, no TPU
    assert strategy.resolve_name("auto", cpu_replicas=2) == "mirrored"
    assert strategy.resolve_name("auto", tpu="my-tpu") == "tpu"
    monkeypatch.setenv("TPU_NAME", "env-tpu")
    assert strategy.resolve_name("auto") == "tpu"
    assert strategy.resolve_name("mirrored") == "mirrored"
    assert strategy.resolve_precision("auto", "tpu") == "mixed_bfloat16"
    cpu = "mixed_bfloat16" if strategy.cpu_supports_bf16() else "float32"
    assert strategy.resolve_precision("auto", "cpu") == cpu
    assert strategy.resolve_precision("float32", "tpu") == "float32"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert strategy.resolve_precision("auto", "cpu") == "float32"


def test_bad_tf_config_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        strategy.make_strategy("multiworker")


def same_losses(result: dict, rtol: float) -> bool:
    """One device and two replicas: the same loss at each of the four steps, each computed with the
    weights the previous updates left (so equal losses mean equal updates)."""
    one, two = result["one"], result["two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["losses"][1] != one["losses"][0]  # the weights did move
    return np.allclose(two["losses"], one["losses"], rtol=rtol, atol=0)


def same_weights(result: dict) -> bool:
    """After two Adam steps the two runs' weights differ by under 0.1% of how far the steps moved them
    (as a norm over all weights). Per weight no tight bound holds: float32 sums in another order change
    a gradient by ~1e-7 relative, and Adam turns the noise of a near-zero gradient into a full step."""
    one = result["one"]["weights"]
    return distance(one, result["two"]["weights"]) < 1e-3 * distance(one, result["init"])


def distance(weights, others) -> float:
    """The norm over all weights of the difference of two weight lists (nested lists or arrays)."""
    return float(np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                             for a, b in zip(weights, others, strict=True))))


# variant -> (config overrides, loss tolerance, whether 2 replicas must take the steps 1 device takes at
# the same global batch, whether to compare weights too). Group norm agrees to 1e-7 in the losses;
# synchronised batch norm to ~1e-5 (its variance is E[x^2] - E[x]^2 in float32, summed in another
# order, and Adam grows the difference over the steps), so 5e-4; plain batch norm differs by 5e-3 or more.
VARIANTS = {
    "group norm, per-slice Dice": (["model.norm=group", "loss.batch_dice=false"], 1e-5, True, True),
    "group norm, batch Dice": (["model.norm=group", "loss.batch_dice=true"], 1e-5, True, True),  # all-reduced sums
    "sync batch norm, batch Dice": (["model.norm=sync_batch", "loss.batch_dice=true"], 5e-4, True, False),
    "batch norm, batch Dice": (["model.norm=batch", "loss.batch_dice=true"], 5e-4, False, False),  # per replica
}


@pytest.fixture(scope="module")
def mirrored(records_dir):
    """The MIRRORED script's results: one process (splitting the CPU, starting TensorFlow) for both tests."""
    variants = {name: overrides for name, (overrides, _, _, _) in VARIANTS.items()}
    proc = run_python(MIRRORED, SMOKE, records_dir, "-", json.dumps(variants))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_two_mirrored_replicas_match_one(mirrored):
    """Same initial weights, same global batch of 4: two replicas of 2 take the step one device takes
    (gradients averaged over the global batch and clipped by the full gradient's norm), with batch
    Dice over the global batch and with synchronised batch norm; plain batch norm does not (each
    replica normalises its own 2 slices), which shows the comparison can fail. Tolerances: see
    same_losses and same_weights; weights only for group norm, since behind batch norm some kernel
    gradients are nearly zero and Adam turns their float noise into lr-sized steps. (train() itself
    runs under 2 mirrored replicas in test_shipped_configs.)"""
    for name, (_, rtol, equal, weights) in VARIANTS.items():
        assert mirrored[name]["two"]["replicas"] == 2
        assert same_losses(mirrored[name], rtol) == equal, name
        if weights:
            assert same_weights(mirrored[name]), name


@pytest.mark.slow
def test_accelerator_augmentation_trains_like_host_augmentation(mirrored):
    """augment.device: accelerator, same seed and stream, XLA in both: augmenting inside the replica step
    (2 replicas) gives the losses and weights that augmenting in the input pipeline gives. Both run the
    same warp on the same inputs, so only float rounding may differ: losses to 1e-5, weights to 1e-5 of
    their norm (XLA against TensorFlow's kernels would differ by ~1e-3 of the norm: Adam turns rounding
    noise in near-zero gradients into learning-rate-sized steps, so both sides compile). A missing or
    different augmentation changes the losses by percents."""
    host, device = mirrored["host"], mirrored["accelerator"]
    assert host["jit"] is True and device["jit"] is True
    assert host["same_strategy"] and device["same_strategy"]  # one MirroredStrategy per process: see MIRRORED
    np.testing.assert_allclose(device["losses"], host["losses"], rtol=1e-5)
    norm = distance(host["weights"], [0] * len(host["weights"]))  # the weights' own norm
    assert distance(host["weights"], device["weights"]) <= 1e-5 * norm


@pytest.mark.slow
def test_keras_optimizer_sums_replica_gradients():
    """The training step all-reduces the gradients itself (so clipping sees the full gradient) and divides
    by the replica count before optimizer.apply, because Keras' TF optimizer sums them again across
    replicas. If a Keras upgrade changed that (mean, or no aggregation), updates would silently shrink
    or grow: here replica gradients 1 and 2 under SGD(1.0) must move the weight by -(1 + 2)."""
    proc = run_python(SUMMING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT ", 1)[1]) == -3.0


def test_auto_norm_synchronises_small_replica_batches():
    from tfseg.model.build import resolve_norm

    assert resolve_norm("auto", 16, 1) == "batch"
    assert resolve_norm("auto", 16, 2) == "sync_batch"  # 8 slices per replica
    assert resolve_norm("auto", 64, 2) == "batch"
    assert resolve_norm("group", 4, 8) == "group"


def start_workers(folder: Path, *args) -> tuple[list[subprocess.Popen], list[str]]:
    """Two workers of a new cluster on free ports of 127.0.0.1 running WORKER with `args`; their output goes
    to folder/worker{i}.log (a file: nobody reads a pipe while the test waits), their temp files to
    folder/tmp{i}, their final weights to folder/w{i}.npz."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for index in range(2):
        tmp = folder / f"tmp{index}"
        tmp.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp),
               "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})}
        with open(folder / f"worker{index}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args), folder / f"w{index}.npz"],
                                          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs, addresses


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def one_process(records_dir, folder: Path, resumed_after: int) -> subprocess.Popen:
    """ONE_PROCESS in the background; its output goes to folder/one.log, its weights to folder/*.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(folder / "one.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", ONE_PROCESS, SMOKE, records_dir, json.dumps(MULTIWORKER),
                                 str(resumed_after), folder / "init.npz", folder / "one.npz"],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_workers_match_one_process_and_resume_after_losing_one(records_dir, tmp_path):
    """Two real workers on 127.0.0.1. Once the first checkpoint exists, worker 1 is frozen (SIGSTOP: like a
    machine that vanished, no closed connection tells the chief, only the missing heartbeats) and then
    killed: the chief must stop with a message naming worker 1 within LOST_WORKER_BOUND_S, not hang. Both
    are started again, resume from the last checkpoint and finish. The final weights (the same on both
    workers) must equal those of one process that trains on the same global batches, rebuilding its input
    pipelines where the workers resumed: within 0.1% of how far training moved them, as in same_weights
    (the ring all-reduce sums in another order than one device). The per-epoch losses of history.csv, each
    computed with the weights all earlier steps left, must equal the single process's to 2e-5: 1e-5 as
    VARIANTS' group norm, plus history.csv's 6 significant digits."""
    run_dir, one = tmp_path / "run", tmp_path / "one"
    args = (SMOKE, records_dir, json.dumps(MULTIWORKER), run_dir)
    first, addresses = start_workers(tmp_path / "first", *args)
    second, reference = [], None
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "ckpt-1.index").exists():
            assert all(p.poll() is None for p in first) and time.monotonic() < deadline, \
                (tmp_path / "first" / "worker0.log").read_text()[-3000:]
            time.sleep(0.1)
        os.kill(first[1].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        # Worker 1 froze in epoch 2, so the workers will resume after epoch 1: the single process runs now,
        # while the two workers stand still.
        reference = one_process(records_dir, one, 1)
        try:
            first[0].wait(timeout=LOST_WORKER_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the chief still runs {LOST_WORKER_BOUND_S} s after worker 1 stopped answering")
        waited = time.monotonic() - frozen
        kill(first)
        stopped = (tmp_path / "first" / "worker0.log").read_text()
        assert first[0].returncode == 1, stopped[-3000:]
        assert f"error: worker 1 ({addresses[1]}) is gone" in stopped and "Start every worker again" in stopped, \
            stopped[-3000:]
        done = [int(row["epoch"]) for row in history(run_dir)]
        assert 1 <= len(done) < 3, f"{done}: the chief finished before it noticed ({waited:.0f} s)"

        second, _ = start_workers(tmp_path / "second", *args)
        for proc in second:
            proc.wait(timeout=600)
        outputs = [(tmp_path / "second" / f"worker{i}.log").read_text() for i in range(2)]
        assert [p.returncode for p in second] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
        resumed = int(re.search(r"resumed from \S+: (\d+) of 3 epochs done", outputs[0]).group(1))
        assert resumed in (len(done), len(done) - 1)  # -1: stopped between history.csv and the checkpoint
        assert re.findall(r"^epoch (\d)/3: loss", outputs[0], re.MULTILINE) == [str(e) for e in range(resumed + 1, 4)]
        if resumed != 1:  # worker 1 froze late, after epoch 2 had ended on both: train the single process again
            reference.wait()
            reference = one_process(records_dir, one, resumed)
        reference.wait(timeout=600)
    finally:
        kill([*first, *second, *([reference] if reference else [])])
    log = (one / "one.log").read_text()
    assert reference.returncode == 0, log[-3000:]

    rows = history(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # Only the chief wrote the run folder; the other worker's scratch folder is gone.
    assert "strategy multiworker (2 replicas on cpu)" in outputs[0]
    assert "strategy multiworker" not in outputs[1]
    assert (run_dir / "checkpoints" / "ckpt-3.index").exists() and (run_dir / "model.keras").exists()
    assert not any((tmp_path / "second" / "tmp1").iterdir())

    losses = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    np.testing.assert_allclose([row["loss"] for row in rows], losses, rtol=2e-5, atol=0)
    chief, other = (np.load(tmp_path / "second" / f"w{i}.npz") for i in range(2))
    init, final = (np.load(one / f"{name}.npz") for name in ("init", "one"))
    keys = chief.files
    assert len(keys) == len(other.files) == len(final.files) > 0
    for key in keys:
        np.testing.assert_array_equal(chief[key], other[key])
    assert same_weights({"init": [init[k] for k in keys], "one": {"weights": [final[k] for k in keys]},
                         "two": {"weights": [chief[k] for k in keys]}})


@pytest.mark.slow
def test_two_workers_train_a_3d_model(records_dir, tmp_path):
    """model.kind 3d under MultiWorkerMirroredStrategy: two real workers on 127.0.0.1 train a tiny 3D UNet
    on patches through the same custom step, and end with the same weights."""
    from tests.test_model3d import TINY_3D

    overrides = [*TINY_3D, "model.norm=group", "data.deterministic=true", "train.epochs=1", "train.steps_per_epoch=2"]
    run_dir = tmp_path / "run"
    procs, _ = start_workers(tmp_path, SMOKE, records_dir, json.dumps(overrides), run_dir)
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        kill(procs)
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert "strategy multiworker (2 replicas on cpu)" in outputs[0]
    assert np.isfinite([row["loss"] for row in history(run_dir)]).all()
    chief, other = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert len(chief.files) > 0
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], other[key])
