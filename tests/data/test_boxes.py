"""Boxes of a manifest: parsing, pixels vs fractions, out-of-image and empty boxes, and crops that equal the
numpy slice of the image."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.boxes import Box, BoxError, box_item_id, box_record, crop_array, parse_box, pixel_box
from pipeline.data.images import normalize, normalize_crop


def test_parse_box_reads_the_four_cells_or_none():
    assert parse_box({"x": "", "y": " ", "w": "", "h": ""}, "pixels") is None
    assert parse_box({}, "fractions") is None
    assert parse_box({"x": "10", "y": "20.5", "w": "30", "h": "1e1"}, "pixels") == Box(10, 20.5, 30, 10, "pixels")
    with pytest.raises(BoxError, match=r"incomplete box \(no w, h\)"):
        parse_box({"x": "1", "y": "2"}, "pixels")
    with pytest.raises(BoxError, match="not numbers"):
        parse_box({"x": "a", "y": "2", "w": "3", "h": "4"}, "pixels")
    with pytest.raises(BoxError, match="not finite"):
        parse_box({"x": "nan", "y": "2", "w": "3", "h": "4"}, "pixels")
    with pytest.raises(ValueError, match="box units"):
        parse_box({}, "percent")


def test_pixels_and_fractions_give_the_same_edges():
    assert pixel_box(Box(10, 20, 30, 40, "pixels"), 100, 80) == (10, 20, 40, 60)
    assert pixel_box(Box(0.1, 0.25, 0.3, 0.5, "fractions"), 100, 80) == (10, 20, 40, 60)
    # The unit is the setting's, never the values': a 1-pixel box at the origin is not the whole image.
    assert pixel_box(Box(0, 0, 1, 1, "pixels"), 100, 80) == (0, 0, 1, 1)
    assert pixel_box(Box(0, 0, 1, 1, "fractions"), 100, 80) == (0, 0, 100, 80)
    assert box_record((10, 20, 40, 60)) == "10,20,30,40"
    assert box_item_id("shop/1.jpg", Box(10, 20.5, 30, 40)) == "shop/1.jpg#10,20.5,30,40"


@pytest.mark.parametrize("box,reason", [
    (Box(90, 10, 20, 10), r"not inside the 100×80 image"),
    (Box(-1, 10, 20, 10), r"not inside"),
    (Box(0.5, 0.5, 0.6, 0.2, "fractions"), r"not inside"),
    (Box(10, 10, 0, 10), r"empty box .*width and height must be > 0"),
    (Box(10, 10, 5, -3), r"empty box"),
    (Box(10, 10, 0.3, 5), r"under one pixel"),
])
def test_bad_boxes_say_why(box, reason):
    with pytest.raises(BoxError, match=reason):
        pixel_box(box, 100, 80)


def _png(tmp_path, array, name="img.png"):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return path


def test_a_png_crop_equals_the_numpy_slice(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = _png(tmp_path, array)
    for box in (Box(5, 7, 30, 20), Box(0.5, 0.25, 0.5, 0.75, "fractions"), Box(0, 0, 90, 60)):
        result = normalize((str(path), box))
        assert result.ok and result.format == "png" and result.reencoded
        edges = pixel_box(box, 90, 60)
        got = np.asarray(Image.open(io.BytesIO(result.data)))
        np.testing.assert_array_equal(got, crop_array(array, edges))
        assert (result.width, result.height) == (edges[2] - edges[0], edges[3] - edges[1])
        assert result.box == box_record(edges)
    # Two boxes of one image are two images (their own hashes).
    assert normalize_crop(path, Box(0, 0, 5, 5)).sha256 != normalize_crop(path, Box(1, 0, 5, 5)).sha256


def test_boxes_are_in_the_image_as_displayed(tmp_path):
    """A JPEG with an EXIF rotation: the box is read in the rotated (displayed) image; its crop stays a JPEG."""
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = (250, 10, 10)
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90° clockwise when displayed: 80 × 40 stored → 40 × 80 shown
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=100)
    result = normalize_crop(path, Box(0, 0, 40, 40))       # the top half of the displayed image
    assert result.ok and result.format == "jpeg" and (result.width, result.height) == (40, 40)
    top = np.asarray(Image.open(io.BytesIO(result.data))).astype(int)
    assert abs(top[..., 0].mean() - 250) < 8 and top[..., 2].mean() < 20    # the red half, rotated to the top
    assert "not inside the 40×80 image" in normalize_crop(path, Box(0, 0, 80, 40)).reason


def test_a_crop_of_a_bad_file_or_a_bad_box_is_a_reject_not_a_crash(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert normalize_crop(tmp_path / "broken.png", Box(0, 0, 1, 1)).reason in ("truncated image", "corrupt image")
    assert normalize_crop(tmp_path / "missing.png", Box(0, 0, 1, 1)).reason == "file not found"
    path = _png(tmp_path, np.zeros((10, 10, 3), np.uint8))
    assert "not inside the 10×10 image" in normalize_crop(path, Box(5, 5, 6, 2)).reason
    assert normalize_crop(path, Box(2, 2, 6, 6), max_side=3).width == 3
