"""Image reading and preprocessing (efcm.images): DICOM photometric handling, rescale and
windowing, 16-bit files, the fundus field-of-view crop, the resize policies, and bad files as
typed errors and status rows that name the file."""

from __future__ import annotations

import struct
import zlib
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import tifffile

from efcm.config import params_from_dict
from efcm.errors import BatchFailed, InvalidImage
from efcm.images.decode import decode_image
from efcm.images.dicom import window, write_dicom
from efcm.images.preprocess import find_fov, preprocess
from efcm.images.reader import ImageReader, check_images, image_loop
from efcm.io.image_manifest import ImageEntry
from efcm.io.status import read_status

LIMITS = {"max_pixels": 10**8, "min_side": 16}


def _decode(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), str(path), **LIMITS)


def _image(**over):
    return params_from_dict({"image": over}).image


# -- DICOM ----------------------------------------------------------------------------------------

STORED = np.array([[0, 100, 150, 200, 300, 3000]] * 16, np.uint16)  # (16, 6): 16-bit stored values


def _wide(row: np.ndarray) -> np.ndarray:
    return np.repeat(row, 4, axis=1)  # 16 x 24: at least min_side on both sides


def test_dicom_rescale_and_window_give_the_hand_computed_greys(tmp_path):
    # rescaled = 2 x stored - 100; LINEAR window c=300, w=401:
    # y = clip((v - 299.5) / 400 + 0.5, 0, 1) * 255
    path = write_dicom(tmp_path / "a.dcm", _wide(STORED), window=(300, 401), rescale=(2.0, -100.0))
    grey = _decode(path)
    assert grey.dtype == np.uint8 and grey.shape == (16, 24)
    # v = -100, 100, 200, 300, 500, 5900
    np.testing.assert_array_equal(grey[0, ::4], [0, 0, 64, 128, 255, 255])


def test_monochrome1_is_monochrome2_inverted(tmp_path):
    px = _wide(STORED)
    m1 = _decode(write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", window=(150, 301)))
    m2 = _decode(write_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2", window=(150, 301)))
    np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))
    assert m2[0, 0] == 0 and m1[0, 0] == 255  # the minimum is black in 2, white in 1
    assert len(np.unique(m2)) > 3  # a real ramp, not a threshold


def test_a_dicom_without_a_window_is_stretched_min_to_max_at_16_bits(tmp_path):
    px = _wide(np.array([[0, 1000, 4095, 2048, 4095, 0]] * 16, np.uint16))
    grey = _decode(write_dicom(tmp_path / "nowin.dcm", px, rescale=(1.0, -1024.0)))
    # the rescale is linear: min-max of the rescaled values = of the stored ones
    np.testing.assert_array_equal(grey[0, ::4], [0, 62, 255, 128, 255, 0])


def test_window_functions_follow_dicom():
    x = np.array([-10.0, 0.0, 10.0])
    np.testing.assert_array_equal(window(x, 0, 20, "LINEAR_EXACT"), [0, 128, 255])
    assert window(np.array([0.0]), 0, 10, "SIGMOID")[0] == 128
    with pytest.raises(ValueError, match="LINEAR window needs width >= 1"):
        window(x, 0, 0.5)


def test_an_rgb_dicom_keeps_its_colours(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        _decode(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")), rgb
    )


def test_a_dicom_without_pixel_data_is_a_typed_error_naming_the_file(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.PatientID = "p"
    path = tmp_path / "nopixels.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    with pytest.raises(InvalidImage, match=r"nopixels\.dcm: a DICOM file without pixel data") as e:
        _decode(path)
    assert e.value.status == "no_pixels"


# -- PNG, JPEG, TIFF -------------------------------------------------------------------------------


def test_a_16_bit_png_and_tiff_are_stretched_to_8_bits(tmp_path):
    px = _wide(np.array([[0, 1000, 4095, 2048, 4095, 0]] * 16, np.uint16))
    cv2.imwrite(str(tmp_path / "g.png"), px)
    tifffile.imwrite(tmp_path / "g.tif", px)
    for name in ("g.png", "g.tif"):
        grey = _decode(tmp_path / name)
        assert grey.dtype == np.uint8 and grey.shape == (16, 24), name
        np.testing.assert_array_equal(grey[0, ::4], [0, 62, 255, 128, 255, 0])


def test_colour_files_decode_as_rgb(tmp_path):
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[..., 2] = 200  # red, in OpenCV's order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    cv2.imwrite(str(tmp_path / "red.jpg"), bgr)
    for name in ("red.png", "red.jpg"):
        rgb = _decode(tmp_path / name)
        assert rgb.shape == (20, 30, 3)
        assert rgb[..., 0].mean() > 190 and rgb[..., 2].mean() < 10, name


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (no pixels)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"", "unreadable", "empty file"),
        (b"just some text, not pixels" * 10, "unreadable", r"not an image \(PNG, JPEG, TIFF or"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "unreadable", "not an image"),
        (_png_header(100_000, 100_000), "too_large", "absurd size|over the limit"),
        (_png_header(12_000, 9_000), "too_large", r"12000 x 9000 px is over the limit of"),
        (_png_header(8, 4000), "too_small", r"8 x 4000 px is under the smallest side of 16"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 10, "unreadable", "not a readable DICOM|without"),
    ],
)
def test_bad_files_raise_a_typed_error_naming_the_file(tmp_path, content, status, message):
    path = tmp_path / "bad_file.png"
    path.write_bytes(content)
    with pytest.raises(InvalidImage, match=message) as e:
        _decode(path)
    assert "bad_file.png" in str(e.value)
    assert e.value.status == status or (status == "unreadable" and e.value.status == "no_pixels")


def test_a_file_named_dcm_that_is_not_dicom_is_unreadable(tmp_path):
    (tmp_path / "scan.dcm").write_text("patient notes, not an image\n" * 20)
    with pytest.raises(InvalidImage, match=r"scan\.dcm: not a DICOM file") as e:
        _decode(tmp_path / "scan.dcm")
    assert e.value.status == "unreadable"


def test_the_reader_output_is_what_the_encoders_transform_takes():
    import torch

    from efcm.models.encoders import PatchTransform

    p = params_from_dict(
        {"image": {"preset": "cxr", "size": 96, "mean": [0.5] * 3, "std": [0.25] * 3}}
    )
    img = preprocess(np.full((120, 80), 191, np.uint8), p.image)  # 191 = 0.75 x 255 (about)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    spec = p.image.encoder_spec(p.student)  # student input 224: the whole image, resized
    x = PatchTransform(spec)(torch.from_numpy(img[None]))
    assert x.shape == (1, 3, spec.input_size, spec.input_size)
    centre = x[0, :, 112, 112]
    torch.testing.assert_close(
        centre, torch.full((3,), (191 / 255 - 0.5) / 0.25), atol=1e-3, rtol=0
    )
    assert x[0, 0, 112, 0] == pytest.approx((0 - 0.5) / 0.25)  # the padding: black


def test_a_truncated_png_is_unreadable(tmp_path):
    cv2.imwrite(str(tmp_path / "t.png"), np.full((64, 64), 7, np.uint8))
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match=r"t\.png: "):
        _decode(tmp_path / "t.png")


# -- the fundus crop ------------------------------------------------------------------------------


def _fundus(h: int, w: int, cx: int, cy: int, r: int, border: int = 0) -> np.ndarray:
    """A bright disc on black (clipped where it leaves the picture), darker spots on its rim."""
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (cx, cy), r, (170, 80, 40), -1)
    for a in np.linspace(0, 2 * np.pi, 7, endpoint=False):  # lesion-like dots near the rim
        x, y = int(cx + 0.9 * r * np.cos(a)), int(cy + 0.9 * r * np.sin(a))
        cv2.circle(img, (x, y), 6, (60, 20, 10), -1)
    noise = np.random.default_rng(1).integers(0, 12, img.shape, dtype=np.uint8)
    img = cv2.add(img, noise)  # sensor noise: the black border is not exactly 0
    if border:
        img[:, :border] = 0
    return img


@pytest.mark.parametrize(
    ("h", "w", "cx", "cy", "r"),
    [
        (300, 400, 230, 140, 120),  # off-centre, whole
        (200, 420, 210, 100, 130),  # clipped at the top and bottom
        (260, 300, 120, 150, 150),  # clipped on three sides
    ],
)
def test_the_fov_matches_the_circle_off_centre_and_clipped(h, w, cx, cy, r):
    fov = find_fov(_fundus(h, w, cx, cy, r, border=5), threshold=20)
    assert abs(fov.cx - cx) <= 2 and abs(fov.cy - cy) <= 2 and abs(fov.r - r) <= 2, fov
    left, top, right, bottom = fov.box()
    assert max(abs(left - (cx - r)), abs(top - (cy - r))) <= 3
    assert max(abs(right - (cx + r)), abs(bottom - (cy + r))) <= 3


def test_the_fov_is_found_on_a_large_picture_too():
    fov = find_fov(_fundus(1500, 2000, 1100, 760, 700), threshold=20)
    assert abs(fov.cx - 1100) <= 4 and abs(fov.cy - 760) <= 4 and abs(fov.r - 700) <= 4


def test_the_fundus_crop_centres_the_circle_in_the_output():
    params = _image(preset="fundus", size=128)
    out = preprocess(_fundus(200, 420, 260, 100, 130), params)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    bright = out[..., 0] > 60
    ys, xs = np.nonzero(bright)
    assert abs(xs.mean() - 63.5) < 3 and abs(ys.mean() - 63.5) < 3
    assert xs.min() <= 3 and xs.max() >= 124  # the disc spans the width: no border left
    assert not bright[:12].any() and not bright[-12:].any()  # the clipped top/bottom: black


def test_a_black_picture_has_no_field_of_view():
    with pytest.raises(InvalidImage, match=r"dark\.png: no field of view") as e:
        preprocess(np.full((100, 100, 3), 5, np.uint8), _image(preset="fundus"), "dark.png")
    assert e.value.status == "no_field_of_view"


# -- channels and resize --------------------------------------------------------------------------


def test_resize_policies_and_channels():
    img = np.full((100, 200), 200, np.uint8)  # a wide grey picture
    pad = preprocess(img, _image(size=64, resize="pad"))
    assert pad.shape == (64, 64, 3)
    assert (pad[:14] == 0).all() and (pad[-14:] == 0).all() and (pad[20:44] == 200).all()
    crop = preprocess(img, _image(size=64, resize="crop"))
    assert (crop == 200).all()
    stretched = preprocess(img, _image(size=64, resize="stretch"))
    assert (stretched == 200).all()
    colour = np.zeros((50, 50, 3), np.uint8)
    colour[..., 0] = 255
    grey = preprocess(colour, _image(size=32, channels="grey"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert abs(int(grey[0, 0, 0]) - 76) <= 1  # luma of pure red
    kept = preprocess(colour, _image(size=32, channels="rgb"))
    assert (kept[..., 0] == 255).all() and (kept[..., 1] == 0).all()


# -- the reader and the batch loop ----------------------------------------------------------------


def _read_one(entry: ImageEntry, row: dict, reader: ImageReader) -> None:
    row["shape"] = "x".join(map(str, reader(entry).shape))


def test_the_loop_gives_every_image_a_status_row_and_goes_on(tmp_path):
    cv2.imwrite(str(tmp_path / "ok.png"), np.full((40, 60), 90, np.uint8))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    entries = [
        ImageEntry("ok", "p", "ok.png", ""),
        ImageEntry("text", "p", "text.png", ""),
        ImageEntry("empty", "p", "empty.jpg", ""),
        ImageEntry("gone", "p", "gone.png", ""),
    ]
    reader = ImageReader(_image(size=32), base_dir=tmp_path)
    loop = image_loop("read", partial(_read_one, reader=reader), {"shape": ""})
    rows = loop.run(entries, tmp_path / "status.csv")
    by_id = {r["image_id"]: r for r in read_status(tmp_path / "status.csv")}
    assert [r["image_id"] for r in rows] == ["ok", "text", "empty", "gone"]
    assert by_id["ok"]["status"] == "ok" and by_id["ok"]["shape"] == "32x32x3"
    assert (
        by_id["text"]["status"] == "unreadable"
        and "text.png: not an image" in (by_id["text"]["reason"])
    )
    assert (
        by_id["empty"]["status"] == "unreadable"
        and "empty.jpg: empty" in (by_id["empty"]["reason"])
    )
    assert by_id["gone"]["status"] == "missing" and "gone.png" in by_id["gone"]["reason"]
    assert list(read_status(tmp_path / "status.csv")[0])[:3] == ["image_id", "status", "reason"]
    check_images(rows, "read", "all")  # one image read: not a failed batch
    with pytest.raises(BatchFailed, match=r"read: 3 image\(s\) failed"):
        check_images(rows, "read", "any")


def test_a_file_too_big_for_any_allowed_image_is_not_read(tmp_path):
    (tmp_path / "huge.png").write_bytes(b"\x89PNG" + bytes(1_100_000))
    reader = ImageReader(_image(max_pixels=1024), base_dir=tmp_path)  # 6 KiB + 1 MiB at most
    with pytest.raises(InvalidImage, match=r"huge\.png: 1100004 bytes, more than") as e:
        reader("huge.png")
    assert e.value.status == "too_large"


def test_a_gs_image_is_staged_through_the_cache(gcs_bucket, gcs_cache, tmp_path):
    cv2.imwrite(str(tmp_path / "x.png"), np.full((40, 60), 90, np.uint8))
    uri = gcs_bucket.upload_file(tmp_path / "x.png", "images/x.png")
    out = ImageReader(_image(size=32), cache=gcs_cache)(uri)
    assert out.shape == (32, 32, 3) and (out[8:24] == 90).all()
    assert gcs_cache.stats.objects == 1
