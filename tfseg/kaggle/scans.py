"""Reading and writing scan and mask PNGs: 16-bit scans kept exact (cv2's and TF's default flags
silently drop to 8 bits) and one encoder for every PNG tfseg writes."""

import os

import cv2
import numpy as np

from tfseg.errors import DataError

# cv2.imencode parameters: FAST for any image; FLAT for 0/1 masks (row filters only cost time on flat
# images, and run-length zlib packs them smaller); () keeps OpenCV's defaults.
FAST = (cv2.IMWRITE_PNG_COMPRESSION, 1)
FLAT = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE)


def read_scan(path: str | os.PathLike, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read one scan as uint16 [H, W]; DataError names the file if it is not what the layout says."""
    data = np.fromfile(str(path), np.uint8) if os.path.exists(path) else None
    if data is None:
        raise DataError(f"{path}: scan file is missing")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"{path}: unreadable or corrupt PNG")
    if image.ndim != 2:
        raise DataError(f"{path}: scan has {image.shape[2]} channels; expected a single-channel 16-bit PNG")
    if image.dtype != np.uint16:
        raise DataError(f"{path}: scan is {image.dtype} ({image.dtype.itemsize * 8}-bit); expected 16-bit")
    if expect_hw is not None and tuple(image.shape) != tuple(expect_hw):
        h, w = expect_hw
        raise DataError(f"{path}: scan is {image.shape[1]} x {image.shape[0]} (W x H) but its file name "
                        f"says {w} x {h}")
    return image


def encode_png(image: np.ndarray, params=FAST) -> bytes:
    """Lossless PNG bytes of a uint16 [H, W] scan or a uint8 [H, W, 3] mask (channel order kept)."""
    if image.ndim == 3:
        image = image[..., ::-1]  # cv2 writes BGR; keep channel 0 first in the PNG, as TF reads it
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image), list(params))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
