"""DICOM input (issue 17, part 2): files made with pydicom from a real chest X-ray, decoded as a viewer shows them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import compose_config, real_dataset, write_dicom
from PIL import Image

from cellcls.config.schema import DatasetConfig, typed
from cellcls.data.decode import decode_image, image_header
from cellcls.errors import DataError

pydicom = pytest.importorskip("pydicom", reason="DICOM support is the optional extra cellcls[dicom]")


def xray() -> np.ndarray:
    """A real chest X-ray from the shared subset, as 8-bit grey values."""
    path = sorted((real_dataset("pneumonia") / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L"))


def decoded(path) -> np.ndarray:
    image = xray()
    return decode_image(path, 1, image.shape)[0].astype(int)


def test_an_8_bit_monochrome2_file_decodes_to_its_pixels(tmp_path):
    image = xray()
    assert np.abs(decoded(write_dicom(tmp_path / "a.dcm", image)) - image).max() <= 1


def test_a_16_bit_file_is_scaled_to_8_bits_over_its_range_not_clipped(tmp_path):
    image = xray()
    twelve = image.astype(np.uint16) * 16  # 12-bit values 0..4080
    out = decoded(write_dicom(tmp_path / "b.dcm", twelve, bits_stored=12))
    assert out.max() == 255 and np.corrcoef(out.ravel(), image.ravel())[0, 1] > 0.999


def test_monochrome1_is_inverted_so_dense_is_bright(tmp_path):
    image = xray()
    out = decoded(write_dicom(tmp_path / "c.dcm", 255 - image, "MONOCHROME1"))
    assert np.abs(out - image).max() <= 1


def test_the_files_window_is_applied(tmp_path):
    image = xray()
    twelve = image.astype(np.uint16) * 16
    out = decoded(write_dicom(tmp_path / "d.dcm", twelve, bits_stored=12, WindowCenter=2048, WindowWidth=1024))
    # values below 1536 are black, above 2560 white: a narrower window than the whole range
    assert (out[twelve < 1500] == 0).all() and (out[twelve > 2600] == 255).all()
    middle = (twelve > 1700) & (twelve < 2400)
    assert 0 < out[middle].min() and out[middle].max() < 255


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    image = xray()
    stored = image.astype(np.uint16) * 4  # 10-bit values; Hounsfield-like = 2 * stored - 1000
    out = decoded(write_dicom(tmp_path / "e.dcm", stored, bits_stored=10, RescaleSlope=2, RescaleIntercept=-1000,
                              WindowCenter=0, WindowWidth=400))
    real = stored.astype(int) * 2 - 1000
    assert (out[real < -250] == 0).all() and (out[real > 250] == 255).all()


def test_a_dicom_upload_without_an_extension_is_recognised_by_its_marker(tmp_path):
    path = write_dicom(tmp_path / "f.dcm", xray())
    stream = io.BytesIO(path.read_bytes())
    assert decode_image(stream, 1, (64, 64), name="upload").shape == (1, 64, 64)
    assert image_header(io.BytesIO(path.read_bytes()))[:2] == xray().shape[::-1]


def test_a_corrupt_dicom_file_is_a_clear_error_naming_it(tmp_path):
    good = write_dicom(tmp_path / "g.dcm", xray()).read_bytes()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good[: len(good) // 2])  # the pixel data cut short
    with pytest.raises(DataError, match=r"broken\.dcm"):
        decode_image(broken, 1, (64, 64))


def test_a_multi_frame_file_is_refused_with_the_reason(tmp_path):
    frames = np.stack([xray()[:64, :64]] * 3)
    path = write_dicom(tmp_path / "h.dcm", frames)
    with pytest.raises(DataError, match="multi-frame DICOM file \\(3 frames\\)"):
        decode_image(path, 1, (64, 64))


def test_the_patient_id_never_appears_in_an_error(tmp_path):
    path = write_dicom(tmp_path / "i.dcm", np.stack([xray()[:32, :32]] * 2))
    with pytest.raises(DataError) as info:
        decode_image(path, 1, (32, 32))
    assert "PRIVATE-123" not in str(info.value)


def test_a_dicom_file_in_a_class_folder_is_found_and_cached_like_any_image(tmp_path):
    from cellcls.data.cache import decode_split
    from cellcls.data.layouts.folders import scan_split

    for cls in ("normal", "pneumonia"):
        write_dicom((tmp_path / "train" / cls).mkdir(parents=True) or tmp_path / "train" / cls / "x.dcm", xray())
    samples = scan_split(tmp_path / "train", ["normal", "pneumonia"])
    assert [p.suffix for p in samples.paths] == [".dcm", ".dcm"]
    split = decode_split(samples, 1, (64, 64), tmp_path / "cache", progress=False)
    assert split.kept == [0, 1] and not split.skipped


def test_a_path_given_as_text_is_read_like_a_path(tmp_path):
    dicom = write_dicom(tmp_path / "j.dcm", xray())
    png = tmp_path / "k.png"
    Image.fromarray(xray()).save(png)
    assert decode_image(str(dicom), 1, (32, 32)).shape == decode_image(str(png), 1, (32, 32)).shape == (1, 32, 32)


def test_a_configured_window_replaces_the_files_own(tmp_path):
    image = xray()
    twelve = image.astype(np.uint16) * 16
    path = write_dicom(tmp_path / "w.dcm", twelve, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    out = decode_image(path, 1, image.shape, window=(1000, 500))[0].astype(int)
    assert (out[twelve < 740] == 0).all() and (out[twelve > 1260] == 255).all()
    middle = (twelve > 800) & (twelve < 1200)
    assert np.abs(out[middle] - np.rint((twelve[middle] - 750) / 500 * 255)).max() <= 1


def test_the_configured_window_is_part_of_the_model_recipe_and_the_cache_key(tmp_path):
    from cellcls.data.cache import cache_key
    from cellcls.data.samples import Samples
    from cellcls.data.preprocessing import Preprocessing

    cfg = compose_config("dataset=pneumonia", "dataset.dicom_window=[40,400]")
    assert Preprocessing.from_config(cfg.dataset).to_dict()["window"] == [40.0, 400.0]
    samples = Samples([write_dicom(tmp_path / "x.dcm", xray())], [0])
    assert cache_key(samples, 1, (64, 64), [40, 400]) != cache_key(samples, 1, (64, 64))


def test_the_patient_id_in_the_header_keeps_each_patients_images_on_one_side(tmp_path):
    from cellcls.data.datamodule import make_splits, resolve_root
    from cellcls.data.layouts import scan

    image = xray()[:128, :128]
    for i in range(24):
        cls = ("normal", "pneumonia")[i % 2]
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        # 12 patients, two images each; the file names say nothing of the patient
        write_dicom(folder / f"img{i:02d}.dcm", np.roll(image, i, axis=1), PatientID=f"P{(i // 2) // 2 * 2 + i % 2:02d}")
    cfg = compose_config("dataset=folder", f"dataset.root={tmp_path}", "dataset.group_tag=PatientID",
                         "dataset.split_by=patient", "dataset.val_fraction=0.34")
    scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
    splits, leaks = make_splits(cfg.dataset, scanned.splits, scanned.classes, 0)
    train, val = set(splits["train"].groups), set(splits["val"].groups)
    assert len(train | val) == 12 and not train & val and not leaks


def test_a_group_tag_that_is_no_dicom_keyword_is_refused_with_examples(tmp_path):
    from cellcls.data.samples import Samples
    from cellcls.data.splits import attach_groups
    from cellcls.errors import ConfigError

    cfg = compose_config("dataset=folder", "dataset.root=/x", "dataset.group_tag=PatientName2")
    with pytest.raises(ConfigError, match="dataset.group_tag='PatientName2' is not a DICOM keyword"):
        attach_groups(Samples([write_dicom(tmp_path / "y.dcm", xray())], [0]), typed(cfg.dataset, DatasetConfig))


def test_corrupt_compressed_pixel_data_is_one_clear_error_without_pydicoms_tracebacks(tmp_path, capfd, caplog):
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    path = write_dicom(tmp_path / "rle.dcm", xray()[:64, :64])
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00garbage" * 10])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match=r"rle\.dcm: its pixel data \(transfer syntax RLE Lossless\) is corrupt "
                                        r"\(.*The RLE header specifies an invalid number of segments"):
        decode_image(path, 1, (64, 64))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Traceback" not in caplog.text


def test_without_pydicom_a_dicom_file_says_which_extra_to_install(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", xray()[:64, :64])
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)
    for read in (lambda: decode_image(path, 1, (64, 64)), lambda: image_header(path)):
        with pytest.raises(DataError, match=r"x\.dcm: reading DICOM files needs pydicom \(pip install 'cellcls\[dicom\]'\)"):
            read()
