"""Reviews and the KOS on a real Orthanc with authentication: the reviewer is the user Orthanc
authenticated, a study's Key Object Selection document (Rejected for Quality Reasons) is stored
in Orthanc, passes dciodvfy (dicom3tools) without an error, is indexed as a document (never
rendered, scored or flagged), follows the reviews (the previous one deleted), and a deleted
instance takes its reviews with it."""

import subprocess
import time

import pydicom
import pytest

from minipacs import kos, synth
from onnx_models import brightness_model
from orthanc_server import OrthancServer
from test_orthanc_scoring import changes

USER, PASSWORD = "alice", "s3cret"


def dciodvfy_errors(data: bytes, tmp_path) -> list[str]:
    path = tmp_path / "kos.dcm"
    path.write_bytes(data)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def wait_for(condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("kos")
    server = OrthancServer(work / "orthanc", AuthenticationEnabled=True, RegisteredUsers={USER: PASSWORD})
    server.config["MiniPacs"]["ModelPath"] = str(brightness_model(work / "m.onnx", threshold=0.45))
    server.start()
    server.session.auth = (USER, PASSWORD)
    try:
        for ds in synth.generate(2, seed=4, size=64, slices=6, anomalies=1.0):
            assert server.upload(synth.encode(ds)).status_code == 200
        server.wait_for_ingest()
        yield server
    finally:
        server.stop()


def review(server, uid, **body):
    answer = server.session.post(f"{server.url}/minipacs/images/{uid}/review", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def kos_file(server, orthanc_id) -> pydicom.Dataset:
    answer = server.get(f"/instances/{orthanc_id}/file")
    assert answer.status_code == 200
    return answer.content


def listed(data: bytes) -> set[str]:
    from io import BytesIO

    ds = pydicom.dcmread(BytesIO(data))
    return {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in ds.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")}


def test_kos_follows_the_reviews_and_passes_dciodvfy(server, tmp_path):
    flagged = server.json("/minipacs/anomalies?limit=1000")["items"]
    by_study = {}
    for image in flagged:
        by_study.setdefault(image["StudyInstanceUID"], []).append(image)
    # A study with two flagged images at least, and an image not flagged (to report as missed).
    study, images = next((uid, found) for uid, found in sorted(by_study.items()) if len(found) >= 2
                         and server.json(f"/minipacs/studies/{uid}/summary")["rendered"] > len(found))
    assert server.get(f"/minipacs/studies/{study}/kos").status_code == 404
    made = server.session.post(f"{server.url}/minipacs/studies/{study}/kos", timeout=60).json()
    assert set(made["Instances"]) == {i["SOPInstanceUID"] for i in images} and made["Replaced"] is None
    data = kos_file(server, made["OrthancID"])
    assert dciodvfy_errors(data, tmp_path) == []
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == kos.TITLE
    assert ds.SOPClassUID == kos.KOS_SOP_CLASS and ds.StudyInstanceUID == study and ds.Modality == "KO"
    assert listed(data) == set(made["Instances"])
    assert server.json(f"/minipacs/studies/{study}/kos")["SOPInstanceUID"] == made["SOPInstanceUID"]

    # The KOS is indexed as a document: no PNG, no score, no flag.
    server.wait_for_ingest()
    row = server.json(f"/minipacs/images/{made['SOPInstanceUID']}")
    assert row["Status"] == "no_pixel_data" and row["Png"] is None
    assert row["AnomalyScore"] is None and row["Flagged"] is None
    assert len(server.json("/minipacs/anomalies?limit=1000")["items"]) == len(flagged)

    # A dismissal replaces the KOS: the dismissed image leaves it, the old document is deleted.
    dismissed, kept = images[0], images[1:]
    answer = review(server, dismissed["SOPInstanceUID"], verdict="valid", comment="fine")
    assert answer["Current"]["Reviewer"] == USER  # Orthanc's authenticated user
    new = answer["KeyObject"]
    assert new["Replaced"] == made["SOPInstanceUID"] and new["SOPInstanceUID"] != made["SOPInstanceUID"]
    assert set(new["Instances"]) == {i["SOPInstanceUID"] for i in kept}
    assert server.get(f"/instances/{made['OrthancID']}").status_code == 404
    data = kos_file(server, new["OrthancID"])
    assert listed(data) == set(new["Instances"]) and dciodvfy_errors(data, tmp_path) == []

    # A reported miss joins it; a confirmed flag stays.
    missed = next(i for i in server.json(f"/minipacs/studies/{study}/series")["items"]
                  for i in server.json(f"/minipacs/series/{i['SeriesInstanceUID']}/images?limit=1000")["items"]
                  if i["Status"] == "rendered" and not i["Flagged"])
    answer = review(server, missed["SOPInstanceUID"], verdict="invalid", reason="broken_render:truncated")
    assert answer["Current"]["Outcome"] == "missed"
    review(server, kept[0]["SOPInstanceUID"], verdict="invalid", reason="broken_render:noise")
    latest = server.json(f"/minipacs/studies/{study}/kos")
    assert listed(kos_file(server, latest["OrthancID"])) == {i["SOPInstanceUID"] for i in kept} | {
        missed["SOPInstanceUID"]}
    wait_for(lambda: len(server.json("/instances")) == server.json("/minipacs/counts")["images"])
    kos_rows = [i for i in server.json("/minipacs/images?status=no_pixel_data&limit=1000")["items"]
                if i["SOPClassUID"] == kos.KOS_SOP_CLASS]
    assert [i["SOPInstanceUID"] for i in kos_rows] == [latest["SOPInstanceUID"]]  # one KOS per study

    # Deleted by hand in Orthanc: minipacs no longer names it.
    assert server.session.delete(f"{server.url}/instances/{latest['OrthancID']}").status_code == 200
    wait_for(lambda: server.get(f"/minipacs/studies/{study}/kos").status_code == 404)


def test_a_deleted_instance_takes_its_reviews_with_it(server):
    image = server.json("/minipacs/anomalies?limit=1")["items"][0]
    review(server, image["SOPInstanceUID"], verdict="valid")
    assert server.session.delete(f"{server.url}/instances/{image['OrthancID']}").status_code == 200
    wait_for(lambda: server.get(f"/minipacs/images/{image['SOPInstanceUID']}/review").status_code == 404)
    reviewed = server.json("/minipacs/reviews?limit=1000")["items"]
    assert image["SOPInstanceUID"] not in {i["SOPInstanceUID"] for i in reviewed}


def test_without_authentication_nobody_is_named(tmp_path):
    server = OrthancServer(tmp_path / "orthanc")
    server.config["MiniPacs"]["ModelPath"] = ""
    server.start()
    try:
        ds = next(synth.generate(1, seed=2, size=64, slices=2, anomalies=0))
        assert server.upload(synth.encode(ds)).status_code == 200
        server.wait_for_ingest()
        server.session.auth = ("mallory", "anything")  # Orthanc does not check it: not a user
        answer = review(server, ds.SOPInstanceUID, verdict="invalid", reason="picture")
        assert answer["Current"]["Reviewer"] is None and answer["Current"]["Outcome"] == "missed"
    finally:
        server.stop()


def test_automatic_key_objects_keep_one_kos_in_every_flagged_study(tmp_path):
    work = tmp_path
    server = OrthancServer(work / "orthanc")
    server.config["MiniPacs"].update(ModelPath=str(brightness_model(work / "m.onnx", threshold=0.45)),
                                     AutomaticKeyObjects=True)
    server.start()
    try:
        uploaded = 0
        for ds in synth.generate(1, seed=4, size=64, slices=4, anomalies=1.0):
            assert server.upload(synth.encode(ds)).status_code == 200
            uploaded += 1
        server.wait_for_ingest()
        # Written once the study's flags have settled (kos.SETTLE seconds): one document per
        # study, not one per flagged image.
        assert server.json("/minipacs/ingest")["worker"]["key_objects_pending"] >= 1
        wait_for(lambda: server.json("/minipacs/ingest")["worker"]["key_objects_pending"] == 0)
        flagged = {}
        for image in server.json("/minipacs/anomalies?limit=1000")["items"]:
            flagged.setdefault(image["StudyInstanceUID"], set()).add(image["SOPInstanceUID"])
        assert flagged
        for study in server.json("/minipacs/studies?limit=1000")["items"]:
            uid = study["StudyInstanceUID"]
            answer = server.get(f"/minipacs/studies/{uid}/kos")
            if uid not in flagged:
                assert answer.status_code == 404, uid
                continue
            assert answer.status_code == 200, uid
            assert listed(kos_file(server, answer.json()["OrthancID"])) == flagged[uid]
        wait_for(lambda: server.json("/minipacs/ingest")["worker"]["idle"]
                 and len(server.json("/instances")) == server.json("/minipacs/counts")["images"])
        kos_rows = [i for i in server.json("/minipacs/images?status=no_pixel_data&limit=1000")["items"]
                    if i["SOPClassUID"] == kos.KOS_SOP_CLASS]
        assert sorted(i["StudyInstanceUID"] for i in kos_rows) == sorted(flagged)  # one per study
        written = [c for c in changes(server) if c["ChangeType"] == "NewInstance"][uploaded:]
        assert len(written) == len(flagged), "one document per flagged study, none replaced"
    finally:
        server.stop()
