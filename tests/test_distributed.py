"""Strategies: the auto rules, 2 mirrored CPU replicas == 1 replica, and 2 real multiworker processes.

Multi-device tests run in subprocesses: logical devices and multiworker collectives can only be set
up before TensorFlow initialises, which the pytest process has long done. The model uses group norm
here: batch norm statistics are per replica by design (each replica normalises its own half batch),
so only a batch-independent norm makes 2 replicas compute exactly what 1 replica does.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfseg.errors import ConfigError
from tfseg.training import strategy

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

MIRRORED = """
import json, sys
import numpy as np
import tensorflow as tf
from tfseg.data.pipeline import train_dataset
from tfseg.model.build import build_loss, build_model
from tfseg.training import strategy
from tfseg.training.optimizer import make_optimizer
from tfseg.training.steps import Steps
from tfseg.training.trainer import train
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
if sys.argv[3] != "-":  # the whole command under mirrored: distributed input pipeline and validation
    config = load_config(sys.argv[1], [f"data.records={sys.argv[2]}", "train.strategy=mirrored",
                                       "train.cpu_replicas=2", "train.epochs=1", "train.steps_per_epoch=2",
                                       "train.image_log_every=0"])
    out["fit"] = train(config, sys.argv[3], progress=False).history[0]
print("RESULT " + json.dumps(out))
"""

SUMMING = """
import json
import keras
import tensorflow as tf
from tfseg.training import strategy

strategy.split_cpu(2)
two = strategy.make_strategy("mirrored", cpu_replicas=2)
with two.scope():
    weight = keras.Variable([0.0])
    sgd = keras.optimizers.SGD(learning_rate=1.0)
    sgd.build([weight])

@tf.function
def step():
    def replica():
        grad = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1, tf.float32)
        sgd.apply([tf.reshape(grad, [1])], [weight])
    two.run(replica)

step()
print("RESULT " + json.dumps(float(weight.numpy()[0])))
"""

WORKER = """
import sys
import numpy as np
from tfseg.training.trainer import train
from tfseg.config import load_config

config = load_config(sys.argv[1], [f"data.records={sys.argv[2]}", "train.strategy=multiworker", "model.norm=group",
                                   "train.epochs=2", "train.steps_per_epoch=3", "train.image_log_every=1"])
result = train(config, sys.argv[3], progress=False)
np.savez(sys.argv[4], *result.model.get_weights())
"""


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
    init = [np.array(w) for w in result["init"]]
    one, two = ([np.array(w) for w in result[k]["weights"]] for k in ("one", "two"))
    moved = np.sqrt(sum(np.sum((a - w0) ** 2) for a, w0 in zip(one, init, strict=True)))
    apart = np.sqrt(sum(np.sum((b - a) ** 2) for a, b in zip(one, two, strict=True)))
    return apart < 1e-3 * moved


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


@pytest.mark.slow
def test_two_mirrored_replicas_match_one(records_dir, tmp_path):
    """Same initial weights, same global batch of 4: two replicas of 2 take the step one device takes
    (gradients averaged over the global batch and clipped by the full gradient's norm), with batch
    Dice over the global batch and with synchronised batch norm; plain batch norm does not (each
    replica normalises its own 2 slices), which shows the comparison can fail. Tolerances: see
    same_losses and same_weights; weights only for group norm, since behind batch norm some kernel
    gradients are nearly zero and Adam turns their float noise into lr-sized steps."""
    variants = {name: overrides for name, (overrides, _, _, _) in VARIANTS.items()}
    proc = run_python(MIRRORED, SMOKE, records_dir, tmp_path / "run", json.dumps(variants))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, (_, rtol, equal, weights) in VARIANTS.items():
        assert same_losses(out[name], rtol) == equal, name
        if weights:
            assert same_weights(out[name]), name
    assert np.isfinite(out["fit"]["loss"]) and 0 <= out["fit"]["val_dice"] <= 1
    assert "2 replicas" in proc.stdout


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


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(records_dir, tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run_dir = tmp_path / "run"
    procs = []
    for index in range(2):
        tmp = tmp_path / f"tmp{index}"
        tmp.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(SMOKE), str(records_dir), str(run_dir), str(tmp_path / f"w{index}.npz")],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:  # a worker died and left the other waiting in a collective
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    chief, other = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert len(chief.files) == len(other.files) > 0
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], other[key])
    # Only the chief wrote the run folder; the other worker's scratch folder is gone.
    assert "strategy multiworker (2 replicas on cpu)" in outputs[0]
    assert "strategy multiworker" not in outputs[1]
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history] == ["epoch", "1", "2"]
    assert (run_dir / "checkpoints" / "ckpt-2.index").exists() and (run_dir / "model.keras").exists()
    assert not any((tmp_path / "tmp1").iterdir())
