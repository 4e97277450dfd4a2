"""minipacs inside a real Orthanc: real DICOM over REST and C-STORE, checked against Orthanc."""

import io
import time

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from corpus import find, pydicom_data_files
from orthanc_server import OrthancServer


def test_uploads_reached_orthanc_by_both_routes(orthanc):
    codes = orthanc.rest_results.values()
    assert sum(code == 200 for code in codes) >= 50  # pydicom's corpus also holds non-DICOM
    assert orthanc.storescu_result.returncode == 0, orthanc.storescu_result.stderr[-2000:]
    remote = orthanc.json("/instances?expand")
    stored_names = {i["MainDicomTags"].get("SOPInstanceUID") for i in remote}
    for path in pydicom_data_files()[:5]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID in stored_names, path.name


def test_counts_equal_orthancs_statistics(orthanc):
    stats = orthanc.json("/statistics")
    counts = orthanc.json("/minipacs/counts")
    assert counts == {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
                      "series": stats["CountSeries"], "images": stats["CountInstances"]}
    for level, key in (("patients", "CountPatients"), ("studies", "CountStudies"),
                       ("series", "CountSeries"), ("images", "CountInstances")):
        assert orthanc.json(f"/minipacs/{level}/count") == {"count": stats[key]}


def test_every_orthanc_instance_is_indexed_under_the_same_parents(orthanc):
    images = {i["OrthancID"]: i for i in orthanc.json("/minipacs/images?limit=1000")["items"]}
    for instance in orthanc.json("/instances?expand"):
        row = images.get(instance["ID"])
        assert row is not None, instance["MainDicomTags"]["SOPInstanceUID"]
        assert row["SOPInstanceUID"] == instance["MainDicomTags"]["SOPInstanceUID"].strip()
        series = orthanc.json(f"/series/{instance['ParentSeries']}")
        assert row["SeriesInstanceUID"] == series["MainDicomTags"]["SeriesInstanceUID"]
        assert row["Status"] in ("rendered", "no_pixel_data", "render_failed", "unreadable")


def test_patient_routes_agree_with_orthanc(orthanc):
    for orthanc_id in orthanc.json("/patients"):
        patient = orthanc.json(f"/patients/{orthanc_id}")
        patient_id = patient["MainDicomTags"].get("PatientID", "").strip()
        if not patient_id or "/" in patient_id:
            continue  # not addressable by a path segment; covered by the instance check
        mine = orthanc.json(f"/minipacs/patients/{patient_id}")
        if mine["OrthancID"] != orthanc_id:
            continue  # two Orthanc patients differ only by padding: the first is served
        studies = orthanc.json(f"/minipacs/patients/{patient_id}/studies?limit=1000")
        assert {s["OrthancID"] for s in studies["items"]} == set(patient["Studies"])
        series = sum(len(orthanc.json(f"/studies/{s}")["Series"]) for s in patient["Studies"])
        instances = len(orthanc.json(f"/patients/{orthanc_id}/instances"))
        assert orthanc.json(f"/minipacs/patients/{patient_id}/counts") == {
            "PatientID": patient_id, "studies": len(patient["Studies"]), "series": series,
            "images": instances}


def test_study_and_series_lookups_agree_with_orthanc(orthanc):
    for study_id in orthanc.json("/studies"):
        study = orthanc.json(f"/studies/{study_id}")
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        mine = orthanc.json(f"/minipacs/studies/{uid}")
        if mine["OrthancID"] != study_id:
            continue  # same StudyInstanceUID under two patients: the first is served
        series = orthanc.json(f"/minipacs/studies/{uid}/series?limit=1000")
        assert {s["OrthancID"] for s in series["items"]} == set(study["Series"])


def test_corpus_outcomes(orthanc):
    ingest = orthanc.json("/minipacs/ingest")
    # The corpus was rendered in sandboxed children (at least one per worker), started with the
    # Python Orthanc embeds (found from a sys.executable that is Orthanc itself: sandbox.interpreter).
    assert ingest["worker"]["renderers"] >= 2
    statuses = ingest["statuses"]
    assert statuses["rendered"] >= 45
    assert statuses["no_pixel_data"] >= 3  # RT plan, RT structure set, SR ...
    by_status = {s: orthanc.json(f"/minipacs/images?status={s}&limit=1000")["items"]
                 for s in statuses}
    failures = by_status.get("render_failed", []) + by_status.get("unreadable", [])
    assert all(f["StatusDetail"] for f in failures)
    rendered = {i["SOPInstanceUID"]: i for i in by_status["rendered"]}
    for name, photometric in (("CT_small.dcm", "MONOCHROME2"), ("RG1_UNCI.dcm", "MONOCHROME1"),
                              ("OBXXXX1A_rle.dcm", "PALETTE COLOR"), ("US1_J2KR.dcm", "YBR_RCT"),
                              ("emri_small_jpeg_ls_lossless.dcm", "MONOCHROME2")):
        ds = pydicom.dcmread(find(name), stop_before_pixels=True)
        assert rendered[ds.SOPInstanceUID]["PhotometricInterpretation"] == photometric, name


def test_png_route_serves_the_rendered_image(orthanc):
    ds = pydicom.dcmread(find("MR_small.dcm"), stop_before_pixels=True)
    answer = orthanc.get(f"/minipacs/images/{ds.SOPInstanceUID}/png")
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(answer.content)))
    assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.uint8
    image = orthanc.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    info = orthanc.json(f"/minipacs/imageinfo/{image['Png']}")
    assert info["PatientID"] == ds.PatientID and info["WindowWidth"] == image["WindowWidth"]
    assert orthanc.get(f"/minipacs/imageinfo/{image['OrthancID']}").json() == info


def test_multiframe_render_is_the_first_frame(orthanc):
    ds = pydicom.dcmread(find("emri_small.dcm"), stop_before_pixels=True)
    image = orthanc.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    assert image["NumberOfFrames"] == 10 and image["RenderedFrame"] == 0


@pytest.mark.parametrize("path, status", [
    ("/minipacs/patients/nobody", 404), ("/minipacs/studies/1.2.3/series", 404),
    ("/minipacs/imageinfo/etc%2Fpasswd", 400), ("/minipacs/images?limit=abc", 400),
    ("/minipacs/no/such/route", 404), ("/minipacs/anomalies?limt=3", 400),
])
def test_http_errors_are_json(orthanc, path, status):
    answer = orthanc.get(path)
    assert answer.status_code == status
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["status"] == status


def test_dot_segments_never_reach_the_file_system(orthanc):
    # Orthanc's HTTP server refuses ".." itself, before any plugin sees the request.
    answer = orthanc.get("/minipacs/imageinfo/..%2F..%2Fetc%2Fpasswd")
    assert answer.status_code == 404 and "root:" not in answer.text


def test_wrong_method_is_405(orthanc):
    """With the methods allowed, but no body: Orthanc 1.10.1 refuses one with a 405 (its
    SendHttpStatus raises ParameterOutOfRange and drops the connection). HEAD and OPTIONS never
    reach the plugin: Orthanc takes them for WebDAV and answers itself."""
    answer = orthanc.session.post(orthanc.url + "/minipacs/patients/count", data=b"{}")
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET" and answer.content == b""
    for method in ("HEAD", "OPTIONS"):
        assert orthanc.session.request(method, orthanc.url + "/minipacs/counts").status_code == 404


def test_resending_does_not_duplicate(orthanc):
    before = orthanc.json("/minipacs/counts")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert orthanc.upload(find(name).read_bytes()).status_code == 200
    assert orthanc.storescu([find("RG1_UNCI.dcm")]).returncode == 0
    orthanc.wait_for_ingest()
    assert orthanc.json("/minipacs/counts") == before


def test_bad_input_keeps_orthanc_up_and_is_recorded(orthanc):
    garbage = orthanc.upload(b"\x00not dicom at all" * 100)
    assert garbage.status_code == 400
    truncated = find("CT_small.dcm").read_bytes()[:5000]
    orthanc.upload(truncated)  # Orthanc decides whether to keep it; either way nothing breaks
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = ds.PixelData[:2000]  # Rows × Columns promise more
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert orthanc.upload(buffer.getvalue()).status_code == 200
    orthanc.wait_for_ingest()
    assert orthanc.alive()
    broken = orthanc.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    assert broken["Status"] == "render_failed" and "decode" in broken["StatusDetail"]
    assert orthanc.get(f"/minipacs/images/{ds.SOPInstanceUID}/png").status_code == 404
    stats = orthanc.json("/statistics")
    assert orthanc.json("/minipacs/counts")["images"] == stats["CountInstances"]
    # Orthanc kept the instance: minipacs never rejects or loses what was stored.
    assert orthanc.get(f"/instances/{broken['OrthancID']}").status_code == 200


def test_store_does_not_wait_for_rendering(orthanc):
    """Uploading answers before the worker is done: the queue is visible right after a store."""
    files = [find(n) for n in ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG3_UNCR.dcm", "RG3_UNCI.dcm")]
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        assert orthanc.upload(buffer.getvalue()).status_code == 200
    pending = orthanc.json("/minipacs/ingest")["worker"]
    orthanc.wait_for_ingest()
    assert pending["queued"] >= 1  # ~6 MB CR images take longer to render than to store


def test_a_burst_of_stores_is_rendered_after_it(tmp_path):
    """Orthanc's NewInstance changes reach the worker, which waits while a burst is stored."""
    from concurrent.futures import ThreadPoolExecutor

    ds = pydicom.dcmread(find("CT_small.dcm"))
    files = []
    for _ in range(60):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        files.append(buffer.getvalue())
    server = OrthancServer(tmp_path)
    server.config["MiniPacs"]["DeferWhileStoring"] = 30
    server.start()
    try:
        # The renderers start with Orthanc (model loaded): a burst sent before they are up
        # would be over before a worker could defer.
        deadline = time.monotonic() + 60
        while server.json("/minipacs/ingest")["worker"]["renderers"] < 2:
            assert time.monotonic() < deadline, "renderers not started"
            time.sleep(0.1)
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda data: requests.post(server.url + "/instances", data=data,
                                                             timeout=30).status_code, files))
        assert codes == [200] * 60
        worker = server.wait_for_ingest()["worker"]
        assert worker["deferred_s"] > 0 and worker["deferring"] is False
        assert server.json("/minipacs/images/count") == {"count": 60}
    finally:
        server.stop()


def test_instances_stored_while_down_are_caught_up_on_start(tmp_path):
    bare = OrthancServer(tmp_path, Plugins=[], PythonScript=None)
    bare.config.pop("PythonScript")
    bare.start()
    try:
        assert bare.upload(find("CT_small.dcm").read_bytes()).status_code == 200
    finally:
        bare.stop()
    with_plugin = OrthancServer(tmp_path)
    with_plugin.config["StorageDirectory"] = bare.config["StorageDirectory"]
    with_plugin.config["IndexDirectory"] = bare.config["IndexDirectory"]
    with_plugin.start()
    try:
        deadline = time.monotonic() + 30
        while with_plugin.json("/minipacs/counts")["images"] != 1:
            assert time.monotonic() < deadline, with_plugin.log_tail()
            time.sleep(0.2)
        assert with_plugin.json("/minipacs/patients/1CT1/imagecount")["images"] == 1
    finally:
        with_plugin.stop()


def test_routes_obey_orthanc_authentication(tmp_path):
    server = OrthancServer(tmp_path, AuthenticationEnabled=True,
                           RegisteredUsers={"qa": "secret"}).start()
    try:
        from minipacs.openapi import document

        for path, operations in document()["paths"].items():
            concrete = path.replace("{uid}", "x").replace("{name}", "x")
            for method in operations:
                answer = server.session.request(method, server.url + concrete, timeout=10)
                assert answer.status_code == 401, (method, path)
        for path in ("/ohif/", "/ohif/viewer", "/minipacs/ui"):
            assert server.get(path).status_code == 401, path
        assert server.get("/minipacs/counts", auth=("qa", "wrong")).status_code == 401
        answer = server.get("/minipacs/counts", auth=("qa", "secret"))
        assert answer.status_code == 200 and answer.json()["images"] == 0
    finally:
        server.stop()


def test_docker_configuration_requires_credentials(tmp_path, monkeypatch):
    """docker/orthanc.json as the image uses it (paths moved under tmp_path)."""
    import json
    from orthanc_server import ROOT

    config = json.loads((ROOT / "docker" / "orthanc.json").read_text())
    monkeypatch.setenv("MINIPACS_USER", "qa")
    monkeypatch.setenv("MINIPACS_PASSWORD", "s3cret")
    server = OrthancServer(tmp_path)
    overrides = {k: v for k, v in config.items()
                 if k not in ("StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort",
                              "PythonScript", "MiniPacs", "RemoteAccessAllowed")}
    server.config.update(overrides)
    server.start()
    try:
        assert server.get("/minipacs/").status_code == 401
        answer = server.get("/minipacs/", auth=("qa", "s3cret"))
        assert answer.status_code == 200 and answer.json()["name"] == "minipacs"
        assert config["RemoteAccessAllowed"] is True and config["AuthenticationEnabled"] is True
    finally:
        server.stop()


def test_orthancs_decoder_takes_over_where_pydicom_fails(orthanc, tmp_path):
    """JPEG-lossy.dcm (12-bit JPEG Extended) defeats pylibjpeg; Orthanc's DCMTK-based decoder
    gives the stored values, and the render is then identical to DCMTK's."""
    import subprocess

    path = find("JPEG-lossy.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    image = orthanc.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    assert image["Status"] == "rendered" and image["Decoder"] == "fallback"
    png = np.asarray(Image.open(io.BytesIO(
        orthanc.get(f"/minipacs/images/{ds.SOPInstanceUID}/png").content)))
    option = ["+Wi", "1"] if image["WindowSource"] == "dataset" else ["+Wm"]
    subprocess.run(["dcmj2pnm", *option, "--write-png", str(path), str(tmp_path / "ref.png")],
                   check=True, capture_output=True)
    assert np.array_equal(png, np.asarray(Image.open(tmp_path / "ref.png")))


def test_orthanc_stops_cleanly_with_minipacs(tmp_path):
    """Exit status 0 after SIGTERM, every route of the plugin having been used. orthanc-python
    5.0 (Debian 13) took Orthanc down with SIGSEGV at every stop while it held the last
    reference to a REST callback (a bound method): nothing else noticed."""
    server = OrthancServer(tmp_path).start()
    try:
        assert server.upload(find("CT_small.dcm").read_bytes()).status_code == 200
        server.wait_for_ingest()
        assert server.json("/minipacs/counts")["images"] == 1
        assert server.get("/ohif/").status_code in (200, 404)  # 404: OHIF not installed
    finally:
        status = server.stop()
    assert status == 0, server.log_tail()
    assert server.log_tail(1).endswith("Orthanc has stopped")


def test_a_bad_configuration_leaves_orthanc_running_and_says_why(tmp_path):
    server = OrthancServer(tmp_path)
    server.config["MiniPacs"]["PngCompressLevel"] = 42
    server.start()
    try:
        answer = server.get("/minipacs/counts")
        assert answer.status_code == 503 and "PngCompressLevel must be within 0..3" in answer.json()["error"]
        assert server.upload(find("CT_small.dcm").read_bytes()).status_code == 200
        assert server.json("/statistics")["CountInstances"] == 1
    finally:
        status = server.stop()
    assert status == 0, server.log_tail()  # the routes that answer 503 are callbacks too
    # Fixed, the plugin catches up with what was stored meanwhile.
    server.config["MiniPacs"]["PngCompressLevel"] = 1
    server.start()
    try:
        deadline = time.monotonic() + 30
        while server.json("/minipacs/counts")["images"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        server.stop()
