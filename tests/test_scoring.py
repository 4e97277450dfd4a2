"""The ONNX scorer, the model slot, scoring during ingest and the background rescore."""

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw

from corpus import find
from minipacs import index as idx
from minipacs import reasons, render, windows
from minipacs.ingest import Settings, ingest, ingest_many
from minipacs.preprocess import model_input
from minipacs.rescore import Busy, Rescorer
from minipacs.routes import Router
from minipacs.scoring import ModelError, ModelSlot, Scorer
from onnx_models import brightness_model, reason_model, window_model
from test_ingest_and_index import OfflineLookup, instance_id_of


@pytest.fixture
def model(tmp_path):
    return brightness_model(tmp_path / "bright.onnx", size=16, threshold=0.5)


def gradient(low: int, high: int, shape=(40, 30)) -> np.ndarray:
    """Grey levels from ``low`` to ``high``: not blank, not clipped, so only the model decides."""
    rows, cols = shape[:2]
    ramp = np.linspace(low, high, rows * cols).reshape(rows, cols).round().astype(np.uint8)
    return np.repeat(ramp[..., np.newaxis], shape[2], axis=2) if len(shape) == 3 else ramp


def test_scores_are_the_models_output(model):
    scorer = Scorer(model)
    grey = gradient(20, 82)  # P(valid) about 0.2
    rgb = gradient(205, 250, (20, 20, 3))
    p, why = scorer.predict([grey, rgb])
    assert p == pytest.approx([model_input(grey, 16).mean(), model_input(rgb, 16).mean()])
    assert why == ["anomaly", "anomaly"]  # a model that only says valid or not
    dark, bright = scorer.scores([grey, rgb])
    assert dark.flagged and dark.anomaly_score == pytest.approx(1 - model_input(grey, 16).mean())
    assert dark.reason == "anomaly" and bright.reason is None
    assert not bright.flagged and bright.model_version == "test-brightness"
    assert scorer.info.input_size == 16 and scorer.info.threshold == 0.5
    assert scorer.info.as_json()["Reasons"] == ["anomaly"]


def test_configured_threshold_overrides_the_models(model):
    scorer = Scorer(model, threshold=0.1)
    assert not scorer.score(gradient(20, 82, (8, 8))).flagged


def clipped_window(size: int = 100, unclipped: int = 10) -> np.ndarray:
    """A window so narrow that all but ``unclipped`` pixels are black or white."""
    pixels = np.zeros((size, size), np.uint8)
    pixels[size // 2:] = 255
    pixels.flat[size:size + unclipped] = 128  # in row 1: between the rows sampled first
    return pixels


@pytest.mark.parametrize("pixels, reason", [
    (np.full((40, 30), 51, np.uint8), "broken_render:blank"),
    (np.full((40, 30), 230, np.uint8), "broken_render:blank"),
    (np.full((20, 20, 3), (0, 128, 255), np.uint8) * 0 + 7, "broken_render:blank"),
    (gradient(100, 103), "broken_render:blank"),  # 4 grey levels: read-out noise on a flat frame
    (clipped_window(), "broken_render:clipped_window"),
    (clipped_window(unclipped=0), "broken_render:clipped_window"),
])
def test_blank_and_clipped_renders_are_flagged_whatever_the_model_says(tmp_path, pixels, reason):
    lenient = brightness_model(tmp_path / "lenient.onnx", threshold=0.0)  # never flags
    says_valid = reason_model(tmp_path / "valid.onnx", {}, {"valid": 100.0, "picture": 5.0}, threshold=0.0)
    for scorer in (Scorer(lenient), Scorer(says_valid)):
        score = scorer.score(pixels)
        assert (score.flagged, score.anomaly_score, score.reason) == (True, 1.0, reason)
    assert reasons.by_construction(pixels) == reason


@pytest.mark.parametrize("pixels", [
    gradient(100, 104),  # 5 grey levels: shown
    clipped_window(unclipped=100),  # 1 % unclipped: a narrow window, but one that shows something
    np.where(clipped_window(unclipped=0)[..., np.newaxis], np.uint8(255), np.uint8(0)).repeat(3, axis=2),
])
def test_images_that_show_something_are_left_to_the_model(tmp_path, pixels):
    """Five grey levels are an image; a colour image has no window to clip."""
    assert reasons.by_construction(pixels) is None
    assert not Scorer(brightness_model(tmp_path / "lenient.onnx", threshold=0.0)).score(pixels).flagged


def test_colour_pictures_are_flagged_whatever_the_model_says(tmp_path):
    """CT, MR, CR and DX are grey: pydicom's palette photograph of a face and its colour
    ultrasound (the network, which sees grey, flags that too) are pictures; a grey render stored
    as RGB, with a JPEG's chroma noise or a coloured outline drawn on it, is not."""
    lenient = Scorer(brightness_model(tmp_path / "lenient.onnx", threshold=0.0))  # never flags
    for name in ("OT-PAL-8-face.dcm", "examples_palette.dcm"):
        pixels = render.render(pydicom.dcmread(find(name), force=True)).pixels
        assert reasons.colour(pixels) and reasons.checks(pixels) == "picture"
        score = lenient.score(pixels)
        assert (score.flagged, score.anomaly_score, score.reason) == (True, 1.0, "picture")
    ct = render.render(pydicom.dcmread(find("693_UNCI.dcm"))).pixels
    rgb = Image.fromarray(ct).convert("RGB")
    ImageDraw.Draw(rgb).ellipse((150, 150, 350, 300), outline=(255, 0, 0), width=3)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=75)
    for pixels in (np.asarray(rgb), np.asarray(Image.open(buffer))):
        assert not reasons.colour(pixels) and not lenient.score(pixels).flagged


SLOPES = {"picture": -10.0, "overlay": 10.0}  # dark images look like pictures, bright ones overlays
INTERCEPTS = {"valid": 100.0, "picture": 5.0, "overlay": -5.0}  # valid the likeliest class of all


def test_the_reason_is_the_likeliest_class_other_than_valid(tmp_path):
    path = reason_model(tmp_path / "reasons.onnx", SLOPES, INTERCEPTS, threshold=0.99)
    scorer = Scorer(path)
    dark, bright, middle = gradient(20, 82), gradient(175, 235), gradient(100, 155)
    p, why = scorer.predict([dark, bright, middle])
    means = [model_input(image, 16).mean() for image in (dark, bright, middle)]
    assert p == pytest.approx(means)
    expected = []
    for m in means:  # the softmax's argmax over the non-valid classes, worked out here
        logits = {c: SLOPES.get(c, 0.0) * m + INTERCEPTS.get(c, 0.0) for c in reasons.CLASSES}
        expected.append(max(reasons.REASONS, key=logits.__getitem__))
    assert why == expected == ["picture", "overlay", "picture"]
    scores = scorer.scores([dark, bright, middle])
    assert [s.reason for s in scores] == expected and all(s.flagged for s in scores)
    assert scores[0].anomaly_score == pytest.approx(1 - means[0])
    # Not flagged: no reason, whatever the classes say.
    assert Scorer(path, threshold=0.5).score(bright).reason is None
    # Proven by construction: that reason, not the model's.
    assert scorer.score(np.full((16, 16), 30, np.uint8)).reason == "broken_render:blank"
    info = scorer.info.as_json()
    assert info["Reasons"] == list(reasons.REASONS) and info["Version"] == "test-reasons"


def test_a_model_reads_its_own_list_of_classes(tmp_path):
    classes = ("valid", "overlay", "broken_render:noise")
    scorer = Scorer(reason_model(tmp_path / "short.onnx", {"overlay": -20.0, "broken_render:noise": 20.0},
                                 {"overlay": 10.0, "broken_render:noise": -10.0}, classes=classes,
                                 threshold=1.0))
    assert scorer.predict([gradient(20, 40), gradient(200, 240)])[1] == ["overlay", "broken_render:noise"]
    assert scorer.info.as_json()["Reasons"] == ["overlay", "broken_render:noise"]


def test_a_model_naming_classes_without_a_p_class_output_is_refused(tmp_path):
    named = brightness_model(tmp_path / "named.onnx",
                             metadata={reasons.METADATA_CLASSES: ",".join(reasons.CLASSES)})
    with pytest.raises(ModelError, match="no p_class output"):
        Scorer(named)
    valid_last = reason_model(tmp_path / "last.onnx", {}, classes=reasons.REASONS + ("valid",))
    with pytest.raises(ModelError, match="'valid' first"):
        Scorer(valid_last)
    slot = ModelSlot(named)
    slot.try_load()
    assert not slot.describe()["Loaded"] and "p_class" in slot.describe()["Error"]


def panel(fill: int) -> np.ndarray:
    """A smooth grey ramp (no edges of its own) with a black or white panel drawn in: the edge
    of a clipped region to ``windows.window_box`` (a shutter, air), a candidate box all the same."""
    pixels = gradient(90, 170, (200, 200))
    pixels[80:121, 60:141] = fill
    return pixels


def test_a_candidate_window_is_judged_on_a_crop_around_it(tmp_path):
    """A model with a window head looks again at what it would pass: the crop around each
    candidate box. p_window here is the brightest pixel, so the white panel's crop is a
    window and the black panel's is not; the ramp has no candidate at all."""
    scorer = Scorer(window_model(tmp_path / "window.onnx", window_threshold=0.9))
    white, black, ramp = panel(255), panel(0), gradient(90, 170, (200, 200))
    for pixels in (white, black):
        assert windows.window_box(pixels) is None and windows.candidates(pixels)
    assert windows.candidates(ramp) == []
    seen = scorer.window_seen([white, black, ramp])
    assert seen[0] >= 0.9 > seen[1] > 0 and seen[2] == 0
    flagged, passed, plain = scorer.scores([white, black, ramp])
    assert flagged.flagged and flagged.reason == "overlay" and flagged.anomaly_score == 1.0
    assert not passed.flagged and not plain.flagged
    assert scorer.info.window_threshold == 0.9 and scorer.info.as_json()["WindowThreshold"] == 0.9
    # The same images under a model without the head: only the network and the checks.
    plain_model = Scorer(brightness_model(tmp_path / "plain.onnx", threshold=0.3))
    assert plain_model.info.window_threshold is None and not plain_model.score(white).flagged
    assert plain_model.window_seen([white]) == [0.0]


def test_a_window_head_of_the_wrong_shape_is_refused(tmp_path):
    bad = brightness_model(tmp_path / "bad.onnx", metadata={"minipacs.window_threshold": "2"})
    with pytest.raises(ModelError, match=r"window threshold 2\.0, outside \[0, 1\]"):
        Scorer(bad)


def test_a_model_for_another_preprocessing_is_refused(tmp_path):
    other = brightness_model(tmp_path / "other.onnx", preprocessing="rgb-224-imagenet")
    with pytest.raises(ModelError, match="made for preprocessing 'rgb-224-imagenet'"):
        Scorer(other)
    with pytest.raises(ModelError, match="cannot load model"):
        Scorer(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load model"):
        Scorer(tmp_path / "garbage.onnx")


# Models made for something else: (builder arguments, reason). Each once replaced a working
# model with 200 and then failed on every image.
WRONG_MODELS = {
    "nchw_3x128": (dict(size=128, input_shape=["n", 3, 128, 128]),
                   r"input 'image' is tensor\(float\) \(N, 3, 128, 128\), not float \(N, 128, 128, 1\)"),
    "fixed_64_says_128": (dict(size=128, input_shape=["n", 64, 64, 1]), r"\(N, 64, 64, 1\), not"),
    "two_value_output": (dict(copies=2), r"output 'p_valid' is tensor\(float\) \(N, 2\), not float \(N, 1\)"),
    "input_size_0": (dict(metadata={"minipacs.input_size": "0"}), r"input_size 0, outside 16\.\.1024"),
    "input_size_-5": (dict(metadata={"minipacs.input_size": "-5"}), r"input_size -5, outside"),
    "input_size_4096": (dict(metadata={"minipacs.input_size": "4096"}), r"input_size 4096, outside"),
    "threshold_1.5": (dict(threshold=1.5), r"threshold 1\.5, outside \[0, 1\]"),
    "outputs_above_1": (dict(scale=10.0), r"gave p_valid \[\[0\.0\], \[\d.*not 1 probabilit"),
    "outputs_nan": (dict(scale=float("inf")), r"gave p_valid \[\[nan\]"),
}


@pytest.mark.parametrize("name", sorted(WRONG_MODELS))
def test_a_model_made_for_something_else_is_refused_before_use(tmp_path, model, name):
    arguments, reason = WRONG_MODELS[name]
    wrong = brightness_model(tmp_path / f"{name}.onnx", **arguments)
    with pytest.raises(ModelError, match=reason):
        Scorer(wrong)
    slot = ModelSlot(model)
    slot.load()
    with pytest.raises(ModelError):
        slot.load(wrong)
    assert slot.describe()["Version"] == "test-brightness"


def test_a_fixed_batch_model_is_run_a_batch_at_a_time(model):
    """A model exported with batch 1 (or 4) scores any number of images, as the dynamic one."""
    images = [gradient(10 * k, 10 * k + 100) for k in range(5)]
    expected = Scorer(model).predict(images)[0]
    for batch in (1, 4):
        fixed = Scorer(brightness_model(model.parent / f"b{batch}.onnx", input_shape=[batch, 16, 16, 1]))
        assert fixed.batch == batch
        assert np.allclose(fixed.predict(images)[0], expected)


def test_slot_keeps_the_old_model_when_a_reload_fails(model, tmp_path):
    slot = ModelSlot(model)
    slot.try_load()
    assert slot.describe()["Loaded"] and slot.describe()["Version"] == "test-brightness"
    with pytest.raises(ModelError):
        slot.load(tmp_path / "missing.onnx")
    assert slot.scorer is not None and slot.path == model
    newer = brightness_model(tmp_path / "newer.onnx", version="v2")
    slot.load(newer)
    assert slot.describe()["Version"] == "v2"
    off = ModelSlot(None)
    off.try_load()
    assert off.describe() == {"Loaded": False, "Error": "no model configured (MiniPacs.ModelPath)"}


@pytest.fixture
def archive(tmp_path, model):
    index = idx.Index(tmp_path / "index.sqlite")
    settings = Settings(tmp_path / "png", 1)
    settings.png_directory.mkdir()
    slot = ModelSlot(model)
    slot.load()
    published = []

    class Lookup(OfflineLookup):
        def publish(self, instance_id, study_id, score, was_flagged):
            published.append((instance_id, study_id, score.flagged))

    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "rtplan.dcm"):
        path = find(name)
        ingest(index, settings, instance_id_of(path), path.read_bytes(), Lookup(), slot)
    return index, settings, slot, published


def test_ingest_scores_rendered_images_and_publishes_them(archive):
    index, settings, slot, published = archive
    images, _ = index.page(idx.IMAGES, 10, 0)
    rendered = [i for i in images if i["Status"] == "rendered"]
    assert len(rendered) == 3 and len(published) == 3
    for image in rendered:
        assert image["ModelVersion"] == "test-brightness" and image["ScoredAt"]
        assert image["Flagged"] == (image["AnomalyScore"] > 0.5)
        assert image["AnomalyReason"] == ("anomaly" if image["Flagged"] else None)
    plan = next(i for i in images if i["Status"] == "no_pixel_data")
    assert plan["AnomalyScore"] is None and plan["Flagged"] is None


def test_ingesting_several_at_once_scores_them_in_one_run_as_one_by_one(archive, tmp_path):
    index, settings, slot, _ = archive
    one_by_one = {i["OrthancID"]: i for i in index.page(idx.IMAGES, 10, 0)[0]}
    runs = []
    session = slot.scorer.session

    class Counting:  # ONNX Runtime's session, counting its runs
        def run(self, outputs, inputs):
            runs.append(len(next(iter(inputs.values()))))
            return session.run(outputs, inputs)

    slot.scorer.session = Counting()
    together = idx.Index(tmp_path / "together.sqlite")
    names = ("CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "rtplan.dcm")
    ingest_many(together, settings, [(instance_id_of(find(n)), find(n).read_bytes()) for n in names],
                OfflineLookup(), slot)
    assert runs == [3]  # the three rendered images, in one batch; the plan has no pixels
    for image in together.page(idx.IMAGES, 10, 0)[0]:
        expected = one_by_one[image["OrthancID"]]
        assert image["Status"] == expected["Status"] and image["Flagged"] == expected["Flagged"]
        assert image["AnomalyScore"] == pytest.approx(expected["AnomalyScore"], abs=1e-6)


def test_rescore_applies_a_new_model_to_every_rendered_image(archive, tmp_path):
    index, settings, slot, published = archive
    rescorer = Rescorer(index, settings.png_directory, slot)
    slot.load(brightness_model(tmp_path / "strict.onnx", threshold=0.99, version="strict"))
    progress = rescorer.start()
    assert progress["State"] == "running" and progress["Total"] == 3
    rescorer.wait(30)
    done = rescorer.progress()
    assert (done["State"], done["Done"], done["Flagged"], done["ModelVersion"]) == ("done", 3, 3, "strict")
    images, _ = index.page(idx.IMAGES, 10, 0)
    assert {i["ModelVersion"] for i in images if i["Status"] == "rendered"} == {"strict"}
    assert all(i["Flagged"] for i in images if i["Status"] == "rendered")


def test_a_reload_during_a_rescore_restarts_it_with_the_new_model(archive, tmp_path):
    """Rows scored by the old model before the reload are scored again: none is left stale."""
    index, settings, slot, _ = archive
    newer = brightness_model(tmp_path / "v2.onnx", version="v2")
    seen = []

    def publish(instance_id, study_id, score, was_flagged):  # during the rescore: reload then
        seen.append(score.model_version)
        if len(seen) == 1:
            slot.load(newer)

    rescorer = Rescorer(index, settings.png_directory, slot, publish)
    rescorer.start()
    rescorer.wait(30)
    progress = rescorer.progress()
    assert (progress["State"], progress["Restarts"], progress["ModelVersion"], progress["Done"]) == \
        ("done", 1, "v2", 3)
    assert seen[0] == "test-brightness" and seen[-3:] == ["v2"] * 3
    assert index.unscored_by("v2") == {"Stale": 0, "Unscored": 0}


def test_reload_refuses_a_wrong_model_and_the_model_route_counts_stale_rows(archive, tmp_path):
    index, settings, slot, _ = archive
    router = Router(index, settings.png_directory, lambda: {}, slot)
    model = call(router, "GET", "model")[1]
    assert (model["Version"], model["Stale"], model["Unscored"]) == ("test-brightness", 0, 0)
    wrong = brightness_model(tmp_path / "nchw.onnx", size=128, input_shape=["n", 3, 128, 128])
    status, error = call(router, "POST", "model/reload", json.dumps({"Path": str(wrong)}).encode())
    assert status == 400 and "not float (N, 128, 128, 1)" in error["error"]
    assert error["Model"]["Version"] == call(router, "GET", "model")[1]["Version"] == "test-brightness"
    v2 = brightness_model(tmp_path / "v2.onnx", version="v2")
    status, model = call(router, "POST", "model/reload", json.dumps({"Path": str(v2)}).encode())
    assert (status, model["Version"], model["Stale"], model["Unscored"]) == (200, "v2", 3, 0)
    rendered = next(i for i in index.page(idx.IMAGES, 10, 0)[0] if i["Status"] == "rendered")
    index.set_scores([{"orthanc_id": rendered["OrthancID"], **dict.fromkeys(
        ("anomaly_score", "flagged", "anomaly_reason", "model_version", "threshold"))}])
    assert index.unscored_by("v2") == {"Stale": 2, "Unscored": 1}


def test_rescore_refuses_to_run_twice_or_without_a_model(archive):
    index, settings, slot, _ = archive
    with pytest.raises(ModelError):
        Rescorer(index, settings.png_directory, ModelSlot(None)).start()
    rescorer = Rescorer(index, settings.png_directory, slot)
    rescorer._thread = type("Alive", (), {"is_alive": lambda self: True})()
    with pytest.raises(Busy):
        rescorer.start()


def call(router, method, path, body=b"", **query):
    response = router.handle(method, path, {k: str(v) for k, v in query.items()}, body)
    return response.status, json.loads(response.body) if response.content_type == "application/json" else response.body


def test_scoring_routes(archive, tmp_path):
    index, settings, slot, _ = archive
    router = Router(index, settings.png_directory, lambda: {}, slot,
                    Rescorer(index, settings.png_directory, slot))
    status, page = call(router, "GET", "anomalies")
    flagged = [i for i in index.page(idx.IMAGES, 10, 0)[0] if i["Flagged"]]
    assert status == 200 and page["total"] == len(flagged) and page["model"]["Loaded"]
    scores = [i["AnomalyScore"] for i in page["items"]]
    assert scores == sorted(scores, reverse=True)
    assert call(router, "GET", "anomalies", modality="XX")[1]["total"] == 0
    assert call(router, "GET", "anomalies", min_score=1)[1]["total"] == 0
    assert call(router, "GET", "anomalies", min_score="lots")[0] == 400
    assert call(router, "GET", "anomalies", min_score=2)[0] == 400
    image = index.page(idx.IMAGES, 10, 0)[0][0]
    status, score = call(router, "GET", f"images/{image['SOPInstanceUID']}/score")
    if image["AnomalyScore"] is None:
        assert status == 404
    else:
        assert status == 200 and score["AnomalyScore"] == image["AnomalyScore"]
    status, summary = call(router, "GET", f"studies/{image['StudyInstanceUID']}/summary")
    assert status == 200 and summary["images"] >= 1 and "max_score" in summary
    status, summary = call(router, "GET", f"series/{image['SeriesInstanceUID']}/summary")
    assert status == 200 and summary["SeriesInstanceUID"] == image["SeriesInstanceUID"]
    assert call(router, "GET", "model")[1]["Version"] == "test-brightness"
    assert call(router, "GET", "model")[1]["Reasons"] == ["anomaly"]
    assert call(router, "GET", "model/reload")[0] == 405
    assert call(router, "POST", "model/reload", b"{not json")[0] == 400
    assert call(router, "POST", "model/reload", b'{"Path": 3}')[0] == 400
    status, error = call(router, "POST", "model/reload", b'{"Path": "/nowhere.onnx"}')
    assert status == 404 and error["Model"]["Version"] == "test-brightness"
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    status, error = call(router, "POST", "model/reload", json.dumps({"Path": str(tmp_path / "bad.onnx")}).encode())
    assert status == 400 and "cannot load model" in error["error"]
    other = brightness_model(tmp_path / "v3.onnx", version="v3")
    status, model = call(router, "POST", "model/reload", json.dumps({"Path": str(other)}).encode())
    assert status == 200 and model["Version"] == "v3"
    # {} loads the configured file, not the last one asked for (README)
    assert call(router, "POST", "model/reload")[1]["Version"] == "test-brightness"
    named = reason_model(tmp_path / "named.onnx", SLOPES, INTERCEPTS)
    status, model = call(router, "POST", "model/reload", json.dumps({"Path": str(named)}).encode())
    assert status == 200 and model["Reasons"] == list(reasons.REASONS)
    assert call(router, "GET", "model")[1]["Reasons"] == list(reasons.REASONS)
    call(router, "POST", "model/reload", json.dumps({"Path": str(other)}).encode())
    status, progress = call(router, "POST", "rescore")
    assert status == 200 and progress["State"] == "running"
    router.rescorer.wait(30)
    assert call(router, "GET", "rescore")[1]["State"] == "done"
    assert call(router, "DELETE", "rescore")[0] == 405
    status, page = call(router, "GET", "ui")
    assert status == 200 and b"Flagged images" in page


@pytest.mark.parametrize("loads, calls_home", [("minipacs.scoring", False), ("onnxruntime", True)])
def test_onnx_runtime_telemetry_is_off_unless_the_operator_turns_it_on(tmp_path, model, loads, calls_home):
    """ONNX Runtime >= 1.32 records a telemetry device ID under $HOME at its first session; the
    plugin turns telemetry off (a hospital archive should not call out). Plain onnxruntime, the
    control, shows the check can see it."""
    import os
    import subprocess
    import sys
    code = (f"import {loads}, onnxruntime; "
            f"onnxruntime.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])")
    # A bare environment: ONNX Runtime also keeps quiet where it sees a CI (CI=true, as .ci/run sets).
    plugin = Path(__file__).resolve().parent.parent / "plugin"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(plugin)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert bool(list(tmp_path.rglob("deviceid"))) is calls_home
