"""The one image decoder, shared by prepare, features, export and predict.

``open_rgb`` turns a file into an RGB image and ``load_pixels`` resizes it into the model's
input, so that the features stage, the exported ONNX model and batch prediction can never
disagree about preprocessing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

# Refuse images above this many pixels (a 16k x 16k photo) instead of letting one crafted file
# exhaust memory: PIL only warns below 2x its own limit, so we turn the warning into an error.
MAX_PIXELS = 16_384 * 16_384
# Pixels converted at a time where a whole-image copy would multiply memory (16-bit scaling,
# hashing decoded pixels): 2 Mi pixels, 16 MiB as float64.
DECODE_BAND_PIXELS = 1 << 21

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_EXIF_ORIENTATION = 0x0112


class UnreadableImageError(ValueError):
    """The file cannot be decoded as an image; the message says why, for the validation report."""


def open_rgb(path: Path) -> Image.Image:
    """Decode a file fully into an RGB image with its EXIF orientation applied.

    Raises:
        UnreadableImageError: empty, truncated, not an image, or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError("empty file (0 bytes)")
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                # In place: a copy would double the decoded pixels held at once.
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb(image)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImageError(
            f"image too large to decode safely (limit {MAX_PIXELS} pixels): {error}"
        ) from None
    except UnidentifiedImageError:
        raise UnreadableImageError("not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"cannot decode: {error}") from None
    except Exception as error:  # noqa: BLE001 - crafted files make PIL raise EOFError, struct.error...
        raise UnreadableImageError(f"cannot decode ({type(error).__name__}: {error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting PIL clip everything above 255.
        # A band of rows at a time: a float64 copy of a 16k x 16k image would take 2 GiB, where
        # the bands add 16 MiB at most. The arithmetic per pixel is the same as on the whole
        # array, so the 8-bit values (and the pixel hash that decides the split) do not move.
        width, height = image.size
        rows = max(1, DECODE_BAND_PIXELS // max(width, 1))

        def band(start: int) -> np.ndarray:
            crop = image.crop((0, start, width, min(start + rows, height)))
            return np.asarray(crop, dtype=np.float64)

        starts = range(0, height, rows)
        top = max([1.0, *(float(band(start).max()) for start in starts)])
        scaled = np.empty((height, width), dtype=np.uint8)
        for start in starts:
            scaled[start : start + rows] = (band(start) * (255.0 / top)).astype(np.uint8)
        image.close()  # the 16-bit pixels go before the RGB copy is made
        image = Image.fromarray(scaled)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels onto white rather than the undefined colour under them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_pixels(path: Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode and resize one file to uint8 CHW pixels: the model's input, 0..255.

    Normalisation is *not* applied here: it lives inside the model (and the exported ONNX
    graph), so that every consumer feeds raw pixels. Greyscale files without an EXIF rotation
    (ELPV's) are resized in one channel and then repeated, which gives identical pixels to
    resizing the RGB conversion for a third of the work.
    """
    resample = _RESAMPLING[interpolation]
    try:
        with Image.open(path) as image:
            if image.mode == "L" and not image.getexif().get(_EXIF_ORIENTATION):
                plane = np.asarray(image.resize((size, size), resample))
                return np.repeat(plane[None], 3, axis=0)
    except (OSError, ValueError, SyntaxError):
        pass  # let open_rgb raise its readable error
    resized = open_rgb(path).resize((size, size), resample)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_model_input(path: Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """``load_pixels`` as float32: the input layout of the exported ONNX model."""
    return load_pixels(path, size, interpolation).astype(np.float32)
