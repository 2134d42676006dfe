"""Training speed, images/s, of every precision x XLA combination (float32, mixed_bfloat16, each with
and without XLA), each fed by the real input pipeline and by a few cached batches repeated (nnU-Net's
"no data loading" check: if the two differ, the pipeline is the bottleneck), and which of them the
config's `auto` settings pick on this machine. Each variant runs in a fresh process, since the dtype
policy and XLA are process-wide.
"""

import json
import subprocess
import sys
import time

from tfseg import cli, layout

VARIANTS = {"float32": ("float32", False), "bf16": ("mixed_bfloat16", False), "xla": ("float32", True),
            "bf16_xla": ("mixed_bfloat16", True)}
CACHED_BATCHES = 4


def add_arguments(parser) -> None:
    parser.add_argument("--records", default=layout.RECORDS_DIR, help=f"records folder (default: {layout.RECORDS_DIR})")
    parser.add_argument("--config", default="configs/cpu.yaml", help="model and input size (default: configs/cpu.yaml)")
    parser.add_argument("--steps", type=cli.at_least(1), default=20,
                        help="timed training steps per measurement (default: 20)")
    parser.add_argument("--warmup", type=cli.at_least(0), default=3,
                        help="untimed steps first, after tracing (default: 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")


def measure(config_path: str, records: str, precision: str, jit: bool, steps: int, warmup: int) -> dict:
    """images/s of train steps fed by the pipeline, then by cached batches, in this process."""
    import keras
    import tensorflow as tf

    from tfseg.config import load_config
    from tfseg.data.pipeline import train_dataset
    from tfseg.model.build import build_loss, build_model
    from tfseg.training.optimizer import make_optimizer
    from tfseg.training.steps import Steps
    from tfseg.training.trainer import train_folds

    config = load_config(config_path, [f"data.records={json.dumps(records)}", f"train.precision={precision}",
                                       f"train.jit_compile={str(jit).lower()}", "train.strategy=default"])
    keras.config.set_dtype_policy(precision)
    model = build_model(config)
    optimizer = make_optimizer(config.train, 1000, precision)
    optimizer.build(model.trainable_variables)
    steps_fn = Steps(tf.distribute.get_strategy(), model, optimizer, build_loss(config),
                          config.data.batch_size, config)
    pipeline = train_dataset(config, train_folds(config))
    out = {}
    for name, dataset in (("pipeline", pipeline), ("cached", pipeline.take(CACHED_BATCHES).cache().repeat())):
        batches = iter(dataset)
        for _ in range(warmup):
            float(steps_fn.train_step(batches))
        began = time.perf_counter()
        for _ in range(steps):
            value = steps_fn.train_step(batches)
        float(value)  # wait for the last step
        out[name] = steps * config.data.batch_size / (time.perf_counter() - began)
    return out


def run(args) -> dict:
    figures = {}
    for name in args.variants.split(","):
        precision, jit = VARIANTS[name]
        code = ("import json, sys; from tfseg.bench import train; a = sys.argv; print('RESULT', json.dumps("
                "train.measure(a[1], a[2], a[3], a[4] == '1', int(a[5]), int(a[6]))))")
        proc = subprocess.run([sys.executable, "-c", code, args.config, args.records, precision, str(int(jit)),
                               str(args.steps), str(args.warmup)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} variant failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
        print(f"{name}: {result['pipeline']:.1f} img/s with the pipeline, {result['cached']:.1f} cached", flush=True)
        figures[f"{name}_pipeline_img_per_s"] = result["pipeline"]
        figures[f"{name}_cached_img_per_s"] = result["cached"]
    for name in VARIANTS:
        if name != "float32" and f"{name}_cached_img_per_s" in figures and "float32_cached_img_per_s" in figures:
            for feed in ("pipeline", "cached"):
                figures[f"{name}_vs_float32_{feed}"] = (figures[f"{name}_{feed}_img_per_s"]
                                                        / figures[f"float32_{feed}_img_per_s"])
    for name in VARIANTS:
        if f"{name}_cached_img_per_s" in figures:
            figures[f"{name}_pipeline_vs_cached"] = (figures[f"{name}_pipeline_img_per_s"]
                                                     / figures[f"{name}_cached_img_per_s"])
    chosen = _auto_variant(args.config)
    measured = [f"{name}_cached_img_per_s" for name in VARIANTS if f"{name}_cached_img_per_s" in figures]
    if f"{chosen}_cached_img_per_s" in figures:
        print(f"the config's auto settings pick {chosen} here", flush=True)
        figures["auto_vs_best_cached"] = figures[f"{chosen}_cached_img_per_s"] / max(figures[k] for k in measured)
    return figures


def _auto_variant(config_path: str) -> str:
    """The variant that the config's precision and jit_compile (auto or not) resolve to on this CPU."""
    from tfseg.config import load_config
    from tfseg.training.strategy import resolve_jit_compile, resolve_precision

    train = load_config(config_path).train
    precision = resolve_precision(train.precision, "cpu")
    jit = resolve_jit_compile(train.jit_compile, "cpu", precision)
    return next((name for name, variant in VARIANTS.items() if variant == (precision, jit)), "none")
