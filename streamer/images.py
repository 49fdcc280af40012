"""One loader for portraits: a file for `animate`, an upload's bytes for `serve`.

Any image Pillow reads becomes upright (EXIF orientation applied) uint8 RGB, transparency
flattened onto white, at most `max_side` pixels a side. Memory stays bounded whatever is
sent: JPEG decodes straight at 1/2..1/8 scale, and an image that would still decode to more
than `max_pixels` is refused from its header, before a pixel is decoded. Every failure is an
`ImageError` whose message says what is wrong in words (no Python internals).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engines.face import MAX_SIDE, downscale

MAX_PIXELS = 40_000_000  # an upload decodes to at most this (after JPEG's reduced decode): ~160 MB as RGBA
# A local file (`animate`): the user's own photo, read once, so up to Pillow's own bomb limit
# (a 100 MP camera raw export decodes; a true decompression bomb is still refused).
FILE_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF"
# What an upload (anyone's bytes) is opened as, no more: Pillow knows ~40 formats, some of them
# rarely exercised, and loads EPS by running Ghostscript on it. A local file may be any.
# (A phone's multi-picture JPEG opens through JPEG.)
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


class ImageError(ValueError):
    """The image cannot be used; the message says why."""


class ImageTooLarge(ImageError):
    """The image has more pixels than the budget allows."""


def read_image(source: bytes | str | os.PathLike, what: str = "image", max_pixels: int = MAX_PIXELS,
               max_side: int = MAX_SIDE) -> np.ndarray:
    """An image file (a path) or an upload (bytes) -> RGB uint8, upright, <= max_side a side.
    `what` is how messages name it ("source image", "the upload"; a path follows it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = what
        if not source:
            raise ImageError(f"{label} is empty: send an image file ({FORMATS})")
        opened = io.BytesIO(source)
        formats = UPLOAD_FORMATS
    else:
        path = os.fspath(source)
        label = f"{what} {path}"
        if not os.path.exists(path):
            raise ImageError(f"{what} not found: {path}")
        if os.path.isdir(path):
            raise ImageError(f"{what} is a directory, not a file: {path}")
        opened = path
        formats = None  # every format Pillow reads
    try:
        with warnings.catch_warnings():
            # The pixel budget below is the real limit; Pillow's own warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opened, formats=formats) as image:
                return _decode(image, label, max_pixels, max_side)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{label} has far too many pixels to decode safely") from None
    except UnidentifiedImageError:
        if isinstance(opened, str):  # a file: say which library did not know it
            raise ImageError(f"cannot read {label}: not an image format Pillow knows") from None
        raise ImageError(f"{label} is not an image this server can read (it takes {FORMATS})") from None
    except PermissionError:
        raise ImageError(f"cannot read {label}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError):  # Pillow's words for damaged data
        raise ImageError(f"cannot read {label}: its image data is damaged or truncated") from None


def _decode(image: Image.Image, name: str, max_pixels: int, max_side: int) -> np.ndarray:
    scale = max_side / max(image.size)
    if scale < 1:  # JPEG decodes straight at a fraction of its size; other formats ignore this
        image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); "
                            f"at most {max_pixels / 1e6:.0f} megapixels are accepted: scale it down first")
    image.load()
    factor = max(image.size) // max_side
    if factor >= 2:  # a cheap box reduction first: the copies below stay small
        image = image.reduce(factor)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat.alpha_composite(image)
        image = flat
    rgb = np.asarray(image.convert("RGB"))
    return downscale(rgb, max_side)


def source_image(spec: str) -> np.ndarray:
    """A portrait named on the command line: an image file (any format Pillow reads, up to
    Pillow's own bomb limit), or a bundled portrait's name (a file of that name wins). The one
    loader of every command that takes one; raises ImageError."""
    from .samples.gallery import PORTRAITS, portrait

    if not os.path.exists(spec) and spec in PORTRAITS:
        return portrait(spec)
    return read_image(spec, what="source image", max_pixels=FILE_MAX_PIXELS)
