"""The gallery: portraits bundled with the packages we depend on anyway (scikit-image's
astronaut, matplotlib's grace_hopper.jpg), so that the server's gallery, the README's
examples, the tests and the benchmarks need no downloads."""

from __future__ import annotations

import numpy as np

PORTRAITS = ("astronaut", "grace_hopper")


def portrait(name: str) -> np.ndarray:
    """A bundled portrait as an RGB uint8 array (a fresh copy the caller may modify)."""
    if name == "astronaut":
        from skimage import data

        return np.ascontiguousarray(data.astronaut())
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as image:
            return np.asarray(image.convert("RGB")).copy()
    raise ValueError(f"unknown portrait {name!r}; choose one of: {', '.join(PORTRAITS)}")
