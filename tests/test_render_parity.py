"""Our renders against DCMTK's renderer (the reference), run live on real files: ``dcm2img``
where the release has it (DCMTK 3.6.8+, Debian 13: 3.6.9), else ``dcmj2pnm``/``dcml2pnm``
(DCMTK 3.6.7, Debian 12). Both give the same pixels on every file below: 3.6.8 renamed dcm2pnm to
dcm2img and merged the JPEG and JPEG-LS decoders into it, and left its rendering as it was (the
old names remain, deprecated, as aliases of dcm2img).

Every image of pydicom's test files and of pydicom-data is rendered by us and by DCMTK with the
same VOI choice (``+Wi n`` for a dataset window, ``+Ww c w`` for a functional-group window,
``+Wl 1`` for a VOI LUT, ``+Wm`` without either) and must be pixel-identical, unless it is
listed below with the reason.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from corpus import find, pydicom_data_files, pydicom_test_files
from minipacs.render import RenderError, render

# DCMTK cannot render these at all.
DCMTK_REFUSES = {
    **dict.fromkeys(["SC_rgb_32bit.dcm", "SC_rgb_32bit_2frame.dcm", "SC_rgb_expb_32bit.dcm",
                     "SC_rgb_expb_32bit_2frame.dcm", "SC_rgb_rle_32bit.dcm",
                     "SC_rgb_rle_32bit_2frame.dcm"],
                    "DCMTK refuses 32-bit colour samples ('Unsupported element value')"),
    **dict.fromkeys(["gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"],
                    "DCMTK cannot read segmented palette colour LUTs"),
    "SC_rgb_jpeg.dcm": "the file ends before the pixel data's sequence delimiter; DCMTK stops "
                       "reading ('premature end of stream'), pydicom decodes the complete JPEG frame",
}
# DCMTK (3.6.7 and 3.6.9 alike) has no JPEG 2000 decoder: lossless files must equal their
# uncompressed twin, and lossy ones the twin holding the decompressed pixels.
J2K_TWINS = {
    "MR_small_jp2klossless.dcm": "MR_small.dcm", "693_J2KR.dcm": "693_UNCR.dcm",
    "MR2_J2KR.dcm": "MR2_UNCR.dcm", "RG1_J2KR.dcm": "RG1_UNCR.dcm", "RG3_J2KR.dcm": "RG3_UNCR.dcm",
    "US1_J2KR.dcm": "US1_UNCR.dcm", "emri_small_jpeg_2k_lossless.dcm": "emri_small.dcm",
    "693_J2KI.dcm": "693_UNCI.dcm", "MR2_J2KI.dcm": "MR2_UNCI.dcm", "RG1_J2KI.dcm": "RG1_UNCI.dcm",
    "US1_J2KI.dcm": "US1_UNCI.dcm",
}
J2K_WITHOUT_REFERENCE = {"RG3_J2KI.dcm", "GDCMJ2K_TextGBR.dcm", "J2K_pixelrep_mismatch.dcm",
                         "JPEG2000.dcm", "SC_rgb_gdcm_KY.dcm", "examples_jpeg2k.dcm",
                         "explicit_VR-UN.dcm"}
# DCMTK is wrong: it renders these differently from their little-endian twins, which match us.
DCMTK_WRONG = {
    "rtdose_expb.dcm": "rtdose.dcm", "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm",
}
# Lossy JPEG: DCMTK decodes with IJG 6b, we with libjpeg (pylibjpeg); their inverse DCTs and
# chroma upsampling round differently. Bound on the difference and why.
LOSSY_DECODERS = {
    "JPGExtended.dcm": 1, "SC_jpeg_no_color_transform.dcm": 1,
    "SC_jpeg_no_color_transform_2.dcm": 1, "SC_rgb_jpeg_app14_dcmd.dcm": 1,
    "SC_rgb_dcmtk_+eb+cr.dcm": 1, "SC_rgb_jpeg_lossy_gdcm.dcm": 2,
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": 2, "SC_rgb_dcmtk_+eb+cy+np.dcm": 2,
    "examples_ybr_color.dcm": 3, "color3d_jpeg_baseline.dcm": 5,
}
# We refuse these with a specific error; each is recorded as render_failed in the index.
WE_REFUSE = {
    "badVR.dcm": "invalid Number of Frames",  # '1A' is no Integer String; DCMTK reads 1
    "JPEG-lossy.dcm": "JPEG Extended",  # pylibjpeg fails on it; the plugin falls back to Orthanc
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000",  # no decoder handles it
    "MR_truncated.dcm": "less than expected",  # DCMTK refuses it too
}
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
DCM2IMG = shutil.which("dcm2img")


def images() -> list[Path]:
    found = []
    for path in pydicom_test_files() + pydicom_data_files():
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
        except Exception:
            continue
        if "PixelData" in ds and "BitsAllocated" in ds:
            found.append(path)
    return found


def dcmtk_render(path: Path, ds, shown, out: Path) -> np.ndarray:
    """DCMTK's rendering with the VOI we chose: dcm2img, or before 3.6.8 dcm2pnm's variants
    with a JPEG (dcmj2pnm) or JPEG-LS (dcml2pnm) decoder."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    tool = DCM2IMG or ("dcml2pnm" if syntax in JPEG_LS else "dcmj2pnm")
    voi = {"dataset": ["+Wi", "1"], "voi_lut": ["+Wl", "1"], "minmax": ["+Wm"],
           "functional_group": ["+Ww", repr(shown.window_center), repr(shown.window_width)],
           None: []}[shown.window_source]
    done = subprocess.run([tool, *voi, "--write-png", str(path), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return np.asarray(Image.open(out)).astype(np.int64)


def ours(name: str) -> np.ndarray:
    return render(pydicom.dcmread(find(name), force=True)).pixels.astype(np.int64)


@pytest.mark.parametrize("path", images(), ids=lambda p: p.name)
def test_render_matches_dcmtk(path, tmp_path):
    name = path.name
    ds = pydicom.dcmread(path, force=True)
    if name in WE_REFUSE:
        with pytest.raises(RenderError, match=WE_REFUSE[name]):
            render(ds)
        return
    shown = render(ds)
    mine = shown.pixels.astype(np.int64)
    if name in J2K_TWINS:
        assert np.array_equal(mine, ours(J2K_TWINS[name]))
        return
    if name in J2K_WITHOUT_REFERENCE or name in DCMTK_REFUSES:
        assert mine.size and mine.dtype == np.int64  # rendered; nothing to compare with
        return
    if name in DCMTK_WRONG:
        twin = find(DCMTK_WRONG[name])
        twin_ds = pydicom.dcmread(twin)
        assert np.array_equal(mine, ours(twin.name))
        assert np.array_equal(mine, dcmtk_render(twin, twin_ds, render(twin_ds), tmp_path / "t.png"))
        assert not np.array_equal(mine, dcmtk_render(path, ds, shown, tmp_path / "r.png"))
        return
    reference = dcmtk_render(path, ds, shown, tmp_path / "r.png")
    assert reference.shape == mine.shape
    difference = int(np.abs(reference - mine).max())
    assert difference <= LOSSY_DECODERS.get(name, 0), f"max abs difference {difference}"


def test_every_listed_file_exists():
    names = {p.name for p in pydicom_test_files() + pydicom_data_files()}
    listed = (set(DCMTK_REFUSES) | set(J2K_TWINS) | set(J2K_TWINS.values()) | J2K_WITHOUT_REFERENCE
              | set(DCMTK_WRONG) | set(LOSSY_DECODERS) | set(WE_REFUSE))
    assert listed <= names, listed - names
