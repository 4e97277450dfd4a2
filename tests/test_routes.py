"""The /minipacs routes as a pure function, on a real index filled from real files."""

import json

import pytest

from minipacs import index as idx
from minipacs import reasons
from minipacs.ingest import Settings
from minipacs.routes import Router
from test_ingest_and_index import run

NAMES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "rtplan.dcm")


@pytest.fixture
def router(tmp_path):
    index = idx.Index(tmp_path / "index.sqlite")
    settings = Settings(tmp_path / "png", 1)
    settings.png_directory.mkdir()
    for name in NAMES:
        run(index, settings, name)
    return Router(index, settings.png_directory, lambda: {"idle": True})


def get(router, path, **query):
    response = router.handle("GET", path, {k: str(v) for k, v in query.items()})
    body = json.loads(response.body) if response.content_type == "application/json" else response.body
    return response.status, body


def test_welcome_names_the_version(router):
    status, body = get(router, "")
    assert status == 200 and body["name"] == "minipacs" and body["version"]
    assert get(router, "/")[0] == 200


def test_counts_agree_between_routes(router):
    _, counts = get(router, "counts")
    for level in ("patients", "studies", "series", "images"):
        assert get(router, f"{level}/count") == (200, {"count": counts[level]})
        status, page = get(router, level)
        assert status == 200 and page["total"] == counts[level] == len(page["items"])


def test_patient_routes(router):
    status, patient = get(router, "patients/1CT1")
    assert status == 200 and patient["PatientID"] == "1CT1"
    _, studies = get(router, "patients/1CT1/studies")
    assert studies["total"] == 1
    assert studies["items"][0]["PatientID"] == "1CT1"
    assert get(router, "patients/1CT1/studycount")[1] == {"PatientID": "1CT1", "studies": 1}
    assert get(router, "patients/1CT1/seriescount")[1] == {"PatientID": "1CT1", "series": 1}
    assert get(router, "patients/1CT1/imagecount")[1] == {"PatientID": "1CT1", "images": 1}
    assert get(router, "patients/1CT1/counts")[1] == {"PatientID": "1CT1", "studies": 1,
                                                      "series": 1, "images": 1}


def test_walk_down_the_hierarchy(router):
    _, studies = get(router, "studies")
    for study in studies["items"]:
        assert get(router, f"studies/{study['StudyInstanceUID']}")[1] == study
        _, series = get(router, f"studies/{study['StudyInstanceUID']}/series")
        for one in series["items"]:
            assert one["StudyInstanceUID"] == study["StudyInstanceUID"]
            _, images = get(router, f"series/{one['SeriesInstanceUID']}/images")
            for image in images["items"]:
                assert get(router, f"images/{image['SOPInstanceUID']}")[1] == image


def test_image_info_has_the_predecessors_eight_keys(router):
    _, images = get(router, "images", status="rendered")
    ct = next(i for i in images["items"] if i["PatientID"] == "1CT1")
    for name in (ct["OrthancID"], ct["OrthancID"] + ".png"):
        status, info = get(router, f"imageinfo/{name}")
        assert status == 200
        assert sorted(info) == sorted(["InstanceNumber", "PatientID", "RescaleIntercept",
                                       "RescaleSlope", "SeriesDescription", "StudyDescription",
                                       "WindowCenter", "WindowWidth"])
        assert info["PatientID"] == "1CT1" and info["WindowWidth"] == ct["WindowWidth"]


def test_png_route(router):
    _, images = get(router, "images", status="rendered")
    status, body = get(router, f"images/{images['items'][0]['SOPInstanceUID']}/png")
    assert status == 200 and body.startswith(b"\x89PNG")
    _, plans = get(router, "images", status="no_pixel_data")
    status, error = get(router, f"images/{plans['items'][0]['SOPInstanceUID']}/png")
    assert status == 404 and error["Status"] == "no_pixel_data"


def test_pagination(router):
    _, first = get(router, "images", limit=2)
    _, second = get(router, "images", limit=2, offset=2)
    assert (first["limit"], first["offset"], second["offset"]) == (2, 0, 2)
    ids = [i["OrthancID"] for i in first["items"] + second["items"]]
    assert len(ids) == len(set(ids)) == 4
    assert get(router, "images", offset=100)[1]["items"] == []


@pytest.mark.parametrize("path, query, status", [
    ("patients/nobody", {}, 404),
    ("patients/nobody/studies", {}, 404),
    ("patients/nobody/counts", {}, 404),
    ("studies/1.2.3", {}, 404),
    ("series/1.2.3/images", {}, 404),
    ("images/1.2.3", {}, 404),
    ("images/1.2.3/png", {}, 404),
    ("imageinfo/00000000-00000000-00000000-00000000-00000000.png", {}, 404),
    ("nowhere", {}, 404),
    ("imageinfo/../../etc/passwd", {}, 400),
    ("imageinfo/x.png", {}, 400),
    ("images", {"limit": "-1"}, 400),
    ("images", {"limit": "0"}, 400),
    ("images", {"limit": "1001"}, 400),
    ("images", {"limit": "ten"}, 400),
    ("images", {"offset": "1e3"}, 400),
    ("images", {"offset": ""}, 400),
    ("images", {"offset": "１２"}, 400),  # fullwidth digits are digits to str.isdigit
    ("patients/", {}, 404),
    ("images", {"status": "weird"}, 400),
])
def test_errors_are_json_with_the_right_status(router, path, query, status):
    got, body = get(router, path, **query)
    assert got == status and body["status"] == status and body["error"]


def test_other_methods_are_not_allowed(router):
    for method in ("POST", "PUT", "DELETE"):
        response = router.handle(method, "patients/count", {})
        assert response.status == 405


def test_unknown_query_parameters_are_refused_naming_the_accepted_ones(router):
    """A typo (?limt=) once returned everything unfiltered."""
    status, body = get(router, "anomalies", limt=3)
    assert status == 400 and "'limt'" in body["error"]
    assert body["Accepted"] == ["limit", "offset", "patient", "study", "series", "modality",
                                "min_score", "reason", "reviewed"]
    assert get(router, "patients", status="rendered")[0] == 400  # a filter of images only
    assert get(router, "images", status="rendered")[0] == 200
    status, body = get(router, "counts", x="1")
    assert status == 400 and body["Accepted"] == [] and "accepts none" in body["error"]
    assert router.handle("POST", "model/reload", {"Path": "m.onnx"}, b"{}").status == 400


def test_query_names_and_values_are_percent_decoded_once(router):
    """Orthanc 1.10.1 hands them over as sent: SYN009%2D00001 must find SYN009-00001."""
    _, rendered = get(router, "images", status="rendered")
    assert get(router, "images", status="render%5Ffailed")[0] == 200
    assert get(router, "images", **{"st%61tus": "rendered"})[1] == rendered
    patient = rendered["items"][0]["PatientID"]
    escaped = "".join(f"%{ord(c):02X}" for c in patient)
    assert get(router, "patients", limit="%31")[1]["limit"] == 1
    router.index.set_scores([{"orthanc_id": rendered["items"][0]["OrthancID"], "anomaly_score": 0.9,
                              "flagged": 1, "anomaly_reason": "picture", "model_version": "test",
                              "threshold": 0.5}])
    assert get(router, "anomalies", patient=escaped)[1]["total"] == 1
    assert get(router, "anomalies", patient=f"{patient}%2525")[1]["total"] == 0  # "%25" once


def test_pages_keep_the_order_at_every_offset(router):
    for level in ("patients", "studies", "series", "images"):
        _, whole = get(router, level)
        pieces = [get(router, level, limit=1, offset=n)[1]["items"][0] for n in range(whole["total"])]
        assert pieces == whole["items"], level


def test_images_by_status_have_their_total(router):
    _, rendered = get(router, "images", status="rendered")
    assert rendered["total"] == len(rendered["items"]) == 3
    assert get(router, "images", status="unreadable")[1] == {"items": [], "total": 0, "limit": 25,
                                                             "offset": 0}


def test_anomalies_by_patient_study_series_and_modality(router):
    _, images = get(router, "images", status="rendered")
    router.index.set_scores([{"orthanc_id": image["OrthancID"], "anomaly_score": score, "flagged": 1,
                              "anomaly_reason": "picture", "model_version": "test", "threshold": 0.5}
                             for image, score in zip(images["items"], (0.7, 0.9, 0.8))])
    _, everything = get(router, "anomalies")
    assert [i["AnomalyScore"] for i in everything["items"]] == [0.9, 0.8, 0.7]
    for key, field in (("patient", "PatientID"), ("study", "StudyInstanceUID"),
                       ("series", "SeriesInstanceUID"), ("modality", "Modality")):
        for image in (i for i in images["items"] if i[field]):  # an empty value filters nothing
            expected = [i for i in everything["items"] if i[field] == image[field]]
            _, page = get(router, "anomalies", **{key: image[field]})
            assert (page["items"], page["total"]) == (expected, len(expected)), key
    assert get(router, "anomalies", limit=1, offset=1)[1]["items"] == everything["items"][1:2]


def test_anomalies_by_reason_and_its_family(router):
    _, images = get(router, "images", status="rendered")
    why = ("broken_render:noise", "picture", "broken_render:blank")
    router.index.set_scores([{"orthanc_id": image["OrthancID"], "anomaly_score": score, "flagged": 1,
                              "anomaly_reason": reason, "model_version": "test", "threshold": 0.5}
                             for image, score, reason in zip(images["items"], (0.7, 0.9, 0.8), why)])

    def found(reason, **query):
        status, page = get(router, "anomalies", reason=reason, **query)
        assert status == 200 and page["total"] == len(page["items"]), reason
        return [i["AnomalyReason"] for i in page["items"]]

    assert found("broken_render") == ["broken_render:blank", "broken_render:noise"]  # by score
    assert found("broken_render:noise") == ["broken_render:noise"]
    assert found("broken_render%3Anoise") == ["broken_render:noise"]  # as Orthanc hands it over
    assert found("picture") == ["picture"]
    assert found("overlay") == found("anomaly") == found("broken_render:truncated") == []
    assert found("") == ["picture", "broken_render:blank", "broken_render:noise"]  # no filter
    noisy = images["items"][0]
    assert sorted(found("broken_render", modality=noisy["Modality"])) == sorted(
        r for i, r in zip(images["items"], why) if i["Modality"] == noisy["Modality"] and r != "picture")
    for nonsense in ("nonsense", "broken", "broken_render:", "pict*", "picture:x", "Picture"):
        status, error = get(router, "anomalies", reason=nonsense)
        assert status == 400 and error["status"] == 400, nonsense
        assert repr(nonsense) in error["error"] and "broken_render:noise" in error["error"]
        assert error["Reasons"] == [*reasons.REASONS, "broken_render", "anomaly"]
    status, score = get(router, f"images/{noisy['SOPInstanceUID']}/score")
    assert status == 200 and score["AnomalyReason"] == "broken_render:noise"
    assert get(router, f"images/{noisy['SOPInstanceUID']}")[1]["AnomalyReason"] == "broken_render:noise"


def strict(body: bytes):
    """JSON as a strict parser reads it (no NaN or Infinity)."""
    return json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_pages_written_by_sqlite_give_back_the_stored_values(router):
    """Pages are JSON written by SQLite: floats must read back as the same float (SQLite's own
    15 digits would not), booleans as booleans, non-finite floats and NULLs as null, and text
    beyond ASCII as itself."""
    _, images = get(router, "images", status="rendered")
    scores = (0.1 + 0.2, 1 / 3, 0.5000000000000001)
    router.index.set_scores([{"orthanc_id": image["OrthancID"], "anomaly_score": score,
                              "flagged": score > 0.5, "anomaly_reason": "overlay" if score > 0.5 else None,
                              "model_version": "test", "threshold": 2 ** -30}
                             for image, score in zip(images["items"], scores)])
    with router.index._connection() as db:
        db.execute("UPDATE images SET window_width = 9e999, rescale_slope = 1e-310")
        db.execute("UPDATE patients SET patient_name = 'Müller^Zoë \"quoted\"\t'")
    page = strict(router.handle("GET", "images", {"status": "rendered"}).body)
    assert sorted(i["AnomalyScore"] for i in page["items"]) == sorted(scores)
    for image in page["items"]:
        assert image["Flagged"] is (image["AnomalyScore"] > 0.5) and image["Threshold"] == 2 ** -30
        assert image["AnomalyReason"] == ("overlay" if image["Flagged"] else None)
        assert image["Inverted"] in (True, False) and image["WindowWidth"] is None
        assert image["RescaleSlope"] == 1e-310
        assert strict(router.handle("GET", f"images/{image['SOPInstanceUID']}", {}).body) == image
    assert strict(router.handle("GET", "anomalies", {}).body)["items"][0]["AnomalyScore"] == scores[2]
    plan = strict(router.handle("GET", "images", {"status": "no_pixel_data"}).body)["items"][0]
    assert plan["AnomalyScore"] is plan["Flagged"] is plan["Inverted"] is None
    patients = strict(router.handle("GET", "patients", {}).body)["items"]
    assert {p["PatientName"] for p in patients} == {'Müller^Zoë "quoted"\t'}
