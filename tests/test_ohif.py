"""OHIF 3 at /ohif/ in a real Orthanc, looked at in headless Chromium.

A synthetic chest CT goes in over REST; OHIF's viewer page, served by the plugin, must fetch it
from Orthanc's DICOMweb plugin and draw it: the viewport's pixels must show an image, not a blank
or uniform canvas. Screenshots go to test-artifacts/ohif/.
"""

import io
import time

import numpy as np
import pytest
from PIL import Image

from browser import ARTIFACTS as ALL_ARTIFACTS, chromium_page, wait_for_viewport_image
from minipacs import synth
from minipacs.config import DEFAULT_OHIF
from orthanc_server import OrthancServer

ARTIFACTS = ALL_ARTIFACTS / "ohif"


@pytest.fixture(scope="module")
def ohif_server(tmp_path_factory):
    if not (DEFAULT_OHIF / "index.html").is_file():
        pytest.fail(f"OHIF is not installed in {DEFAULT_OHIF}: run ./minipacs.sh setup")
    # No OhifDirectory: the default, the repository's .ohif/dist, is what is tested.
    server = OrthancServer(tmp_path_factory.mktemp("ohif")).start()
    try:
        cts = [ds for ds in synth.generate(patients=1, seed=1, size=256, slices=8, anomalies=0)
               if ds.Modality == "CT"]
        for ds in cts:
            assert server.upload(synth.encode(ds)).status_code == 200
        server.study_uid = cts[0].StudyInstanceUID
        yield server
    finally:
        server.stop()


def test_the_plugin_serves_ohif_under_ohif(ohif_server):
    index = ohif_server.get("/ohif/")
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    assert 'window.PUBLIC_URL="/ohif/"' in index.text
    assert 'src="/ohif/app-config.js"' in index.text
    # A client-side route gets the same page; a missing file is a JSON 404.
    assert ohif_server.get("/ohif/viewer").text == index.text
    missing = ohif_server.get("/ohif/no-such-chunk.js")
    assert missing.status_code == 404 and missing.json()["status"] == 404
    config = ohif_server.get("/ohif/app-config.js")
    assert config.status_code == 200 and '"/dicom-web"' in config.text
    # Same origin: the data source OHIF is told about answers.
    studies = ohif_server.json("/dicom-web/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == [ohif_server.study_uid]


def test_ohif_shows_the_ct_series(ohif_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    frames, failures, console = [], [], []
    started = time.monotonic()
    with chromium_page() as page:
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))

        def on_response(response):
            if "/dicom-web/" in response.url and "/frames/" in response.url:
                frames.append(response.status)
            elif response.status >= 400 and "/ohif/" in response.url:
                failures.append(f"{response.status} {response.url}")

        page.on("response", on_response)
        page.goto(f"{ohif_server.url}/ohif/viewer?StudyInstanceUIDs={ohif_server.study_uid}",
                  wait_until="domcontentloaded")
        try:
            canvas = wait_for_viewport_image(page)
        finally:
            page.screenshot(path=str(ARTIFACTS / "viewer.png"))
            (ARTIFACTS / "console.log").write_text("\n".join(console))
        viewport = canvas.screenshot(path=str(ARTIFACTS / "viewport.png"))
    elapsed = time.monotonic() - started

    assert not failures, failures
    assert frames and all(status == 200 for status in frames), frames
    pixels = np.asarray(Image.open(io.BytesIO(viewport)).convert("L"), dtype=np.float64)
    height, width = pixels.shape
    assert height > 200 and width > 200
    # A chest CT slice in its window: dark air around, a bright body in the middle.
    assert pixels.std() > 20, f"viewport looks uniform (std {pixels.std():.1f})"
    assert len(np.unique(pixels)) > 64
    centre = pixels[height // 3: 2 * height // 3, width // 3: 2 * width // 3].mean()
    corners = np.mean([pixels[:20, :20].mean(), pixels[:20, -20:].mean(),
                       pixels[-20:, :20].mean(), pixels[-20:, -20:].mean()])
    assert centre > corners + 20, (centre, corners)
    assert elapsed < 90, f"OHIF took {elapsed:.0f}s"


def test_without_ohif_the_route_says_so(tmp_path):
    server = OrthancServer(tmp_path, MiniPacs={"DataDirectory": str(tmp_path / "minipacs"),
                                               "OhifDirectory": str(tmp_path / "no-ohif")}).start()
    try:
        for path in ("/ohif", "/ohif/", "/ohif/viewer", "/ohif/app.bundle.js"):
            answer = server.get(path)
            assert answer.status_code == 404, path
            assert "OHIF is not installed" in answer.json()["error"]
        assert server.get("/minipacs/counts").status_code == 200 and server.alive()
    finally:
        server.stop()


def test_ohif_lists_the_kos_of_the_study(ohif_server):
    """A study's KOS (docs/reviews.md) is a series of modality KO in OHIF's study browser, under
    its description; OHIF does not display it as an image."""
    ohif_server.wait_for_ingest()
    image = ohif_server.json(f"/minipacs/studies/{ohif_server.study_uid}/series")["items"][0]
    image = ohif_server.json(f"/minipacs/series/{image['SeriesInstanceUID']}/images")["items"][0]
    answer = ohif_server.session.post(f"{ohif_server.url}/minipacs/images/{image['SOPInstanceUID']}/review",
                                      json={"verdict": "invalid", "reason": "picture"})
    assert answer.status_code == 200
    made = ohif_server.session.post(f"{ohif_server.url}/minipacs/studies/{ohif_server.study_uid}/kos").json()
    assert made["Instances"] == [image["SOPInstanceUID"]]
    with chromium_page() as page:
        page.goto(f"{ohif_server.url}/ohif/viewer?StudyInstanceUIDs={ohif_server.study_uid}",
                  wait_until="domcontentloaded")
        wait_for_viewport_image(page)
        page.get_by_text("minipacs: rejected for quality reasons").wait_for()
        page.screenshot(path=str(ARTIFACTS / "viewer-kos.png"))
        assert "KO" in page.inner_text("body")
