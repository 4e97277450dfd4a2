"""The training package end to end, through its CLI in .venv-training (as CI runs it): a tiny
synthetic dataset, one epoch, then every output checked for real."""

import csv
import json
import os
import sqlite3
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minipacs import index, preprocess, render, synth

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PYTHON = ROOT / ".venv-training" / "bin" / "python"
AUGMENTATIONS = {"window": {"window_center", "window_width"}, "blur": {"sigma"},
                 "flip_rotate": {"rot90", "flip"}, "zoom": {"window_center", "window_width", "zoom"}}
INVALID_KINDS = ("pictures", "textures", "charts", "screens", "message_box", "broken", "custom")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def training_cli(*args: str) -> None:
    """``python -m training ARGS`` in .venv-training, as ``./minipacs.sh train`` runs it."""
    if not TRAIN_PYTHON.exists():
        pytest.skip(".venv-training is missing: ./minipacs.sh test builds it")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugin'}:{ROOT}"}
    done = subprocess.run([str(TRAIN_PYTHON), "-m", "training", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("training")
    custom, test_valid = tmp / "custom-invalid", tmp / "test-valid"
    custom.mkdir()
    test_valid.mkdir()
    for i in range(3):
        Image.new("RGB", (50 + 10 * i, 40), (200, 30 * i, 30)).save(custom / f"{i}.png")
    for i, ds in zip(range(2), synth.generate(1, seed=7, size=64, slices=2, anomalies=0)):
        (test_valid / f"{i}.dcm").write_bytes(synth.encode(ds))
    out = tmp / "run"
    training_cli("all", "--run", str(out), "--synth-patients", "6", "--synth-size", "64", "--synth-slices", "4",
                 "--epochs", "1", "--custom-invalid", str(custom), "--test-valid", str(test_valid),
                 "--pydicom-corpus", "--threshold", "0.4")
    return out


def manifest(data: Path) -> list[dict]:
    with open(data / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def patient_splits(rows: list[dict]) -> dict[str, set]:
    """Patient → the splits its images are in (one, if the split is by patient)."""
    splits = defaultdict(set)
    for row in rows:
        if row["patient"]:
            splits[row["patient"]].add(row["split"])
    return splits


def test_split_is_by_patient(run):
    splits = patient_splits(manifest(run / "dataset"))
    assert len(splits) == 6 and all(len(s) == 1 for s in splits.values()), splits
    assert {s for ss in splits.values() for s in ss} == {"train", "validate", "test"}


def test_every_file_is_in_the_manifest_and_the_classes_are_balanced(run):
    rows = manifest(run / "dataset")
    on_disk = {str(p.relative_to(run / "dataset")) for p in (run / "dataset").rglob("*.png")}
    assert on_disk == {r["file"] for r in rows}
    for split in ("train", "validate", "test"):
        labels = [r["label"] for r in rows if r["split"] == split and r["class"] != "test_valid"]
        assert labels.count("1") == labels.count("0") > 0, split
    assert {r["split"] for r in rows if r["class"] == "test_valid"} == {"test"}


def test_every_augmentation_has_files_and_parameters(run):
    rows = manifest(run / "dataset")
    for kind, keys in AUGMENTATIONS.items():
        mine = [r for r in rows if r["class"] == "valid" and r["kind"] == kind]
        assert mine and any((run / "dataset" / "valid" / kind).iterdir()), kind
        assert all(keys <= json.loads(r["params"]).keys() for r in mine), kind
    for kind in INVALID_KINDS:
        assert any(r["class"] == "invalid" and r["kind"] == kind for r in rows), kind
    assert all(json.loads(r["params"]) for r in rows if r["kind"] in ("message_box", "broken"))


def test_report(run):
    report = json.loads((run / "report" / "metrics.json").read_text())
    test = report["test"]
    assert test["tp"] + test["fp"] + test["tn"] + test["fn"] == test["n"] > 0
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert 0.0 <= test[key] <= 1.0, key
    assert test["threshold"] == 0.4 and "test_valid/custom" in report["per_kind"]
    for name in ("confusion_matrix", "training_curves", "misclassified"):
        path = run / "report" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC and Image.open(path).size[0] > 100, name
    real = json.loads((run / "report" / "real_dicom.json").read_text())
    assert real["images"] > 10 and 0.0 <= real["share_valid"] <= 1.0
    assert list((run / "logs").glob("all-*.log"))


def test_onnx_model_is_what_the_plugin_loads(run):
    import onnxruntime

    check = json.loads((run / "report" / "onnx_check.json").read_text())
    assert check["agree"] and check["max_abs_diff"] <= 1e-5 and check["images"] > 0
    session = onnxruntime.InferenceSession(str(run / "minipacs-anomaly.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[preprocess.METADATA_PREPROCESSING] == preprocess.PREPROCESSING
    assert meta[preprocess.METADATA_INPUT_SIZE] == str(preprocess.DEFAULT_SIZE)
    assert meta[preprocess.METADATA_THRESHOLD] == "0.4" and meta[preprocess.METADATA_POSITIVE] == "valid"
    assert meta[preprocess.METADATA_VERSION].startswith("minipacs-anomaly-")
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["p_valid"]
    images = [render.render(ds).pixels for ds in synth.generate(1, seed=3, size=64, slices=2)][:3]
    p = session.run(["p_valid"], {"image": preprocess.batch(images)})[0]
    assert p.shape == (3, 1) and ((0 <= p) & (p <= 1)).all()
    assert np.allclose(session.run(["p_valid"], {"image": preprocess.batch(images[:1])})[0], p[:1], atol=1e-6)


def test_dataset_from_the_plugin_store(tmp_path):
    """Retraining from what Orthanc ingested: the PNG store and the SQLite index."""
    png_dir, database = tmp_path / "png", tmp_path / "index.sqlite"
    png_dir.mkdir()
    db = sqlite3.connect(database)
    db.executescript(index.SCHEMA)
    for n, ds in enumerate(synth.generate(4, seed=5, size=64, slices=2, anomalies=0)):
        patient, study, series = f"p-{ds.PatientID}", f"s-{ds.StudyInstanceUID}", f"se-{ds.SeriesInstanceUID}"
        db.execute("INSERT OR IGNORE INTO patients (orthanc_id, patient_id) VALUES (?, ?)", (patient, ds.PatientID))
        db.execute("INSERT OR IGNORE INTO studies (orthanc_id, patient, study_uid) VALUES (?, ?, ?)",
                   (study, patient, ds.StudyInstanceUID))
        db.execute("INSERT OR IGNORE INTO series (orthanc_id, study, series_uid) VALUES (?, ?, ?)",
                   (series, study, ds.SeriesInstanceUID))
        (png_dir / f"{n}.png").write_bytes(render.encode_png(render.render(ds).pixels))
        db.execute("INSERT INTO images (orthanc_id, series, sop_uid, status, png) VALUES (?, ?, ?, 'rendered', ?)",
                   (f"i-{n}", series, ds.SOPInstanceUID, f"{n}.png"))
    db.commit()
    db.close()
    out = tmp_path / "data"
    training_cli("dataset", "--out", str(out), "--index", str(database), "--png-dir", str(png_dir), "--augmentations", "1")
    rows = manifest(out)
    originals = [r for r in rows if r["kind"] == "original"]
    assert len(originals) == n + 1 and all(r["source"].startswith(str(png_dir)) for r in originals)
    splits = patient_splits(rows)
    assert len(splits) == 4 and all(len(s) == 1 for s in splits.values())


def test_the_classes_do_not_overlap_by_construction(tmp_path):
    """The definitions that keep valid and invalid apart at the model's 128 pixels: a zoom out
    pads with the image's own background, a saturated window leaves at most 0.3 % of the pixels
    unclipped (2 % is a bone window), a message box stands out from what it covers."""
    if not TRAIN_PYTHON.exists():
        pytest.skip(".venv-training is missing: ./minipacs.sh test builds it")
    check = """
import sys
import numpy as np
from training.augment import AugmentConfig, zoom
from training.invalid import broken, message_box
from training.sources import load_dicom
rng = np.random.default_rng(1)
for path in sys.argv[1:]:
    image = load_dicom(path)
    p = image.pixels
    border = np.median(np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]]))
    for _ in range(30):
        pixels, params = zoom(image, rng, AugmentConfig(window_shift=0, window_scale=(1, 1), zoom=(0.7, 0.8)))
        corner = pixels[0, 0] if abs(int(pixels[0, 0]) - border) <= 2 else pixels[-1, -1]
        assert abs(int(corner) - border) <= 2, (pixels[0, 0], pixels[-1, -1], border)
        out, params = broken(image, rng)
        if params["broken"] == "saturated":
            assert max(np.mean(out == 0), np.mean(out == 255)) >= 0.99
        boxed, params = message_box(image, rng)
        x, y, w, h = params["box"]
        assert abs(params["grey"] - float(np.mean(p[y:y + h, x:x + w]))) > 50
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugin'}:{ROOT}"}
    files = []
    for n, ds in enumerate(synth.generate(1, seed=3, size=128, slices=2, anomalies=0)):
        files.append(tmp_path / f"{n}.dcm")
        files[-1].write_bytes(synth.encode(ds))
    done = subprocess.run([str(TRAIN_PYTHON), "-c", check, *map(str, files)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
