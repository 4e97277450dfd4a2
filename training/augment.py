"""Valid-class augmentations, on the 8-bit display pixels before ``preprocess.model_input``.

Each is a change a real archive shows without the image being wrong: another window (from the
modality values, through the plugin's ``render.window_linear``), a slightly softer
reconstruction, another orientation, another field of view, a smaller matrix. Each returns the pixels and the
random parameters it drew, which go into the manifest.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from minipacs import render
from training.sources import Valid


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random parameters (command-line options of the same names)."""

    window_shift: float = 0.3  # centre moves by up to this fraction of the width
    window_scale: tuple[float, float] = (0.5, 2.0)  # width multiplied by a log-uniform factor
    blur_sigma: tuple[float, float] = (0.4, 2.0)
    # < 1 shrinks into a border of the image's own background, > 1 crops. Beyond 1.6× a crop of
    # a 128-pixel slice is a featureless blur, which is what a broken render looks like.
    zoom: tuple[float, float] = (0.75, 1.6)


def random_window(image: Valid, rng, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    """The image under a random window near its own (colour images are left unchanged)."""
    if image.values is None:
        return image.pixels, {}
    center, width = image.window
    width2 = width * float(np.exp(rng.uniform(*np.log(cfg.window_scale))))
    center2 = center + rng.uniform(-cfg.window_shift, cfg.window_shift) * width
    low, high = (255.0, 0.0) if image.inverted else (0.0, 255.0)
    pixels = render.window_linear(image.values, center2, max(width2, 2.0), low, high)
    return pixels, {"window_center": round(center2, 2), "window_width": round(max(width2, 2.0), 2)}


def blur(image: Valid, rng, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    sigma = rng.uniform(*cfg.blur_sigma)
    pixels = Image.fromarray(image.pixels).filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(pixels), {"sigma": round(sigma, 3)}


def flip_rotate(image: Valid, rng, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    """One of the 7 other orientations of the dihedral group (never the identity)."""
    k, flip = divmod(int(rng.integers(1, 8)), 2)
    pixels = np.rot90(image.pixels[:, ::-1] if flip else image.pixels, k)
    return np.ascontiguousarray(pixels), {"rot90": k, "flip": bool(flip)}


def zoom(image: Valid, rng, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    """Zoom about a random point, under a random window as well."""
    pixels, params = random_window(image, rng, cfg)
    factor = float(np.exp(rng.uniform(*np.log(cfg.zoom))))
    h, w = pixels.shape[:2]
    if factor >= 1:
        ch, cw = int(h / factor), int(w / factor)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = Image.fromarray(pixels[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BILINEAR)
    else:
        small = Image.fromarray(pixels).resize((max(1, int(w * factor)), max(1, int(h * factor))),
                                               Image.Resampling.BILINEAR)
        # The field of view goes on beyond the image: pad with its border's median (air), not a
        # black frame, which around a bright radiograph draws a box like a burned-in dialog.
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        out = Image.new(small.mode, (w, h), tuple(int(v) for v in np.median(border, axis=0).ravel())
                        if pixels.ndim == 3 else int(np.median(border)))
        y, x = int(rng.integers(0, h - small.height + 1)), int(rng.integers(0, w - small.width + 1))
        out.paste(small, (x, y))
    return np.asarray(out), {**params, "zoom": round(factor, 3)}


def matrix(image: Valid, rng, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    """The same anatomy acquired on a smaller matrix (48–160 pixels on the long side, as small
    MR fields of view, scouts and thumbnails are): the model sees it resized up from there."""
    h, w = image.pixels.shape[:2]
    side = min(int(rng.integers(48, 161)), int(max(h, w) * 0.8))  # always smaller than it was
    scale = side / max(h, w)
    small = Image.fromarray(image.pixels).resize((max(8, round(w * scale)), max(8, round(h * scale))),
                                                 Image.Resampling.BOX)
    return np.asarray(small), {"matrix": [small.height, small.width]}


#: Subfolder name → augmentation, in the order they are cycled through.
AUGMENTATIONS = {"window": random_window, "blur": blur, "flip_rotate": flip_rotate, "zoom": zoom,
                 "matrix": matrix}
