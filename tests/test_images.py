"""The one portrait loader (uploads and `animate`): what comes out, and what is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from streamer.images import MAX_PIXELS, ImageError, ImageTooLarge, read_image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_transparency_is_flattened_onto_white_and_exif_orientation_applied():
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 20, 30))
    out = read_image(encoded(rgba, "PNG"))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert tuple(out[15, 5]) == (200, 10, 10) and tuple(out[15, 35]) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rotated = read_image(encoded(Image.new("RGB", (40, 30), (90, 90, 90)), "JPEG", exif=exif))
    assert rotated.shape == (40, 30, 3)


def test_large_images_come_out_at_most_max_side_and_jpeg_decodes_reduced():
    png = read_image(encoded(Image.new("RGB", (6000, 3000), (90, 120, 150)), "PNG"))
    assert png.shape == (1024, 2048, 3) and abs(int(png[500, 1000, 2]) - 150) <= 1
    # 60 megapixels as JPEG: over the budget at full size, but decoded at 1/4 it is 3.75 MP.
    jpeg = read_image(encoded(Image.new("RGB", (10_000, 6_000), (90, 120, 150)), "JPEG", quality=50))
    assert max(jpeg.shape) == 2048


@pytest.mark.parametrize("data, error, words", [
    (b"", ImageError, "is empty"),
    (encoded(Image.new("RGB", (300, 300), (90, 90, 90)), "JPEG")[:300], ImageError, "damaged or truncated"),
    (b"plain text", ImageError, "is not an image this server can read"),
])
def test_bad_uploads_are_refused_in_words(data, error, words):
    with pytest.raises(error, match=words) as caught:
        read_image(data, "the upload")
    assert "0x" not in str(caught.value) and "BytesIO" not in str(caught.value)


def test_an_image_over_the_pixel_budget_is_refused_from_its_header():
    big = encoded(Image.new("L", (8000, 6000)), "PNG")  # 48 MP
    assert 8000 * 6000 > MAX_PIXELS
    with pytest.raises(ImageTooLarge, match="48 megapixels"):
        read_image(big, "the upload")


def test_files_name_their_path(tmp_path):
    with pytest.raises(ImageError, match="source image not found: "):
        read_image(tmp_path / "missing.png", "source image")
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path, "source image")
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageError, match=f"cannot read source image {path}: not an image format Pillow knows"):
        read_image(path, "source image")
