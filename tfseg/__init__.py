"""tfseg: segment stomach, small bowel and large bowel in abdominal MRI (UW-Madison GI Tract)."""

__version__ = "0.1.0"

# Channel order of every mask tfseg reads, writes or predicts (the order train.csv lists them).
CLASSES = ("large_bowel", "small_bowel", "stomach")
