"""The invalid class: what an archive shows when something went wrong.

Four families, each a subfolder of ``invalid/``:

* pictures that are no medical image: the sample pictures installed with scikit-image and
  matplotlib (only files inside the packages: nothing is downloaded), ``synth.photograph``,
  and generated textures, charts and screen captures;
* valid images with a message/error box burned in (random text, size, grey, place, font);
* broken renders of valid images: black/white, saturated window, corrupted rows, heavy noise,
  half-decoded;
* a user folder of custom invalid pictures.
"""

import io
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
import skimage
from PIL import Image, ImageDraw, ImageFont

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minipacs import render, synth  # noqa: E402
from training.sources import Valid, picture_pixels  # noqa: E402

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff"}
# The Shepp-Logan phantom is a CT slice in all but name: not a counter-example.
NOT_INVALID = {"phantom.png"}
WORDS = ("error", "failed", "warning", "series", "cannot", "load", "image", "server", "timeout",
         "access", "denied", "memory", "exception", "retry", "cancel", "OK", "license", "expired",
         "network", "disk", "full", "patient", "unknown", "0x004F3A2C", "connection", "lost")


@cache
def package_pictures() -> tuple[Path, ...]:
    """Picture files that ship inside scikit-image and matplotlib (those Pillow can read)."""
    folders = [Path(skimage.__file__).parent / "data", Path(matplotlib.get_data_path()) / "sample_data"]
    return tuple(sorted(p for folder in folders for p in folder.rglob("*")
                        if p.suffix.lower() in PICTURE_SUFFIXES and p.name not in NOT_INVALID and readable(p)))


def readable(path: Path) -> bool:
    try:
        picture_pixels(path)
        return True
    except (OSError, ValueError):
        return False


@cache
def fonts() -> tuple[Path, ...]:
    """TrueType/OpenType fonts of the system, and matplotlib's own (always there)."""
    found = [p for p in Path("/usr/share/fonts").rglob("*") if p.suffix.lower() in (".ttf", ".otf")]
    found += (Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf")
    return tuple(sorted(found))


def random_font(rng, size: int) -> tuple[ImageFont.FreeTypeFont, str]:
    path = fonts()[int(rng.integers(len(fonts())))]
    return ImageFont.truetype(str(path), size), path.name


def random_text(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)).capitalize()


def picture(rng, choices=None) -> tuple[np.ndarray, dict]:
    """A random view of a packaged picture (among ``choices``), or a drawn landscape photograph.

    The packages ship few pictures, so each is seen many ways: a crop of 30–100 % of each side,
    one of the 8 orientations, and another exposure (a gamma), as a photograph would differ."""
    choices = package_pictures() if choices is None else choices
    pick = int(rng.integers(len(choices) + 1))
    if pick == len(choices):
        return synth.photograph(rng), {"picture": "synth.photograph"}
    pixels = picture_pixels(choices[pick])
    h, w = pixels.shape[:2]
    scale = rng.uniform(0.3, 1.0)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    k, flip = divmod(int(rng.integers(8)), 2)
    crop = pixels[y:y + ch, x:x + cw]
    view = np.rot90(crop[:, ::-1] if flip else crop, k)
    gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    exposed = (255 * (view / 255.0) ** gamma).astype(np.uint8)
    return np.ascontiguousarray(exposed), {"picture": choices[pick].name, "crop": [y, x, ch, cw],
                                           "rot90": k, "flip": bool(flip), "gamma": round(gamma, 3)}


def texture(rng, size: int = 256) -> tuple[np.ndarray, dict]:
    """Noise, stripes, checkerboards, gradients and smooth blobs: structure without anatomy."""
    kind = str(rng.choice(["noise", "stripes", "checker", "gradient", "blobs"]))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    if kind == "noise":
        img = rng.normal(0.5, rng.uniform(0.05, 0.3), (size, size))
    elif kind == "stripes":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 40)
        img = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    elif kind == "checker":
        n = int(rng.integers(2, 24))
        img = ((xx * n).astype(int) + (yy * n).astype(int)) % 2 * rng.uniform(0.3, 1.0)
    elif kind == "gradient":
        img = xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)
    else:
        small = rng.random((int(rng.integers(3, 12)),) * 2)
        img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)) / 255.0
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-9)
    return (img * 255).astype(np.uint8), {"texture": kind}


def chart(rng) -> tuple[np.ndarray, dict]:
    """A matplotlib chart (line, bar, scatter, pie, histogram) as a report screenshot shows it."""
    kind = str(rng.choice(["line", "bar", "scatter", "pie", "hist"]))
    fig, ax = plt.subplots(figsize=(rng.uniform(3, 6), rng.uniform(2.5, 5)), dpi=int(rng.integers(50, 100)))
    n = int(rng.integers(5, 40))
    if kind == "line":
        ax.plot(np.cumsum(rng.normal(size=(n, int(rng.integers(1, 4)))), axis=0))
    elif kind == "bar":
        ax.bar(range(n // 3 + 2), rng.random(n // 3 + 2))
    elif kind == "scatter":
        ax.scatter(rng.random(n * 5), rng.random(n * 5), s=8)
    elif kind == "pie":
        ax.pie(rng.random(int(rng.integers(2, 7))))
    else:
        ax.hist(rng.normal(size=n * 20), bins=int(rng.integers(5, 30)))
    ax.set_title(random_text(rng, 3))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB")), {"chart": kind}


def screen(rng) -> tuple[np.ndarray, dict]:
    """A desktop application window: title bar, menu, text, buttons, a table."""
    w, h = int(rng.integers(320, 900)), int(rng.integers(240, 700))
    background = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    font, name = random_font(rng, int(rng.integers(10, 20)))
    bar = int(rng.integers(18, 32))
    draw.rectangle((0, 0, w, bar), fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
    draw.text((8, 3), random_text(rng, 3), fill="white", font=font)
    y = bar + 8
    while y < h - 30:
        element = rng.integers(3)
        if element == 0:
            draw.text((10, y), random_text(rng, int(rng.integers(3, 10))), fill="black", font=font)
        elif element == 1:
            x = int(rng.integers(10, w // 2))
            draw.rectangle((x, y, x + 80, y + 22), fill=(220, 220, 220), outline="black")
            draw.text((x + 8, y + 3), random_text(rng, 1), fill="black", font=font)
        else:
            for col in range(0, w, int(rng.integers(60, 160))):
                draw.line((col, y, col, y + 60), fill="grey")
            y += 60
        y += int(rng.integers(20, 40))
    return np.asarray(img), {"screen": f"{w}x{h}", "font": name}


def message_box(image: Valid, rng) -> tuple[np.ndarray, dict]:
    """A valid image with a message box burned in: random text, size, grey, place and font."""
    img = Image.fromarray(image.pixels)
    draw = ImageDraw.Draw(img)
    w, h = img.size
    # Sizes and greys are drawn so that the box still shows once the image is shrunk to the
    # model's input: text at least 4 % of the side, a box at least a third as wide, a fill that
    # stands out from the pixels it covers.
    size = max(6, int(min(w, h) * rng.uniform(0.04, 0.08)))
    font, name = random_font(rng, size)
    lines = [random_text(rng, int(rng.integers(2, 6))) for _ in range(int(rng.integers(1, 4)))]
    bw, bh = int(w * rng.uniform(0.35, 0.8)), int(len(lines) * size * 1.5 + size * 2)
    x0, y0 = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
    under = float(np.mean(image.pixels[y0:y0 + bh, x0:x0 + bw]))
    grey = int(rng.integers(0, 256))
    grey = grey if abs(grey - under) > 50 else int(under + 128) % 256
    ink = int(rng.integers(0, 256))
    ink = ink if abs(ink - grey) > 60 else 255 - grey
    fill, text = ((grey,) * 3, (ink,) * 3) if img.mode == "RGB" else (grey, ink)
    draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=fill, outline=text)
    for i, line in enumerate(lines):
        draw.text((x0 + size, y0 + size + i * size * 1.5), line, fill=text, font=font)
    return np.asarray(img), {"text": " / ".join(lines), "font": name, "font_size": size,
                             "box": [x0, y0, bw, bh], "grey": grey, "ink": ink}


def broken(image: Valid, rng) -> tuple[np.ndarray, dict]:
    """A render gone wrong: constant, saturated window, corrupted rows, noise, half decoded."""
    kind = str(rng.choice(["black", "white", "saturated", "corrupted_rows", "noise", "half_decoded"]))
    pixels, params = image.pixels, {}
    if kind in ("black", "white"):
        out = np.full_like(pixels, 0 if kind == "black" else 255)
        noise = rng.integers(0, 4, out.shape)
        out = (out + noise if kind == "black" else out - noise).astype(np.uint8)
    elif kind == "saturated":  # a window beyond the edge of the range: nearly all black or white
        # At most 0.3 % of the pixels escape: at 2 % a CT under a high window still shows its
        # bones, which is a bone window (valid), not a broken one. The window lies just past
        # the quantile, so the many pixels equal to it (air) clip too instead of turning grey.
        values = image.values if image.values is not None else pixels.astype(np.float64)
        edge = rng.uniform(0.0, 0.003)
        width = max(2.0, float(np.ptp(values)) * rng.uniform(0.0, 0.01))
        if rng.random() < 0.5:  # all but the darkest pixels white
            center = float(np.quantile(values, edge)) - width / 2
        else:  # all but the brightest black
            center = float(np.quantile(values, 1 - edge)) + width / 2
        out = render.window_linear(values, center, width)
        params = {"window_center": round(center, 2), "window_width": round(width, 2)}
    elif kind == "corrupted_rows":
        out = synth.corrupt_rows(pixels, rng)
    elif kind == "noise":
        sigma = rng.uniform(60, 160)
        out = np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)
        params = {"sigma": round(sigma, 1)}
    else:  # the rest grey or white, or the last decoded row smeared down (black is ambiguous)
        cut = int(pixels.shape[0] * rng.uniform(0.2, 0.7))
        fill = str(rng.choice(["grey", "white", "smear"]))
        out = pixels.copy()
        out[cut:] = {"grey": 128, "white": 255, "smear": pixels[cut - 1:cut]}[fill]
        params = {"decoded_rows": cut, "fill": fill}
    return out, {"broken": kind, **params}


#: Subfolder → generator of an invalid image from nothing, and from a valid image.
GENERATED = {"pictures": picture, "textures": texture, "charts": chart, "screens": screen}
DERIVED = {"message_box": message_box, "broken": broken}
