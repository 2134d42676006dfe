"""NIfTI volumes in and NIfTI label maps out (`tfseg.predict --scan`), for the viewers clinicians use
(3D Slicer, ITK-SNAP): the label map has the scan's grid, affine and header, so it overlays without shift.

Orientation. A NIfTI volume is data[i, j, k], voxel (i, j, k) placed in space by the affine; tfseg's
slices are Kaggle-style images [H, W] (row, column). Slices run along the third axis and are
transposed in plane: slice k is data[:, :, k].T, so image row = j and column = i (how ITK-SNAP and
Slicer lay out an axial slice of an RAS/LPS volume before their display flips). The label map is
written back the same way (labels[:, :, k] = slice k's labels.T): the round trip is exact, voxel for voxel.

Intensities. The model saw 16-bit PNG intensities, normalised per volume between two percentiles
(tfseg.data.preprocess.normalize). That normalisation is linear, so a linear rescaling of a volume
changes nothing but rounding: data that is whole numbers within 0..65535 (after the header's
scl_slope/scl_inter) is used as it is, exactly like the same scan as 16-bit PNGs; anything else
(floats, negative values, wider integers) is mapped linearly from the volume's min..max onto 0..65535
(non-finite voxels count as the minimum).
"""

import os
from pathlib import Path

import numpy as np

from tfseg import files
from tfseg.errors import DataError
from tfseg.labels import legend

SUFFIXES = (".nii", ".nii.gz")
UINT16_MAX = 65535


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def load(path: str | os.PathLike):
    """The nibabel image of a 3-D NIfTI volume (a 4-D one with a single volume counts), or a DataError
    naming the file and what is wrong."""
    import nibabel as nib  # only predict --scan needs nibabel

    path = Path(path)
    if not is_nifti(path):
        raise DataError(f"{path}: not a NIfTI file name (expected {' or '.join(SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{path}: no such NIfTI file")
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises many kinds (ImageFileError, gzip, EOF, header checks)
        raise DataError(f"{path}: not a readable NIfTI volume ({type(err).__name__}: {err})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: a {type(image).__name__}, not a NIfTI-1 or NIfTI-2 volume")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: data of shape {list(image.shape)}; tfseg.predict --scan needs one 3-D volume "
                        "[x, y, slices] (split a 4-D series into its volumes first)")
    if 0 in shape:
        raise DataError(f"{path}: an empty volume (shape {list(image.shape)})")
    return image


def to_uint16(data: np.ndarray) -> np.ndarray:
    """Voxel values -> uint16 of the same shape: kept when they are whole numbers within 0..65535,
    else the volume's finite min..max mapped linearly onto 0..65535."""
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.bool_):
        if data.size and data.min() >= 0 and data.max() <= UINT16_MAX:
            return data.astype(np.uint16)
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else np.ones(data.shape, bool)
    values = data.astype(np.float64)
    if finite.all() and np.array_equal(values, np.round(values)) and values.min() >= 0 and values.max() <= UINT16_MAX:
        return values.astype(np.uint16)
    if not finite.any():
        return np.zeros(data.shape, np.uint16)
    low, high = values[finite].min(), values[finite].max()
    values = np.where(finite, values, low)
    scaled = (values - low) * (UINT16_MAX / (high - low)) if high > low else np.zeros_like(values)
    return np.round(scaled).astype(np.uint16)


def read_slices(image, path: str | os.PathLike = "volume") -> np.ndarray:
    """A loaded volume's slices uint16 [D, H, W]: slice k is data[:, :, k].T (see the module docstring)."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # a truncated .nii.gz fails only here, when the data is read
        raise DataError(f"{path}: cannot read the NIfTI data ({type(err).__name__}: {err})") from None
    data = data.reshape(data.shape[:3])
    return np.ascontiguousarray(to_uint16(data).transpose(2, 1, 0))


def write_label_map(labels: np.ndarray, like, path: str | os.PathLike) -> Path:
    """Write uint8 labels [D, H, W] (slice order, tfseg.labels numbers) as a NIfTI label map on the grid of
    `like` (the scan's image): its header as it is (affine, qform/sform and their codes, zooms, units),
    uint8, unscaled, intent 'label'. Atomic: nothing is left at `path` if writing fails."""
    import nibabel as nib

    labels = np.asarray(labels, np.uint8)
    data = np.ascontiguousarray(labels.transpose(2, 1, 0))  # [D, H, W] -> [i, j, k]
    if data.shape != like.shape[:3]:
        raise ValueError(f"labels {labels.shape} do not fit the scan's grid {like.shape[:3]}")
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    out = type(like)(data, None, header)  # affine None: the header's qform and sform, untouched
    out.header.set_slope_inter(1.0, 0.0)
    out.header.set_intent("label")
    out.header["cal_min"], out.header["cal_max"] = 0, int(labels.max(initial=0))
    out.header["descrip"] = f"tfseg labels: {legend()}".encode()[:79]
    path = Path(path)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"  # nibabel compresses by file name
    with files.atomic_path(path, suffix=suffix) as tmp:
        nib.save(out, str(tmp))
    return path
