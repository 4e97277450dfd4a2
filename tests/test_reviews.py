"""Reviews through the routes, on a real index filled from real files (pydicom's): verdicts
and their history, the filters of /minipacs/reviews, the counts per model version, and what
rescoring, re-sending and deleting do to them."""

import base64
import json
import time

import pytest

from minipacs import reviews
from minipacs.reconcile import remove
from test_ingest_and_index import run
import test_routes
from test_routes import get


router = test_routes.router  # the fixture: an index of real files


def post(router, path, body, user=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = router.handle("POST", path, {}, data, user)
    return response.status, json.loads(response.body)


def flag(router, image, score=0.9, reason="overlay", flagged=1, version="m1"):
    router.index.set_scores([{"orthanc_id": image["OrthancID"], "anomaly_score": score, "flagged": flagged,
                              "anomaly_reason": reason if flagged else None, "model_version": version,
                              "threshold": 0.5}])


@pytest.fixture
def images(router):
    items = get(router, "images", status="rendered")[1]["items"]
    assert len(items) >= 3
    flag(router, items[0], 0.9, "overlay")
    flag(router, items[1], 0.8, "broken_render:noise")
    flag(router, items[2], 0.1, flagged=0)
    return items


def test_confirm_dismiss_and_report_a_miss(router, images):
    first, second, third = (image["SOPInstanceUID"] for image in images[:3])
    status, answer = post(router, f"images/{first}/review", {"verdict": "invalid"}, "alice")
    assert status == 200
    current = answer["Current"]
    assert current["Verdict"] == "invalid" and current["Reason"] == "overlay"  # the model's, confirmed
    assert current["Reviewer"] == "alice" and current["Outcome"] == "confirmed" and current["ModelVersion"] == "m1"
    assert current["ModelFlagged"] is True and current["ModelScore"] == 0.9 and current["Revision"] == 1
    assert post(router, f"images/{second}/review", {"verdict": "valid", "comment": "a grid"})[1][
        "Current"]["Outcome"] == "dismissed"
    status, answer = post(router, f"images/{third}/review",
                          {"verdict": "invalid", "reason": "broken_render:truncated"})
    assert status == 200 and answer["Current"]["Outcome"] == "missed" and answer["Current"]["Reviewer"] is None
    # A later review replaces the verdict; the history keeps both, the current first.
    post(router, f"images/{second}/review", {"verdict": "invalid", "reason": "picture"}, "bob")
    status, answer = get(router, f"images/{second}/review")
    assert status == 200 and [r["Verdict"] for r in answer["History"]] == ["invalid", "valid"]
    assert answer["Current"] == answer["History"][0] and answer["Current"]["Revision"] == 2
    assert answer["History"][1]["Comment"] == "a grid"
    _, model = get(router, "model")
    assert model["Reviews"] == [{"ModelVersion": "m1", "Confirmed": 2, "Dismissed": 0, "Missed": 1,
                                 "Reviewed": 3, "Precision": 1.0}]
    post(router, f"images/{first}/review", {"verdict": "valid"})
    assert get(router, "model")[1]["Reviews"][0]["Precision"] == 0.5


@pytest.mark.parametrize("body, words", [
    ({"verdict": "maybe"}, "'verdict' must be"),
    ({"verdict": "invalid", "reason": "ugly"}, "needs a reason"),
    ({"verdict": "invalid", "reason": "anomaly"}, "needs a reason"),
    ({"verdict": "valid", "reason": "overlay"}, "takes no reason"),
    ({"verdict": "valid", "who": "me"}, "unknown key 'who'"),
    ({"verdict": "valid", "comment": 3}, "'comment' must be"),
    (b"not json", "body must be JSON"),
    (b"[1]", "body must be"),
])
def test_bad_reviews_get_a_clear_400_and_change_nothing(router, images, body, words):
    uid = images[0]["SOPInstanceUID"]
    status, answer = post(router, f"images/{uid}/review", body)
    assert status == 400 and words in answer["error"], answer
    assert get(router, f"images/{uid}/review")[1]["History"] == []


def test_a_miss_needs_a_reason_and_an_unknown_image_is_404(router, images):
    status, answer = post(router, f"images/{images[2]['SOPInstanceUID']}/review", {"verdict": "invalid"})
    assert status == 400 and "needs a reason" in answer["error"]
    assert post(router, "images/1.2.3.4/review", {"verdict": "valid"})[0] == 404
    assert get(router, "images/1.2.3.4/review")[0] == 404


def test_the_review_list_and_its_filters(router, images):
    first, second, third = (image["SOPInstanceUID"] for image in images[:3])
    _, unreviewed = get(router, "reviews", reviewed="false")
    assert [i["SOPInstanceUID"] for i in unreviewed["items"]] == [first, second]  # most anomalous first
    assert get(router, "anomalies", reviewed="false")[1]["total"] == 2
    for uid, body in ((first, {"verdict": "invalid"}), (second, {"verdict": "valid"}),
                      (third, {"verdict": "invalid", "reason": "broken_render:blank"})):
        post(router, f"images/{uid}/review", body)
        time.sleep(0.002)  # reviews a millisecond apart at least: their order is their time's
    assert get(router, "reviews", reviewed="false")[1]["total"] == 0
    assert get(router, "anomalies", reviewed="false")[1]["total"] == 0
    assert get(router, "anomalies", reviewed="true")[1]["total"] == 2
    _, page = get(router, "reviews")
    assert [i["SOPInstanceUID"] for i in page["items"]] == [third, second, first]  # latest first
    assert page["items"][0]["Review"]["Reason"] == "broken_render:blank" and page["total"] == 3

    def uids(**query):
        status, answer = get(router, "reviews", **query)
        assert status == 200, answer
        assert answer["total"] == len(answer["items"])
        return {i["SOPInstanceUID"] for i in answer["items"]}

    assert uids(verdict="invalid") == {first, third}
    assert uids(verdict="valid") == {second}
    assert uids(reason="broken_render") == {third} and uids(reason="overlay") == {first}
    assert uids(agrees="true") == {first} and uids(agrees="false") == {second, third}
    assert uids(model_version="m1") == {first, second, third} and uids(model_version="m2") == set()
    for key, query in (("PatientID", "patient"), ("StudyInstanceUID", "study"),
                       ("SeriesInstanceUID", "series"), ("Modality", "modality")):
        for image in (image for image in images[:3] if image[key]):  # an empty filter is none
            assert uids(**{query: image[key]}) == {i["SOPInstanceUID"] for i in images[:3]
                                                    if i[key] == image[key]}, query
    assert uids(series=images[2]["SeriesInstanceUID"], verdict="valid") == set()
    assert len(get(router, "reviews", limit=1, offset=1)[1]["items"]) == 1
    assert get(router, "reviews", reviewed="false", verdict="valid")[1]["total"] == 0  # none has one
    for query in ({"verdict": "maybe"}, {"agrees": "yes"}, {"reviewed": "1"}, {"reason": "anomaly"},
                  {"limit": "0"}):
        status, answer = get(router, "reviews", **query)
        assert status == 400 and answer["error"], query


def test_rescoring_and_resending_keep_reviews_and_deleting_takes_them(router, images, tmp_path):
    first, second = images[0], images[1]
    post(router, f"images/{first['SOPInstanceUID']}/review", {"verdict": "valid"})
    post(router, f"images/{second['SOPInstanceUID']}/review", {"verdict": "invalid"})
    flag(router, first, 0.2, flagged=0, version="m2")  # a rescore with a new model
    current = get(router, f"images/{first['SOPInstanceUID']}/review")[1]["Current"]
    assert current["Verdict"] == "valid" and current["ModelVersion"] == "m1" and current["ModelFlagged"]
    assert {i["SOPInstanceUID"] for i in get(router, "reviews", agrees="true")[1]["items"]} == {
        first["SOPInstanceUID"], second["SOPInstanceUID"]}  # the new model agrees now
    name = {"1CT1": "CT_small.dcm", "4MR1": "MR_small.dcm"}.get(first["PatientID"], "emri_small.dcm")
    from minipacs.ingest import Settings
    run(router.index, Settings(router.png_directory, 1), name)  # re-sent: the same row, upserted
    assert get(router, f"images/{first['SOPInstanceUID']}/review")[1]["Current"]["Verdict"] == "valid"
    remove(router.index, router.png_directory, "images", first["OrthancID"])
    assert get(router, f"images/{first['SOPInstanceUID']}/review")[0] == 404
    count = router.index._connection().execute("SELECT count(*) FROM reviews WHERE image = ?",
                                               (first["OrthancID"],)).fetchone()[0]
    assert count == 0
    remove(router.index, router.png_directory, "patients",
           router.index._connection().execute("SELECT orthanc_id FROM patients WHERE patient_id = ?",
                                              (second["PatientID"],)).fetchone()[0])
    assert router.index._connection().execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
    assert get(router, "model")[1]["Reviews"] == []


def test_the_reviewer_is_the_user_orthanc_authenticated():
    basic = {"authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}
    assert reviews.reviewer_from(basic, True) == "alice"
    assert reviews.reviewer_from({"Authorization": basic["authorization"]}, True) == "alice"
    assert reviews.reviewer_from(basic, False) is None  # not checked by Orthanc: anyone's claim
    assert reviews.reviewer_from({"authorization": "Bearer abc"}, True) is None
    assert reviews.reviewer_from({"authorization": "Basic !!"}, True) is None
    assert reviews.reviewer_from({}, True) is None
