"""Where valid images come from: a folder of DICOM files, or the plugin's PNG store + index.

A source is listed cheaply first (headers or index rows: who is the patient, which study) so the
split can be decided by patient before any pixel is decoded; images are then loaded one at a
time, so a large archive never sits in memory.
"""

import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from minipacs import render, synth

# Window that maps 8-bit display values onto themselves: window_linear(v, 128, 256) == v.
IDENTITY_WINDOW = (128.0, 256.0)

#: The Debian release whose package versions the catalogues pin (realsources.py, realinvalid.py).
PINNED_DEBIAN = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def pinned_apt(cache: Path) -> list[str]:
    """``apt-get`` options that see the pinned release's packages, with a sources list and state
    of their own under ``cache`` (updated once): the same versions whatever Debian this machine
    runs (on Debian 13, Debian 12's are not in the system's lists)."""
    root = Path(cache).resolve() / f"apt-{PINNED_DEBIAN}"
    options = ["-o", f"Dir::Etc::SourceList={root / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
               "-o", f"Dir::State::Lists={root / 'lists'}", "-o", f"Dir::Cache={root / 'cache'}"]
    if not (root / "updated").is_file():
        for folder in (root / "lists" / "partial", root / "cache" / "archives" / "partial"):
            folder.mkdir(parents=True, exist_ok=True)
        (root / "sources.list").write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                                           f"{DEBIAN_MIRROR} {PINNED_DEBIAN} main\n")
        done = subprocess.run(["apt-get", *options, "-q", "update"], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get update of {PINNED_DEBIAN} failed: {done.stderr[-1500:]}")
        (root / "updated").touch()
    return options


@dataclass(frozen=True)
class Candidate:
    """One image of the source, before its pixels are read."""

    key: str  # file path, or PNG path for the index
    patient: str
    study: str


@dataclass
class Valid:
    """A loaded image: display pixels, and the modality values that random windows start from
    (for the PNG store, the display values themselves with the identity window)."""

    pixels: np.ndarray
    values: np.ndarray | None  # None for colour images: no window to vary
    window: tuple[float, float]
    inverted: bool
    anomaly: str | None = None  # synthetic studies mark their anomalous instances
    review: dict | None = None  # a reviewer's verdict on an image of the plugin's index (index_reviews)


def dicom_candidates(root: Path) -> list[Candidate]:
    """Every file under ``root`` that parses as DICOM and has pixel data (headers only)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "Rows" in ds and "PhotometricInterpretation" in ds:
            found.append(Candidate(str(path), str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", ""))))
    return found


def load_dicom(key: str) -> Valid | None:
    """Render the first frame as the plugin does; None if it has no renderable pixel data."""
    try:
        ds = pydicom.dcmread(key)
        shown = render.render(ds)
    except (render.NoPixelData, render.RenderError, InvalidDicomError, ValueError, OSError):
        return None
    anomaly = synth.anomaly_of(ds)
    if shown.window_center is None:  # colour, or a VOI LUT: no window to vary
        return Valid(shown.pixels, None, IDENTITY_WINDOW, False, anomaly)
    values, _ = render.modality_lut(ds, render.decode(ds, 0)[0], 0)
    return Valid(shown.pixels, values, (shown.window_center, shown.window_width), bool(shown.inverted), anomaly)


def index_candidates(database: Path, png_dir: Path) -> list[Candidate]:
    """Rendered images of the plugin's SQLite index, with their PNG in ``png_dir``; not the
    images flagged that nobody reviewed (likely anomalies: not to be learnt as valid)."""
    reviewed = _has_reviews(database)
    unsure = ("AND (i.flagged IS NULL OR i.flagged = 0 OR EXISTS (SELECT 1 FROM reviews r "
              "WHERE r.image = i.orthanc_id))") if reviewed else ""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute(f"""SELECT i.png, p.patient_id, s.study_uid FROM images i
                             JOIN series se ON se.orthanc_id = i.series
                             JOIN studies s ON s.orthanc_id = se.study
                             JOIN patients p ON p.orthanc_id = s.patient
                             WHERE i.status = 'rendered' AND i.png IS NOT NULL {unsure}
                             ORDER BY i.png""").fetchall()
    return [Candidate(str(png_dir / png), patient, study) for png, patient, study in rows
            if (png_dir / png).is_file()]


def _has_reviews(database: Path) -> bool:
    """Whether the index has the reviews table (minipacs.reviews; older indexes do not)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'reviews'").fetchone() is not None


def index_reviews(database: Path, png_dir: Path) -> dict[str, dict]:
    """The current verdict on each reviewed image of the index, by its PNG path (a candidate's
    key): verdict, reason, and what the model in use said (its flag and version)."""
    if not _has_reviews(database):
        return {}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute("""SELECT i.png, i.sop_uid, r.verdict, r.reason, r.model_flagged, r.model_version
                             FROM reviews r JOIN images i ON i.orthanc_id = r.image
                             WHERE r.latest = 1 AND i.png IS NOT NULL""").fetchall()
    return {str(png_dir / png): {"sop": sop, "verdict": verdict, "reason": reason,
                                 "model_flagged": bool(flagged), "model_version": version}
            for png, sop, verdict, reason, flagged, version in rows}


def load_picture(key: str, review: dict | None = None) -> Valid:
    """A PNG/JPEG as display pixels; its grey values stand for modality values."""
    pixels = picture_pixels(Path(key))
    values = pixels.astype(np.float64) if pixels.ndim == 2 else None
    return Valid(pixels, values, IDENTITY_WINDOW, False, review=review)


def picture_pixels(path: Path) -> np.ndarray:
    """An ordinary picture file as uint8 grey or RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L" if image.mode in ("L", "I", "I;16", "1", "P") else "RGB"))


def load_any(key: str) -> Valid | None:
    """A picture file by its suffix, else a DICOM file."""
    if Path(key).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"):
        return load_picture(key)
    return load_dicom(key)


def write_synthetic(folder: Path, patients: int, seed: int, sizes: list[int], slices: int) -> Path:
    """Synthetic studies (``minipacs.synth``, no anomalies) as a DICOM folder tree; patients
    take the matrix ``sizes`` in turn, since real archives mix resolutions."""
    from tqdm import tqdm

    send = synth.write_folder(folder)
    for index in tqdm(range(patients), desc="synthetic patients", unit="patient"):
        send(list(synth.patient_instances(seed, index, sizes[index % len(sizes)], slices, anomalies=0.0)))
    return folder
