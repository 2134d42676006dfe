"""Every `python -m tfseg.bench` command runs at a tiny size and writes its documented figures as a flat
JSON object of numbers (the measurements themselves belong in the README, not in tests)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")

PIPELINES = ("host", "cached", "device_aug", "cached_device_aug")  # bench data's modes besides decode-only

# bench name -> (arguments at a tiny size, keys its JSON must hold)
BENCHES = {
    "records": (lambda d, r: ["--data-dir", str(d), "--limit-volumes", "4", "--num-folds", "2"],
                {"slices_per_s_1", "slices_per_s_2", "speedup_2_vs_1", "full_dataset_minutes_2", "same_bytes_1_vs_2"}),
    "data": (lambda d, r: ["--records", str(r), "--data-dir", str(d), "--batches", "3", "--batch-size", "4",
                           "--shuffle-buffer", "8", "--warmup-volumes", "0.2"],
             {*(f"{mode}_{what}_{cores}core" for mode in ("decode", *PIPELINES)
                for what in ("img_per_s", "cpu_ms_per_img") for cores in (1, 2)),
              *(f"{mode}_core_scaling" for mode in ("decode", *PIPELINES)),
              "notebook_img_per_s", "notebook_cpu_ms_per_img",
              *(f"{mode}_vs_{other}" for mode in PIPELINES for other in ("notebook", "decode_1core", "decode_2core")),
              *(f"stage_{name}_cpu_ms" for name in ("read", "parse", "decode", "normalize", "pack_masks", "resize",
                                                    "quantize", "intensity_augment", "context", "crop", "batch",
                                                    "to_float", "geometric_augment"))}),
    "train": (lambda d, r: ["--records", str(r), "--config", SMOKE, "--steps", "2", "--warmup", "1",
                            "--variants", "float32,xla"],
              {"float32_pipeline_img_per_s", "float32_cached_img_per_s", "xla_pipeline_img_per_s",
               "xla_cached_img_per_s", "xla_vs_float32_pipeline", "xla_vs_float32_cached"}),
    "serve": (lambda d, r: ["--config", SMOKE, "--repeats", "1"],
              {*(f"{kind}_{what}_{size}" for kind in ("png", "float", "keras")
                 for what in ("latency_ms", "slices_per_s") for size in ("b1", "b8", "b32", "volume")),
               "png_over_float_latency_b1", "png_over_float_latency_volume", "rest_masks_png_volume_kb",
               "rest_serving_default_slice_kb",
               *(f"{name}_{what}_volume" for name in ("serving_volume", "masks_png", "masks_png_one_by_one")
                 for what in ("latency_ms", "slices_per_s")),
               "masks_png_over_serving_volume_latency", "one_by_one_over_serving_volume_latency",
               "serving_volume_request_mb", "masks_png_request_mb_volume"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_writes_its_figures(name, synth_dir, records_dir, tmp_path):
    arguments, keys = BENCHES[name]
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, "-m", "tfseg.bench", name, *arguments(synth_dir, records_dir),
                           "--json", str(out)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert keys <= set(figures), sorted(keys - set(figures))
    assert all(isinstance(v, int | float) for v in figures.values())
    assert all(v > 0 for k, v in figures.items() if k in keys and not math.isnan(v))
    assert f"{name} benchmark (" in done.stdout
