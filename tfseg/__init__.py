"""tfseg: segment stomach, small bowel and large bowel in abdominal MRI (UW-Madison GI Tract)."""

import os

# Hide TensorFlow's C++ info lines (CPU feature notes, CUDA probing on machines without a GPU) unless the
# user set a level. It must happen before TensorFlow is imported, and every command imports tfseg first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# Channel order of every mask tfseg reads, writes or predicts (the order train.csv lists them).
CLASSES = ("large_bowel", "small_bowel", "stomach")
