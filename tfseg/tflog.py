"""Quiet TensorFlow start-up: its C++ info lines are hidden unless TF_CPP_MIN_LOG_LEVEL asks for them.

TensorFlow honours TF_CPP_MIN_LOG_LEVEL only once its logging is set up; the lines it prints while
loading (the absl banner, oneDNN, "Could not find cuda drivers") and the cuInit error of a machine
without a GPU come before that. So the first `import tensorflow` of a tfseg process, and its first
device listing (where cuInit happens), run with the C-level stderr caught; what is caught is printed
again afterwards without those lines. TF_CPP_MIN_LOG_LEVEL=0 or 1 (set before the command) shows
everything, untouched. TensorFlow-free: it only waits for TensorFlow to be imported.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# absl's "before InitializeLog" banner, info and warning lines (I0000/W0000 ...), the CPU-instructions
# note's second line, and the CUDA probe of a machine without a GPU (an E line, but not an error here).
HIDDEN = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d+\.\d+ "
                    r"|To enable the following instructions:|.*(failed call to cuInit|Could not find cuda drivers)")


def quiet() -> bool:
    """Whether TensorFlow's start-up lines are hidden: unless the level asks for info (0) or warnings (1)."""
    return os.environ.get(LEVEL, "2") not in ("0", "1")


@contextlib.contextmanager
def filtered_stderr():
    """Catch what C code writes to file descriptor 2; print it again afterwards minus the HIDDEN lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not HIDDEN.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` like the other finders do, and loads it (and lists its devices) quietly."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: later imports find it in sys.modules
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not quiet():
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            with filtered_stderr():
                load(module)
                module.config.list_physical_devices()  # the cuInit probe, while stderr is still caught

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Hide the start-up lines of the first `import tensorflow` (a no-op once TensorFlow is loaded)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
