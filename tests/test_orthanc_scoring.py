"""Scoring inside a real Orthanc: scores in the index and in Orthanc, live model swap, rescore."""

import io
import time
from contextlib import contextmanager

import pydicom
import pytest

from corpus import find
from minipacs import reasons, synth
from onnx_models import brightness_model, reason_model
from orthanc_server import OrthancServer
from test_stride import stored_with_row_length

FLAG_LABEL = "minipacs-flagged"  # what users filter on in Orthanc Explorer 2 and /tools/find


def store_study(server, slices: int = 6) -> None:
    """One synthetic patient, its anomalies included, stored and ingested."""
    for ds in synth.generate(1, seed=3, size=128, slices=slices, anomalies=1.0):
        assert server.upload(synth.encode(ds)).status_code == 200
    server.wait_for_ingest()


@contextmanager
def scoring_server(work, publish: str | None, slices: int = 6, **orthanc_options):
    """A started Orthanc scoring with a brightness model (dark slices flagged) and the
    synthetic study stored; ``publish`` None leaves PublishToOrthanc at its default."""
    model = brightness_model(work / "bright.onnx", size=16, threshold=0.2, version="bright-0.2")
    server = OrthancServer(work / "orthanc", **orthanc_options)
    server.config["MiniPacs"]["ModelPath"] = str(model)
    if publish is not None:
        server.config["MiniPacs"]["PublishToOrthanc"] = publish
    server.work = work
    if "RegisteredUsers" in orthanc_options:
        server.session.auth = next(iter(orthanc_options["RegisteredUsers"].items()))
    server.start()
    try:
        store_study(server, slices)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    with scoring_server(tmp_path_factory.mktemp("scored"), "all") as server:
        yield server


def test_every_rendered_image_is_scored_and_mirrored_in_orthanc(scored):
    images = scored.json("/minipacs/images?limit=1000")["items"]
    assert images and all(i["Status"] == "rendered" for i in images)
    for image in images:
        assert image["ModelVersion"] == "bright-0.2" and image["Threshold"] == 0.2
        assert image["Flagged"] == (1 - image["AnomalyScore"] < 0.2)
        metadata = scored.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsAnomalyScore")
        assert metadata.status_code == 200 and float(metadata.text) == pytest.approx(image["AnomalyScore"], abs=1e-6)
        flag = scored.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsFlagged").text
        assert flag == ("1" if image["Flagged"] else "0")
        reason = scored.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsAnomalyReason")
        if image["Flagged"]:  # a binary model's flag, or a render blank by construction
            assert image["AnomalyReason"] in ("anomaly", "broken_render:blank", "broken_render:clipped_window")
            assert reason.status_code == 200 and reason.text == image["AnomalyReason"]
        else:  # an image that is not flagged gets no third metadata
            assert image["AnomalyReason"] is None and reason.status_code == 404


def test_anomalies_route_lists_exactly_the_flagged_images(scored):
    images = scored.json("/minipacs/images?limit=1000")["items"]
    flagged = {i["SOPInstanceUID"] for i in images if i["Flagged"]}
    assert flagged, "the brightness model flags the dark slices"
    page = scored.json("/minipacs/anomalies?limit=1000")
    assert {i["SOPInstanceUID"] for i in page["items"]} == flagged
    first = page["items"][0]
    assert scored.json(f"/minipacs/images/{first['SOPInstanceUID']}/score")["Flagged"] is True
    summary = scored.json(f"/minipacs/studies/{first['StudyInstanceUID']}/summary")
    assert summary["flagged"] >= 1 and summary["max_score"] == pytest.approx(first["AnomalyScore"])


def test_colour_pictures_and_wrong_row_lengths_are_flagged_with_their_reason(tmp_path):
    """Real files through a real Orthanc: pydicom's palette photograph, and a real CT whose
    Columns says twice the true row length, are flagged by the checks (score 1, their reason)
    while the model (never flagging) passes the same CT stored as it is."""
    lenient = brightness_model(tmp_path / "lenient.onnx", size=16, threshold=0.0, version="lenient")
    server = OrthancServer(tmp_path / "orthanc")
    server.config["MiniPacs"]["ModelPath"] = str(lenient)
    wide = stored_with_row_length("693_UNCI.dcm", 2)
    wide.SOPInstanceUID = pydicom.uid.generate_uid()
    files = {"picture": find("OT-PAL-8-face.dcm").read_bytes(), "broken_render:row_stride": synth.encode(wide),
             None: find("693_UNCI.dcm").read_bytes()}
    server.start()
    try:
        for data in files.values():
            assert server.upload(data).status_code == 200
        server.wait_for_ingest()
        for reason, data in files.items():
            uid = pydicom.dcmread(io.BytesIO(data), force=True).SOPInstanceUID
            score = server.json(f"/minipacs/images/{uid}/score")
            assert (score["Flagged"], score["AnomalyReason"]) == (reason is not None, reason), score
            if reason:
                assert score["AnomalyScore"] == 1.0
                listed = server.get("/minipacs/anomalies", params={"reason": reason}).json()["items"]
                assert [i["SOPInstanceUID"] for i in listed] == [uid]
    finally:
        server.stop()


def rescore(server, model) -> dict:
    """Load ``model`` and rescore every image with it; the final progress."""
    answer = server.session.post(server.url + "/minipacs/model/reload", json={"Path": str(model)})
    assert answer.status_code == 200, answer.text
    assert server.session.post(server.url + "/minipacs/rescore").status_code == 200
    deadline = time.monotonic() + 60
    while (progress := server.json("/minipacs/rescore"))["State"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return progress


def flagged_studies(server) -> set[str]:
    """Orthanc IDs of the studies with a flagged image, as the index says."""
    images = server.json("/minipacs/images?limit=1000")["items"]
    return {server.json(f"/instances/{i['OrthancID']}/study")["ID"] for i in images if i["Flagged"]}


def labelled_studies(server) -> set[str]:
    return {study for study in server.json("/studies")
            if FLAG_LABEL in server.json(f"/studies/{study}/labels")}


def test_orthanc_features_come_from_its_system_route(scored):
    system = scored.json("/system")
    assert scored.json("/minipacs/")["orthanc"] == {
        "version": system["Version"], "api_version": system["ApiVersion"],
        "labels": system.get("HasLabels", False), "metadata": True, "publish": "all"}


def test_swapping_the_model_and_rescoring_without_a_restart(scored):
    # Flags everything; dark images look like pictures, bright ones like overlays.
    strict = reason_model(scored.work / "strict.onnx", {"picture": -10.0, "overlay": 10.0},
                          {"picture": 5.0, "overlay": -5.0}, size=16, threshold=0.999, version="strict")
    progress = rescore(scored, strict)
    model = scored.json("/minipacs/model")
    assert model["Version"] == "strict" and model["Reasons"] == list(reasons.REASONS)
    images = scored.json("/minipacs/images?limit=1000")["items"]
    assert progress["State"] == "done" and progress["Done"] == len(images)
    assert all(i["ModelVersion"] == "strict" and i["Flagged"] for i in images)
    sample = images[0]["OrthancID"]
    assert scored.get(f"/instances/{sample}/metadata/MiniPacsFlagged").text == "1"
    assert {i["AnomalyReason"] for i in images} <= set(reasons.REASONS)
    assert {"picture", "overlay"} & {i["AnomalyReason"] for i in images}, "the model's classes name them"
    for image in images:  # rescoring writes each flag's reason into Orthanc too
        reason = scored.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsAnomalyReason")
        assert reason.status_code == 200 and reason.text == image["AnomalyReason"]
    pictures = scored.json("/minipacs/anomalies?limit=1000&reason=picture")["items"]
    assert {i["SOPInstanceUID"] for i in pictures} == {
        i["SOPInstanceUID"] for i in images if i["AnomalyReason"] == "picture"}
    for reason in reasons.REASONS:  # requests writes ":" as "%3A", which Orthanc leaves so
        answer = scored.get("/minipacs/anomalies", params={"reason": reason, "limit": 1000})
        assert answer.status_code == 200 and all(i["AnomalyReason"] == reason for i in answer.json()["items"])
    bad_reason = scored.get("/minipacs/anomalies?reason=nonsense")
    assert bad_reason.status_code == 400 and bad_reason.json()["Reasons"] == list(reasons.FILTERS)
    bad = scored.session.post(scored.url + "/minipacs/model/reload", data=b'{"Path": "/nope.onnx"}')
    assert bad.status_code == 404 and scored.json("/minipacs/model")["Version"] == "strict"


def test_a_wrong_model_is_refused_and_an_empty_reload_loads_the_configured_file(scored):
    before = scored.json("/minipacs/model")["Version"]
    wrong = brightness_model(scored.work / "nchw.onnx", size=128, input_shape=["n", 3, 128, 128])
    answer = scored.session.post(scored.url + "/minipacs/model/reload", json={"Path": str(wrong)})
    assert answer.status_code == 400 and "not float (N, 128, 128, 1)" in answer.json()["error"]
    assert answer.json()["Model"]["Version"] == scored.json("/minipacs/model")["Version"] == before
    answer = scored.session.post(scored.url + "/minipacs/model/reload", json={})
    assert answer.status_code == 200 and answer.json()["Version"] == "bright-0.2"  # ModelPath
    images = scored.json("/minipacs/images?limit=1000")["items"]
    assert answer.json()["Stale"] == sum(i["ModelVersion"] not in (None, "bright-0.2") for i in images) > 0
    assert answer.json()["Unscored"] == 0


def test_ui_page_is_served(scored):
    answer = scored.get("/minipacs/ui")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/html")
    assert "./anomalies" in answer.text and "../ohif/viewer?StudyInstanceUIDs=" in answer.text


def changes(server) -> list[dict]:
    found, since = [], 0
    while True:
        page = server.json(f"/changes?since={since}&limit=1000")
        found += page["Changes"]
        since = page["Last"]
        if page["Done"]:
            return found


def test_by_default_orthanc_shows_what_bare_orthanc_shows(tmp_path):
    """PublishToOrthanc "none" (the default): scoring, flags included, adds no metadata and no
    change to Orthanc's own API (Orthanc's integration suite passes as on bare Orthanc)."""
    with scoring_server(tmp_path, None) as server:
        images = server.json("/minipacs/images?limit=1000")["items"]
        assert any(i["Flagged"] for i in images)
        for image in images:
            names = server.json(f"/instances/{image['OrthancID']}/metadata")
            assert not [name for name in names if name.startswith("MiniPacs")], image
        assert "UpdatedMetadata" not in {c["ChangeType"] for c in changes(server)}
        assert server.json("/minipacs/")["orthanc"]["publish"] == "none"


def test_publishing_the_flags_only(tmp_path):
    """PublishToOrthanc "flagged": normal images keep Orthanc's own metadata and change log; a
    flagged image gets one write (its reason); a rescore that clears a flag deletes it."""
    with scoring_server(tmp_path, "flagged") as server:
        images = server.json("/minipacs/images?limit=1000")["items"]
        flagged = [i for i in images if i["Flagged"]]
        assert flagged and len(flagged) < len(images)
        for image in images:
            names = set(server.json(f"/instances/{image['OrthancID']}/metadata"))
            ours = {name for name in names if name.startswith("MiniPacs")}
            assert ours == ({"MiniPacsAnomalyReason"} if image["Flagged"] else set()), image
        kinds = [c["ChangeType"] for c in changes(server)]
        assert kinds.count("UpdatedMetadata") == len(flagged), "one change per flagged image only"
        lenient = brightness_model(tmp_path / "lenient.onnx", size=16, threshold=0.0, version="lenient")
        progress = rescore(server, lenient)
        assert progress["State"] == "done" and progress["Failed"] == 0
        still = [i for i in server.json("/minipacs/images?limit=1000")["items"] if i["Flagged"]]
        cleared = [i for i in flagged if i["SOPInstanceUID"] not in {s["SOPInstanceUID"] for s in still}]
        assert cleared, "the lenient model clears some flags"
        for image in cleared:
            assert "MiniPacsAnomalyReason" not in server.json(f"/instances/{image['OrthancID']}/metadata")


def test_a_study_is_labelled_while_it_has_a_flagged_image(scored):
    """Orthanc >= 1.12 (Debian 13: 1.12.7): the label follows rescores and deletions."""
    study = scored.json("/studies")[0]
    if not scored.json("/minipacs/")["orthanc"]["labels"]:  # Orthanc 1.10: no labels route at all
        assert "HasLabels" not in scored.json("/system")
        assert scored.get(f"/studies/{study}/labels").status_code == 404
        return
    everything = set(scored.json("/studies"))
    assert rescore(scored, scored.work / "strict.onnx")["State"] == "done"
    assert labelled_studies(scored) == flagged_studies(scored) == everything
    never = brightness_model(scored.work / "never.onnx", size=16, threshold=0.0, version="never")
    assert rescore(scored, never)["State"] == "done"
    assert flagged_studies(scored) == set() == labelled_studies(scored)
    assert rescore(scored, scored.work / "bright.onnx")["State"] == "done"
    flagged = flagged_studies(scored)
    assert flagged and labelled_studies(scored) == flagged
    # A study with flagged and unflagged images keeps its label until its last flagged image goes.
    images = scored.json("/minipacs/images?limit=1000")["items"]
    by_study: dict[str, list[dict]] = {}
    for image in images:
        by_study.setdefault(scored.json(f"/instances/{image['OrthancID']}/study")["ID"], []).append(image)
    study, its = next((s, i) for s, i in by_study.items()
                      if any(x["Flagged"] for x in i) and not all(x["Flagged"] for x in i))
    doomed = [image for image in its if image["Flagged"]]
    for number, image in enumerate(doomed, 1):
        assert scored.session.delete(f"{scored.url}/instances/{image['OrthancID']}").status_code == 200
        deadline = time.monotonic() + 10  # Orthanc announces the deletion from its change thread
        while (scored.get(f"/minipacs/images/{image['SOPInstanceUID']}/score").status_code != 404
               or (study in labelled_studies(scored)) != (number < len(doomed))):
            assert time.monotonic() < deadline, (number, len(doomed))
            time.sleep(0.2)
    assert labelled_studies(scored) == flagged - {study} and study in scored.json("/studies")


def test_check_revisions_is_honoured(tmp_path):
    """With CheckRevisions (and authentication) on, Orthanc refuses a metadata write over an
    existing value without If-Match: minipacs sends the revision, so rescoring with another
    model replaces every published score, and no write is refused."""
    with scoring_server(tmp_path, "all", slices=4, CheckRevisions=True, AuthenticationEnabled=True,
                        RegisteredUsers={"alice": "secret"}) as server:
        first = server.json("/minipacs/images?limit=1000")["items"]
        sample = first[0]["OrthancID"]
        refused = server.session.put(f"{server.url}/instances/{sample}/metadata/MiniPacsFlagged", data="x")
        assert refused.status_code == 409, "Orthanc checks revisions"
        strict = reason_model(tmp_path / "strict.onnx", {"picture": -10.0, "overlay": 10.0},
                              {"picture": 5.0, "overlay": -5.0}, size=16, threshold=0.999, version="strict")
        progress = rescore(server, strict)
        assert progress["State"] == "done" and progress["Failed"] == 0, progress
        for image in server.json("/minipacs/images?limit=1000")["items"]:
            assert image["Flagged"]
            score = server.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsAnomalyScore").text
            assert float(score) == pytest.approx(image["AnomalyScore"], abs=1e-6)
            assert server.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsFlagged").text == "1"
            reason = server.get(f"/instances/{image['OrthancID']}/metadata/MiniPacsAnomalyReason").text
            assert reason == image["AnomalyReason"]
