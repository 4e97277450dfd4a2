"""How to encode PNGs: time and size of each option on real slices (one run, one machine).

    .venv/bin/python bench/png_options.py

Pillow (adaptive filters) at levels 1 and 6 against rows filtered with Up and deflated by zlib
(default or run-length strategy) or by ISA-L (levels 1 and 3); zlib of the raw bytes is the
reference.
"""

import io
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from isal import isal_zlib  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from corpus import find  # noqa: E402
from minipacs.render import encode_png, render  # noqa: E402
from common import per_call_ms  # noqa: E402


def up_filtered(pixels: np.ndarray) -> bytes:
    rows = pixels.reshape(pixels.shape[0], -1)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    out[:, 0] = 2
    out[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])
    return out.tobytes()


def deflate(data: bytes, strategy: int) -> bytes:
    engine = zlib.compressobj(1, zlib.DEFLATED, 15, 8, strategy)
    return engine.compress(data) + engine.flush()


def pillow(pixels: np.ndarray, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def main() -> None:
    print(f"{'file':14s} {'option':28s} {'ms':>8s} {'bytes':>9s}")
    for name in ("693_UNCI.dcm", "MR2_UNCI.dcm", "RG1_UNCI.dcm", "US1_UNCI.dcm"):
        pixels = render(pydicom.dcmread(find(name))).pixels
        runs = max(2, int(2e6 // pixels.size))
        options = {
            "zlib L1 of raw bytes": lambda: zlib.compress(pixels.tobytes(), 1),
            "Pillow L1": lambda: pillow(pixels, 1),
            "Pillow L6": lambda: pillow(pixels, 6),
            "Up + deflate L1 default": lambda: deflate(up_filtered(pixels), zlib.Z_DEFAULT_STRATEGY),
            "Up + deflate L1 RLE": lambda: deflate(up_filtered(pixels), zlib.Z_RLE),
            "Up + ISA-L L3": lambda: isal_zlib.compress(up_filtered(pixels), 3),
            "Up + ISA-L L1 (ours)": lambda: encode_png(pixels, 1),
        }
        for option, encode in options.items():
            print(f"{name:14s} {option:28s} {per_call_ms(encode, runs):8.2f} {len(encode()):9d}")


if __name__ == "__main__":
    main()
