"""training.realinvalid: real pictures fetched from a package registry, real dialogs captured on
Xvfb, and the broken renders made from a valid image's own values.

Runs with the rest of the suite (the module needs numpy, Pillow and pydicom, not TensorFlow or
scikit-image); the fetch needs apt-get and the Debian archive, the capture Xvfb."""

import shutil
import time

import numpy as np
import pytest

from training import realinvalid
from training.sources import Valid

SMALL = next(s for s in realinvalid.PICTURE_SOURCES if s.name == "sway-backgrounds")  # 4.8 MB


def ct_like(size=128, seed=0) -> Valid:
    """A CT-like slice: HU values (air -1000, tissue ~40, bone ~700) under a soft-tissue window."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    values = np.where(r < size * 0.4, 40.0, -1000.0) + rng.normal(0, 10, (size, size))
    values[r < size * 0.1] = 700.0
    from minipacs import render
    pixels = render.window_linear(values, 40.0, 400.0)
    return Valid(pixels, values, (40.0, 400.0), False)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb missing: not a Debian system")
    cache = tmp_path_factory.mktemp("cache")
    try:
        t = time.time()
        root = realinvalid.fetch_source(SMALL, cache)
    except realinvalid.FetchError as e:
        pytest.skip(f"the registry refused: {e}")
    return cache, root, time.time() - t


def test_fetch_is_cached(fetched):
    cache, root, first = fetched
    assert root == realinvalid.package_dir("debian", SMALL.package, SMALL.version, cache.resolve())
    assert (root / ".fetched").is_file()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    t = time.time()
    again = realinvalid.fetch_source(SMALL, cache)
    assert again == root and time.time() - t < 0.5
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_refused_package_is_a_clear_error(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get missing")
    with pytest.raises(realinvalid.FetchError, match="refused no-such-package-minipacs"):
        realinvalid.fetch("debian", "no-such-package-minipacs", "1.0-1", tmp_path)
    assert not (realinvalid.package_dir("debian", "no-such-package-minipacs", "1.0-1", tmp_path) / ".fetched").exists()


def test_pictures_decode_and_groups_are_distinct(fetched):
    cache, _, _ = fetched
    found = realinvalid.pictures(cache, np.random.default_rng(0), sources=[SMALL], download=False)
    # Sway ships one blue wallpaper at 8 sizes and orientations: one picture per group.
    assert found and len({p.group for p in found}) == len(found)
    assert all(p.source.startswith("debian:sway-backgrounds=1.7-6:") for p in found)
    for p in found:
        pixels = realinvalid.read_picture(p.path)
        assert pixels.dtype == np.uint8 and pixels.ndim in (2, 3) and max(pixels.shape[:2]) <= realinvalid.MAX_SIDE
    pixels, params = realinvalid.artwork(np.random.default_rng(1), found)
    assert pixels.dtype == np.uint8 and min(pixels.shape[:2]) >= 16 and params["picture"].startswith("debian:")


def test_resolution_variants_share_a_group():
    source = realinvalid.PICTURE_SOURCES[0]
    assert realinvalid._group_of(source, "a/Elephants_3840x2160.jpg") == realinvalid._group_of(source, "a/Elephants.jpg")
    assert realinvalid._group_of(source, "w/Kite/contents/images/1920x1080.jpg") == \
        realinvalid._group_of(source, "w/Kite/contents/images/800x600.jpg")


def capture(tmp_path_factory, **options):
    """Dialogs captured on Xvfb into a fresh cache (the test is skipped where Xvfb is missing):
    the cache and ``capture_dialogs``' summary."""
    reason = realinvalid.xvfb_missing()
    if reason:
        pytest.skip(f"no dialog capture here: {reason}")
    cache = tmp_path_factory.mktemp("dialogs")
    return cache, realinvalid.capture_dialogs(cache, **options)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    return capture(tmp_path_factory, dialogs=6, windows=2, seed=1, budget_s=60)


def test_dialog_capture_gives_distinct_images(captured):
    cache, done = captured
    files = realinvalid.dialog_files(cache)
    assert done["made_dialogs"] == len(files) >= 4
    from PIL import Image
    shots = [np.asarray(Image.open(f)) for f in files]
    assert all(s.ndim == 3 and min(s.shape[:2]) >= 20 and np.ptp(s) >= realinvalid.BLANK_SHOT for s in shots)
    assert len({s.tobytes() for s in shots}) == len(shots)
    assert realinvalid.dialog_files(cache, "windows")
    t = time.time()
    assert realinvalid.capture_dialogs(cache, dialogs=6, windows=2, seed=1) == done  # stamped: no rerun
    assert time.time() - t < 0.5


def test_dialog_over_changes_only_its_box():
    image = ct_like(200)
    dialog = np.full((60, 240, 3), 200, np.uint8)
    dialog[:15] = (20, 40, 160)  # a title bar
    for seed in range(20):
        out, params = realinvalid.dialog_over(image, dialog, np.random.default_rng(seed))
        assert out.shape == image.pixels.shape and out.dtype == np.uint8
        x, y, w, h = params["box"]
        # 0.3-1x the dialog's own 240 pixels, within 40 pixels .. 90 % of the image's width
        assert 0.3 * 240 - 1 <= w <= 0.9 * 200 + 1 and x + w <= 200 and y + h <= 200
        changed = np.argwhere(out != image.pixels)
        assert changed.size
        assert changed[:, 0].min() >= y and changed[:, 0].max() < y + h
        assert changed[:, 1].min() >= x and changed[:, 1].max() < x + w
    colour = Valid(np.zeros((100, 150, 3), np.uint8), None, (128.0, 256.0), False)
    out, _ = realinvalid.dialog_over(colour, dialog, np.random.default_rng(0))
    assert out.shape == (100, 150, 3)


def test_byte_order_differs_and_uses_the_window():
    image = ct_like()
    for seed in range(6):
        out, params = realinvalid.byte_order(image, np.random.default_rng(seed))
        assert params["broken"] == "byte_order"
        assert out.shape == image.pixels.shape and out.dtype == np.uint8
        assert np.mean(out != image.pixels) > 0.3
    with pytest.raises(realinvalid.NotApplicable):
        realinvalid.byte_order(Valid(np.zeros((8, 8, 3), np.uint8), None, (128.0, 256.0), False),
                               np.random.default_rng(0))


def test_row_stride_shears():
    image = ct_like()
    layouts = set()
    for seed in range(12):
        out, params = realinvalid.row_stride(image, np.random.default_rng(seed))
        assert params["broken"] == "row_stride" and out.dtype == np.uint8
        assert out.shape != image.pixels.shape or not np.array_equal(out, image.pixels)
        layouts.add(params["layout"])
    assert {"shear"} <= layouts


def test_exports_name_their_reasons():
    assert set(realinvalid.GENERATED_REAL) == {"photos", "artwork", "screenshots"}
    assert set(realinvalid.DERIVED_REAL) == {"dialog", "byte_order", "row_stride"}
    assert {k for k in realinvalid.REASONS} == set(realinvalid.GENERATED_REAL) | set(realinvalid.DERIVED_REAL)
    assert set(realinvalid.BROKEN_SUBKINDS.values()) == {"blank", "clipped_window", "corrupted_rows", "truncated",
                                                         "noise", "byte_order", "row_stride"}


def test_read_xwd_truecolour():
    width, height = 3, 2
    header = [100, 7, 2, 24, width, height, 0, 0, 32, 0, 32, 32, width * 4, 4,
              0xFF0000, 0x00FF00, 0x0000FF, 8, 0, 0, width, height, 0, 0, 0]
    import struct
    pixels = bytes([10, 20, 30, 0] * (width * height))  # B G R X, LSB first
    rgb = realinvalid.read_xwd(struct.pack(">25I", *header) + pixels)
    assert rgb.shape == (2, 3, 3) and tuple(rgb[0, 0]) == (30, 20, 10)


def test_a_picture_stored_as_dicom_is_read_through_the_plugins_renderer(tmp_path):
    """deid-data ships photographs and a drawing as DICOM: they are listed by their header's
    size and read as the plugin renders them (here a real file of pydicom's)."""
    import pydicom.data

    from minipacs import render

    source = pydicom.data.get_testdata_file("CT_small.dcm")
    path = tmp_path / "picture.dcm"
    shutil.copy(source, path)
    assert realinvalid._size(path) == (128, 128)
    pixels = realinvalid.read_picture(path)
    assert np.array_equal(pixels, render.render(pydicom.dcmread(source), 0).pixels)
    (tmp_path / "broken.dcm").write_bytes(b"not a DICOM file")
    assert realinvalid._size(tmp_path / "broken.dcm") is None
