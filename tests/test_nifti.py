"""NIfTI in, NIfTI label map out: geometry kept voxel for voxel under an affine that is not the identity,
the same labels as predict's PNG path for the same volume, and bad files refused with nothing written."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tests.test_export import saved_model, volume_pngs  # noqa: F401  (session-wide tiny export)
from tfseg import predict
from tfseg.errors import DataError
from tfseg.kaggle import index
from tfseg.kaggle.scans import read_scan
from tfseg.labels import label_map, one_hot
from tfseg.serving import nifti
from tfseg.serving import predict as predict_lib


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic (1.5 x 0.8 x 3 mm) and shifted: any transposition or flip would show."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix() @ np.diag([1.5, 0.8, 3.0])
    affine[:3, 3] = [-100.0, 20.5, 33.0]
    return affine


def write_volume(slices: np.ndarray, path: Path, dtype=None) -> Path:
    """Slices [D, H, W] as a NIfTI volume data[x, y, z] = slices[z, y, x], qform and sform both set."""
    image = nib.Nifti1Image(np.asarray(slices).transpose(2, 1, 0).astype(dtype or slices.dtype), oblique_affine())
    image.set_qform(oblique_affine(), code=1)
    image.set_sform(oblique_affine(), code=2)
    nib.save(image, str(path))
    return path


def assert_same_grid(labels, scan) -> None:
    assert labels.shape == scan.shape[:3]
    np.testing.assert_allclose(labels.affine, scan.affine, atol=1e-5)
    np.testing.assert_allclose(labels.header.get_zooms()[:3], scan.header.get_zooms()[:3])
    for coded in (labels.get_qform(coded=True), labels.get_sform(coded=True)):
        assert coded[1] > 0
    np.testing.assert_allclose(labels.get_qform(), scan.get_qform(), atol=1e-5)
    np.testing.assert_allclose(labels.get_sform(), scan.get_sform(), atol=1e-5)
    assert [int(labels.header[k]) for k in ("qform_code", "sform_code")] == \
        [int(scan.header[k]) for k in ("qform_code", "sform_code")]
    assert labels.get_data_dtype() == np.uint8


def test_label_numbers_and_overlap_rule():
    masks = np.zeros((2, 2, 3), np.uint8)
    masks[0, 0] = [1, 0, 0]
    masks[0, 1] = [1, 1, 0]  # bowel on bowel: small bowel (2) wins
    masks[1, 0] = [1, 1, 1]  # stomach (3) wins
    np.testing.assert_array_equal(label_map(masks), [[1, 2], [3, 0]])
    np.testing.assert_array_equal(one_hot(label_map(masks))[0, 0], [1, 0, 0])


def test_round_trip_keeps_voxels_and_geometry(tmp_path):
    slices = np.random.default_rng(0).integers(0, 4000, (5, 7, 9)).astype(np.uint16)  # D != H != W
    scan = nifti.load(write_volume(slices, tmp_path / "scan.nii.gz"))
    np.testing.assert_array_equal(nifti.read_slices(scan), slices)  # whole numbers in 0..65535: as they are
    labels = (slices % 4).astype(np.uint8)
    nifti.write_label_map(labels, scan, tmp_path / "labels.nii.gz")
    written = nib.load(str(tmp_path / "labels.nii.gz"))
    assert_same_grid(written, scan)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), labels)
    assert written.header.get_intent()[0] == "label" and b"1 large bowel" in written.header["descrip"].tobytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


@pytest.mark.parametrize(("data", "expected"), [
    (np.array([[[0, 7, 65535]]], np.int32), [0, 7, 65535]),  # kept
    (np.array([[[2.0, 3.0, 5.0]]], np.float32), [2, 3, 5]),  # whole-number floats kept
    (np.array([[[-1.0, 0.5, 2.0]]], np.float32), [0, 32768, 65535]),  # rescaled min..max
    (np.array([[[np.nan, 0.0, 1.0]]], np.float64), [0, 0, 65535]),  # non-finite counts as the minimum
    (np.array([[[70000, 70000, 70000]]], np.int64), [0, 0, 0]),  # constant out of range
])
def test_intensities_to_uint16(data, expected):
    np.testing.assert_array_equal(nifti.to_uint16(data).ravel(), expected)


def test_predict_nifti_labels_the_organs_as_the_png_path(saved_model, synth_dir, tmp_path, capsys):  # noqa: F811
    """A synthetic case's PNGs as a NIfTI volume: the label map equals the labels of predict's PNG path."""
    case_day, pngs = volume_pngs(synth_dir)
    table = index.read_index(synth_dir)
    slices = np.stack([read_scan(p) for p in table.loc[table["case_day"] == case_day, "path"]])
    scan_path = write_volume(slices, tmp_path / f"{case_day}.nii.gz")
    out = tmp_path / "out" / "labels.nii.gz"
    assert predict.main(["--model", str(saved_model), "--scan", str(scan_path), "--out", str(out)]) == 0
    assert f"wrote {out}: label map of {len(slices)} slices" in capsys.readouterr().out
    written = nib.load(str(out))
    assert_same_grid(written, nib.load(str(scan_path)))
    served, info = predict_lib.load_model(saved_model)
    post = predict_lib.Postprocess.from_info(info)
    expected = label_map(predict_lib.predict_volume(served, pngs, info["offsets"], post=post))
    assert expected.any(), "the tiny model predicts no organ: the comparison would prove nothing"
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), expected)
    # the same volume as floats in another range (e.g. after a converter's rescaling): nearly the same labels
    float_path = tmp_path / "float.nii.gz"
    write_volume(slices.astype(np.float32) * 0.01 - 5, float_path, np.float32)
    masks = predict_lib.predict_nifti(saved_model, float_path, tmp_path / "float_labels.nii")
    assert np.mean(label_map(masks) != expected) < 1e-3


@pytest.mark.parametrize("case", ["4d", "empty", "junk", "missing", "out_not_nifti"])
def test_bad_nifti_is_refused(case, tmp_path, capsys):
    scan, out = tmp_path / "scan.nii.gz", tmp_path / "labels.nii.gz"
    if case == "4d":
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.uint16), oblique_affine()), str(scan))
    elif case == "empty":
        nib.save(nib.Nifti1Image(np.zeros((4, 0, 3), np.uint16), oblique_affine()), str(scan))
    elif case == "junk":
        scan.write_bytes(b"not a nifti file")
    elif case == "out_not_nifti":
        write_volume(np.zeros((2, 4, 4), np.uint16), scan)
        out = tmp_path / "labels.png"
    before = sorted(tmp_path.iterdir())
    # the scan is checked before the model loads: no model needed to refuse it
    assert predict.main(["--model", str(tmp_path / "no_model"), "--scan", str(scan), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert str(out if case == "out_not_nifti" else scan) in err[0]
    assert sorted(tmp_path.iterdir()) == before


def test_load_refuses_other_names(tmp_path):
    with pytest.raises(DataError, match="not a NIfTI file name"):
        nifti.load(tmp_path / "scan.png")
