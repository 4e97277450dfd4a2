"""The ONNX scorer, the model slot, scoring during ingest and the background rescore."""

import json

import numpy as np
import pytest

from corpus import find
from minipacs import index as idx
from minipacs.ingest import Settings, ingest, ingest_many
from minipacs.preprocess import model_input
from minipacs.rescore import Busy, Rescorer
from minipacs.routes import Router
from minipacs.scoring import ModelError, ModelSlot, Scorer
from onnx_models import brightness_model
from test_ingest_and_index import OfflineLookup, instance_id_of


@pytest.fixture
def model(tmp_path):
    return brightness_model(tmp_path / "bright.onnx", size=16, threshold=0.5)


def test_scores_are_the_models_output(model):
    scorer = Scorer(model)
    grey = np.full((40, 30), 51, np.uint8)  # P(valid) = 0.2
    rgb = np.full((20, 20, 3), 230, np.uint8)
    p = scorer.p_valid([grey, rgb])
    assert p == pytest.approx([model_input(grey, 16).mean(), model_input(rgb, 16).mean()])
    dark, bright = scorer.scores([grey, rgb])
    assert dark.flagged and dark.anomaly_score == pytest.approx(0.8)
    assert not bright.flagged and bright.model_version == "test-brightness"
    assert scorer.info.input_size == 16 and scorer.info.threshold == 0.5


def test_configured_threshold_overrides_the_models(model):
    scorer = Scorer(model, threshold=0.1)
    assert not scorer.score(np.full((8, 8), 51, np.uint8)).flagged


def test_a_model_for_another_preprocessing_is_refused(tmp_path):
    other = brightness_model(tmp_path / "other.onnx", preprocessing="rgb-224-imagenet")
    with pytest.raises(ModelError, match="made for preprocessing 'rgb-224-imagenet'"):
        Scorer(other)
    with pytest.raises(ModelError, match="cannot load model"):
        Scorer(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load model"):
        Scorer(tmp_path / "garbage.onnx")


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
        def publish(self, instance_id, study_id, score):
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
    assert call(router, "POST", "model/reload")[1]["Version"] == "v3"  # reloads the same file
    status, progress = call(router, "POST", "rescore")
    assert status == 200 and progress["State"] == "running"
    router.rescorer.wait(30)
    assert call(router, "GET", "rescore")[1]["State"] == "done"
    assert call(router, "DELETE", "rescore")[0] == 405
    status, page = call(router, "GET", "ui")
    assert status == 200 and b"Flagged images" in page
