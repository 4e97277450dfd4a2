"""The real-world DICOM corpus the tests use: files we did not write."""

from pathlib import Path

import pydicom
import pydicom.data


def pydicom_test_files() -> list[Path]:
    """pydicom's bundled test files (CT, MR, RT, SR, compressed, deliberately broken...)."""
    return sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


def pydicom_data_files() -> list[Path]:
    """The ``pydicom-data`` package: CR MONOCHROME1, US palette, JPEG/J2K/RLE, multi-frame."""
    import data_store

    return sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))


def scan_frames(modalities=("CT", "MR", "CR", "DX")):
    """``(file name, frame, display pixels)`` of every frame of the corpus' images of these
    modalities, rendered by minipacs; the deliberately broken files, which do not render, skipped."""
    from minipacs import render

    for path in pydicom_test_files() + pydicom_data_files():
        ds = pydicom.dcmread(path, force=True)
        if ds.get("Modality") not in modalities or "PixelData" not in ds:
            continue
        for frame in range(int(ds.get("NumberOfFrames") or 1)):
            try:
                pixels = render.render(ds, frame).pixels
            except Exception:  # data no decoder reads
                break
            yield path.name, frame, pixels


def find(name: str) -> Path:
    for path in pydicom_test_files() + pydicom_data_files():
        if path.name == name:
            return path
    raise FileNotFoundError(name)
