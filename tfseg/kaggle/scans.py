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


PNG_COLOURS = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale-alpha", 6: "RGBA"}


def check_scan_header(path: str | os.PathLike) -> None:
    """DataError naming the file and the fix unless its PNG header says 16-bit greyscale, as the Kaggle
    scans are (reads the first 26 bytes only: cheap enough for every scan of a folder)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as err:
        raise DataError(f"{path}: cannot read the scan ({err.strerror})") from None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file; scans are 16-bit greyscale PNGs as in the Kaggle data")
    depth, colour = head[24], head[25]
    if (depth, colour) != (16, 0):
        raise DataError(f"{path}: a {depth}-bit {PNG_COLOURS.get(colour, f'colour type {colour}')} PNG; tfseg reads "
                        "16-bit greyscale scans as in the Kaggle data: save the slice as a single-channel 16-bit "
                        "PNG (e.g. cv2.imwrite(path, image.astype(numpy.uint16))), from the original intensities")


def encode_png(image: np.ndarray, params=FAST) -> bytes:
    """Lossless PNG bytes of a uint16 [H, W] scan or a uint8 [H, W, 3] mask (channel order kept)."""
    if image.ndim == 3:
        image = image[..., ::-1]  # cv2 writes BGR; keep channel 0 first in the PNG, as TF reads it
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image), list(params))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
