"""Pick the tf.distribute strategy and the mixed-precision policy for a run (one GPU, many, TPU, CPU).

The same command runs everywhere; only `train.strategy` / `train.precision` change. Strategies:
default (no distribution), one_device, mirrored (all local GPUs, or N logical CPU devices with
`train.cpu_replicas`), multiworker (MultiWorkerMirroredStrategy from TF_CONFIG), tpu
(TPUClusterResolver) and auto (TPU if one is named, else mirrored over >1 GPU, else default).
"""

import functools
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from tfseg.errors import ConfigError

# CPU flags of native bfloat16 arithmetic (x86 avx512_bf16 / amx_bf16, ARM "bf16"). Only with these is
# mixed_bfloat16 the CPU default: without them bf16 training falls back to slow kernels (README,
# benchmarks); float16 is emulated on every CPU and never the default there.
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def split_cpu(replicas: int) -> None:
    """Split the CPU into `replicas` logical devices (for mirrored tests); before TF touches devices."""
    if replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError as err:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != replicas:
            raise ConfigError(f"train.cpu_replicas: cannot split the CPU into {replicas} devices: TensorFlow "
                              f"is already initialised with {existing} ({err})") from None


def tpu_name(name: str | None) -> str | None:
    """The TPU to use: `train.tpu` / --tpu, else the TPU_NAME environment variable (Cloud TPU VMs)."""
    return name or os.environ.get("TPU_NAME") or None


def resolve_name(name: str, tpu: str | None = None, cpu_replicas: int = 0) -> str:
    """`auto` -> tpu if one is named, else mirrored over >1 GPU (or CPU replicas), else default."""
    if name != "auto":
        return name
    if tpu_name(tpu):
        return "tpu"
    if len(tf.config.list_physical_devices("GPU")) > 1 or cpu_replicas > 1:
        return "mirrored"
    return "default"


def make_strategy(name: str, tpu: str | None = None, cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Create the strategy called `name` (see module docstring); errors are ConfigErrors naming the key."""
    name = resolve_name(name, tpu, cpu_replicas)
    # Nothing may initialise TensorFlow's devices before this point: logical CPU devices and
    # multiworker collectives can only be configured at start-up.
    split_cpu(cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        # cpu_replicas asks for CPU devices explicitly; otherwise every local GPU (or the CPU if none).
        devices = tuple(d.name for d in tf.config.list_logical_devices("CPU")) if cpu_replicas > 1 else None
        return _mirrored(devices)
    if name == "multiworker":
        if "TF_CONFIG" in os.environ:
            _check_tf_config(os.environ["TF_CONFIG"])
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return _tpu_strategy(tpu_name(tpu))
    raise ConfigError(f"train.strategy: unknown strategy {name!r}")


@functools.cache
def _mirrored(devices: tuple[str, ...] | None) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per device list and process: every instance numbers its collectives from the
    same keys (TF 2.21), so a second instance training another model fails ("Shape mismatch in the
    collective instance")."""
    return tf.distribute.MirroredStrategy(list(devices) if devices else None)


def _check_tf_config(text: str) -> None:
    try:
        spec = json.loads(text)
        spec["cluster"]["worker"], spec["task"]["type"], spec["task"]["index"]  # noqa: B018
    except (ValueError, KeyError, TypeError):
        raise ConfigError("train.strategy: multiworker: the TF_CONFIG environment variable must be JSON like "
                          '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}, '
                          f"got {text[:200]!r}") from None


def _tpu_strategy(name: str | None) -> tf.distribute.Strategy:
    if not name:
        raise ConfigError("train.strategy: tpu needs a TPU: pass --tpu NAME (or 'local' on a TPU VM) or set "
                          "TPU_NAME")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as err:  # the resolver raises ValueError, NotFoundError, URLError... by setup
        message = str(err).splitlines()[0][:200]
        raise ConfigError(f"train.tpu: no TPU {name!r} found ({type(err).__name__}: {message}); run on a "
                          "TPU VM or pick another --strategy") from None
    return tf.distribute.TPUStrategy(resolver)


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """'tpu', 'gpu' or 'cpu': where the replicas of `strategy` compute."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy places ops on the first GPU if there is one
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    return "gpu" if any("GPU" in d.upper().rsplit("/", 1)[-1] for d in devices) else "cpu"


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (see CPU_BF16_FLAGS)."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0" or platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & CPU_BF16_FLAGS)


def resolve_precision(precision: str, kind: str, model_kind: str = "2.5d") -> str:
    """`auto` -> mixed_float16 on GPUs of compute capability >= 7 (tensor cores), mixed_bfloat16 on TPUs
    and on CPUs with native bf16 instructions, else float32. Explicit choices are kept.

    3D models on the CPU train in float32: TensorFlow 2.21's CPU (oneDNN) bfloat16 Conv3DBackpropFilter
    returns non-finite kernel gradients for inputs 2 voxels deep (measured: [2, 2, 8, 8, 32] with a 3x3x3
    kernel), which a 3D UNet's deepest stages are; auto picks float32 and mixed_bfloat16 is refused."""
    if model_kind == "3d" and kind == "cpu":
        if precision == "mixed_bfloat16":
            raise ConfigError("train.precision: mixed_bfloat16 3D convolutions on the CPU give non-finite gradients "
                              "(TensorFlow's oneDNN Conv3DBackpropFilter); use float32 or auto")
        if precision == "auto":
            return "float32"
    if precision != "auto":
        return precision
    if kind == "tpu":
        return "mixed_bfloat16"
    if kind == "gpu":
        gpus = tf.config.list_physical_devices("GPU")
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_float16" if tuple(capability) >= (7, 0) else "float32"
    return "mixed_bfloat16" if cpu_supports_bf16() else "float32"


# How a lost worker shows under multiworker. MultiWorkerMirroredStrategy (TF 2.21) starts TensorFlow's
# coordination service on the chief (worker 0 without a chief job); every worker sends it heartbeats, and
# one silent for HEARTBEAT_TIMEOUT_S (the service's default) is declared dead: the service aborts every
# worker's collectives with UnavailableError, or DeadlineExceededError when the chief itself went silent.
# A killed process on a live machine is noticed at once: its peers' connections are reset (Unavailable).
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)
HEARTBEAT_TIMEOUT_S = 10
_TASK = re.compile(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)")


def lost_worker(strategy: tf.distribute.Strategy, err: Exception) -> str | None:
    """Under multiworker, what a collective's UnavailableError / DeadlineExceededError says: which worker
    is gone and why, e.g. "worker 1 (10.0.0.2:12345) is gone (...)"; None for any other error or strategy."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or not isinstance(err, LOST_WORKER_ERRORS):
        return None
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec()
    tasks = {(job, int(task)) for job, task in _TASK.findall(err.message)} - {(resolver.task_type, resolver.task_id)}
    if not tasks and "CoordinationService" in err.message:  # our heartbeats to the chief's service time out
        tasks = {("chief", 0) if "chief" in spec.jobs else ("worker", 0)}
    names = ", ".join(f"{job} {task} ({spec.task_address(job, task)})" for job, task in sorted(tasks))
    detail = err.message.split("aborted by:", 1)[-1].strip().splitlines()[0]
    return (f"{names or 'another worker'} is gone: it died, or sent no heartbeat to the chief's coordination "
            f"service for {HEARTBEAT_TIMEOUT_S} s (TensorFlow: {detail})")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes checkpoints and logs (always true without multiworker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    if resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def write_dir(run_dir: Path, strategy: tf.distribute.Strategy) -> Path:
    """Where this worker writes: the run folder on the chief, a fresh temp folder on other workers.

    Under multiworker every worker must take part in saving a checkpoint; only the chief's copy
    is kept (remove_write_dir deletes the others).
    """
    if is_chief(strategy):
        return run_dir
    resolver = strategy.cluster_resolver
    return Path(tempfile.mkdtemp(prefix=f"tfseg-{resolver.task_type}{resolver.task_id}-"))


def remove_write_dir(path: Path, run_dir: Path) -> None:
    if Path(path) != Path(run_dir):
        shutil.rmtree(path, ignore_errors=True)


def resolve_jit_compile(jit_compile: bool | str, kind: str, precision: str) -> bool:
    """`auto` -> XLA on TPUs (always compiled) and GPUs (Keras' own auto choice); on CPUs only for float32
    on CPUs without native bf16: XLA's CPU backend lowers convolutions without oneDNN, which made a
    float32 UNet faster on an AVX2-only CPU but float32 and bf16 slower on CPUs with avx512_bf16 / AMX
    (README: benchmarks). Explicit true / false are kept."""
    if jit_compile != "auto":
        return bool(jit_compile)
    return kind in ("tpu", "gpu") or (precision == "float32" and not cpu_supports_bf16())
