"""A training run killed with SIGKILL mid-epoch resumes after its last finished epoch; --fresh starts over."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
EPOCHS, STEPS = 3, 8


def finished_epochs(run_dir: Path) -> list[int]:
    try:
        with open(run_dir / "history.csv") as f:
            return [int(row["epoch"]) for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []


def command(records_dir, run_dir, *extra, epochs: int = EPOCHS, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "tfseg.train", "--config", str(SMOKE), "--records", str(records_dir),
            "--run-dir", str(run_dir), "--epochs", str(epochs), "--set", f"train.steps_per_epoch={steps}",
            "--set", "train.image_log_every=0", *extra]


def run(cmd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_killed_run_resumes_after_its_last_finished_epoch(records_dir, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command(records_dir, run_dir), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished in time:\n" + log.read_text()[-3000:]
            done = finished_epochs(run_dir)
            # The progress bar of the next epoch shows at least one step done: we are mid-epoch.
            mid_epoch = rf"epoch {done[-1] + 1}/{EPOCHS}:\s+\d+%\|[^|]*\|\s*[1-9]\d*/{STEPS}" if done else None
            if mid_epoch and re.search(mid_epoch, log.read_text()):
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_after = finished_epochs(run_dir)
    assert 1 <= len(killed_after) < EPOCHS

    second = run(command(records_dir, run_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    restored = int(re.search(rf"resumed from \S+: (\d+) of {EPOCHS} epochs done", second.stdout).group(1))
    assert restored in (len(killed_after), len(killed_after) - 1)  # -1: killed between history and checkpoint
    trained = [int(e) for e in re.findall(rf"^epoch (\d+)/{EPOCHS}: loss", second.stdout, re.MULTILINE)]
    assert trained == list(range(restored + 1, EPOCHS + 1))
    assert finished_epochs(run_dir) == list(range(1, EPOCHS + 1))
    assert (run_dir / "model.keras").exists()

    # Another config in the same folder starts over with --fresh (without it, it would refuse).
    third = run(command(records_dir, run_dir, "--fresh", epochs=1, steps=2))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed" not in third.stdout
    assert finished_epochs(run_dir) == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.index")) == ["ckpt-1.index"]
