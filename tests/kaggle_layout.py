"""Hand-built Kaggle-layout folders for tests: small, exact, and easy to break on purpose."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tfseg import CLASSES
from tfseg.kaggle import rle


def scan_name(slice_num: int, width: int, height: int, spacing: float = 1.5) -> str:
    return f"slice_{slice_num:04d}_{width}_{height}_{spacing:.2f}_{spacing:.2f}.png"


def write_layout(root: Path, volumes: dict[str, tuple[int, int, int]], seed: int = 0) -> pd.DataFrame:
    """Write train.csv + 16-bit scans for {case_day: (slices, height, width)}; returns the CSV table.

    Each slice gets a random rectangle per class (some slices empty), so masks are known exactly.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for case_day, (depth, height, width) in volumes.items():
        case = case_day.split("_")[0]
        scans = root / "train" / case / case_day / "scans"
        scans.mkdir(parents=True, exist_ok=True)
        for s in range(1, depth + 1):
            image = rng.integers(0, 4000, (height, width), dtype=np.uint16)
            cv2.imwrite(str(scans / scan_name(s, width, height)), image)
            for cls in CLASSES:
                mask = np.zeros((height, width), np.uint8)
                if rng.random() < 0.6:
                    y, x = rng.integers(0, height - 3), rng.integers(0, width - 3)
                    mask[y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = 1
                rows.append({"id": f"{case_day}_slice_{s:04d}", "class": cls, "segmentation": rle.encode(mask)})
    table = pd.DataFrame(rows)
    table.to_csv(root / "train.csv", index=False)
    return table
