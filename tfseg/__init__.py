"""tfseg: segment stomach, small bowel and large bowel in abdominal MRI (UW-Madison GI Tract)."""

import os

from tfseg import tflog

# Hide TensorFlow's C++ info lines (CPU feature notes, CUDA probing on machines without a GPU) unless the
# user set a level (TF_CPP_MIN_LOG_LEVEL=0 shows them all). It must happen before TensorFlow is imported,
# and every command imports tfseg first; tflog hides the lines TensorFlow prints before it reads the level.
os.environ.setdefault(tflog.LEVEL, "2")
tflog.install()

__version__ = "0.1.0"

# Channel order of every mask tfseg reads, writes or predicts (the order train.csv lists them).
CLASSES = ("large_bowel", "small_bowel", "stomach")
