"""The package's shape: stages import only earlier stages, TensorFlow-free stages stay so, and
`pip install .` gives working commands."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfseg"
# The shared bottom: any module may import these, and they import only each other.
BOTTOM = {"tfseg", "tfseg.errors", "tfseg.files", "tfseg.layout", "tfseg.cli", "tfseg.config", "tfseg.draw",
          "tfseg.tflog", "tfseg.labels"}
# Pipeline stages in order: a stage imports the bottom, itself and earlier stages only.
STAGES = ("kaggle", "records", "data", "model", "training", "evaluation", "serving", "bench")
COMMAND_RANK = len(STAGES) + 1  # the thin commands at the top (tfseg/train.py, ...) may import anything
# Importable without TensorFlow (or Keras) installed.
TENSORFLOW_FREE = sorted(BOTTOM) + [
    "tfseg.kaggle.rle", "tfseg.kaggle.scans", "tfseg.kaggle.index", "tfseg.kaggle.folds", "tfseg.kaggle.synth",
    "tfseg.records.features", "tfseg.records.plan", "tfseg.records.volumes", "tfseg.records.shards",
    "tfseg.records.manifest", "tfseg.records.writer", "tfseg.records.reader", "tfseg.records.inspect",
    "tfseg.data.context", "tfseg.evaluation.metric", "tfseg.evaluation.postprocess", "tfseg.evaluation.submission",
    "tfseg.evaluation.report", "tfseg.score", "tfseg.serving.nifti",
    "tfseg.make_records", "tfseg.inspect_records", "tfseg.synth", "tfseg.summary", "tfseg.kaggle.constants",
    # every command: its parser loads no TensorFlow, which it imports only once the arguments are checked
    "tfseg.train", "tfseg.cv", "tfseg.evaluate", "tfseg.export", "tfseg.predict", "tfseg.client",
    "tfseg.serving_stub", "tfseg.bench.__main__",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    if module in BOTTOM:
        return 0
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in STAGES:
        return 1 + STAGES.index(parts[1])
    return COMMAND_RANK


def imported_modules(path: Path):
    """(line, tfseg module) for every import of tfseg in a file, lazy ones inside functions included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tfseg":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tfseg":
            for alias in node.names:  # `from tfseg import cli` imports the module tfseg.cli
                candidate = f"{node.module}.{alias.name}"
                package_dir = ROOT.joinpath(*candidate.split("."))
                is_module = package_dir.with_suffix(".py").exists() or (package_dir / "__init__.py").exists()
                yield node.lineno, candidate if is_module else node.module


def test_stages_import_only_earlier_stages():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, module in imported_modules(path):
            if importer in BOTTOM and module not in BOTTOM:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}: the bottom imports only the bottom")
            elif rank(module) > rank(importer):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}, a later stage "
                             f"(order: bottom, {', '.join(STAGES)}, commands)")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_stage():
    """New files go into a stage folder (or are commands): no stray top-level library modules."""
    commands = {module_name(p) for p in PACKAGE.glob("*.py")} - BOTTOM
    for command in commands:
        assert "\ndef main(" in (ROOT / (command.replace(".", "/") + ".py")).read_text(), \
            f"{command} is neither in the bottom nor a command with a main()"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(STAGES)


BLOCK_TENSORFLOW = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tensorboard", "tensorflow_serving"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
for module in sys.argv[1:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 1)
"""


def test_tensorflow_free_modules_import_without_tensorflow():
    done = subprocess.run([sys.executable, "-c", BLOCK_TENSORFLOW, *TENSORFLOW_FREE], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"imported {len(TENSORFLOW_FREE)}"


def test_the_block_catches_tensorflow():
    """The check above can fail: a module that needs TensorFlow is refused under the same block."""
    done = subprocess.run([sys.executable, "-c", BLOCK_TENSORFLOW, "tfseg.data.preprocess"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "blocked in this test" in done.stderr


@pytest.mark.slow
def test_pip_install_gives_working_commands(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(PACKAGE, source / "tfseg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "tfseg" / "serving" / "signatures.py").exists()  # subpackages are in the wheel
    env = {**os.environ, "PYTHONPATH": str(target)}
    for script, expected in (("tfseg-train", "--config"), ("tfseg-make-records", "--data-dir"),
                             ("tfseg-predict", "--model")):
        done = subprocess.run([str(target / "bin" / script), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "usage:" in done.stdout and expected in done.stdout
    # and it is the installed copy that ran, not the work tree
    where = subprocess.run([sys.executable, "-c", "import tfseg; print(tfseg.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(target))
