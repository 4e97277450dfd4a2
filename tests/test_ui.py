"""The flagged-images page, end to end in headless Chromium: the demo anomalies go in, the
shipped model flags them, /minipacs/ui lists them, and its link opens the study in OHIF."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import ARTIFACTS, chromium_page, wait_for_viewport_image
from minipacs import demo, reasons, synth
from minipacs.config import DEFAULT_MODEL, DEFAULT_OHIF
from orthanc_server import OrthancServer

UI = Path(__file__).resolve().parent.parent / "plugin" / "minipacs" / "ui.html"


def test_the_reason_filter_offers_exactly_the_reasons_the_route_takes():
    select = re.search(r'<select id="reason".*?</select>', UI.read_text(), re.S).group(0)
    options = re.findall(r'<option value="([^"]*)">', select)
    assert options[0] == "" and sorted(options[1:]) == sorted(reasons.FILTERS)
    assert len(options) == len(set(options))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    assert DEFAULT_MODEL.is_file() and (DEFAULT_OHIF / "index.html").is_file()
    server = OrthancServer(tmp_path_factory.mktemp("ui")).start()  # the shipped model
    try:
        server.anomalies = {}
        for ds in synth.generate(demo.PATIENTS, demo.SEED, slices=demo.SLICES, anomalies=demo.ANOMALIES):
            assert server.upload(synth.encode(ds)).status_code == 200
            if synth.anomaly_of(ds):
                server.anomalies[ds.SOPInstanceUID] = synth.anomaly_of(ds)
        server.wait_for_ingest()
        yield server
    finally:
        server.stop()


def test_the_shipped_model_flags_the_demo_anomalies(demo_server):
    flagged = {i["SOPInstanceUID"]: i for i in demo_server.json("/minipacs/anomalies?limit=1000")["items"]}
    assert len(demo_server.anomalies) >= 3
    missed = {uid: kind for uid, kind in demo_server.anomalies.items() if uid not in flagged}
    assert not missed, f"anomalies not flagged: {missed}"
    images = demo_server.json("/minipacs/images?limit=1000")["total"]
    assert len(flagged) <= len(demo_server.anomalies) + 0.02 * images, "too many false alarms"


def test_ui_lists_the_flagged_images_and_opens_them_in_ohif(demo_server):
    out = ARTIFACTS / "ui"
    out.mkdir(parents=True, exist_ok=True)
    expected = demo_server.json("/minipacs/anomalies?limit=200")["items"]
    with chromium_page() as page:
        page.goto(f"{demo_server.url}/minipacs/ui")
        page.wait_for_selector("tr.anomaly img.thumb")
        page.wait_for_function("""() => [...document.querySelectorAll('img.thumb')]
                                  .every(img => img.complete && img.naturalWidth > 0)""")
        page.screenshot(path=str(out / "ui.png"), full_page=True)
        assert page.locator("#pager").is_hidden() == (len(expected) <= 25)
        rows = page.locator("tr.anomaly")
        assert rows.count() == len(expected)
        shown = [float(s) for s in page.locator("tr.anomaly td.score").all_inner_texts()]
        assert shown == [round(i["AnomalyScore"], 3) for i in expected]
        why = page.locator("tr.anomaly td.reason").all_inner_texts()
        assert why == [i["AnomalyReason"] for i in expected] and all(why)
        for reason in (expected[0]["AnomalyReason"], "broken_render", "overlay", ""):
            wanted = demo_server.json(f"/minipacs/anomalies?limit=200&reason={reason}")["items"]
            page.select_option("#reason", reason)
            page.wait_for_selector(f'#anomalies[data-reason="{reason}"]', state="attached")
            assert page.locator("tr.anomaly td.reason").all_inner_texts() == [
                i["AnomalyReason"] for i in wanted], reason
            assert page.locator("#none").is_visible() == (not wanted), reason
            if reason == "broken_render":
                page.screenshot(path=str(out / "ui-broken-render.png"), full_page=True)
        assert rows.count() == len(expected)
        counts = page.locator("#counts").inner_text()
        assert f"{demo_server.json('/minipacs/counts')['images']} images" in counts
        first = expected[0]
        page.locator("a.ohif").first.click()
        page.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={first['StudyInstanceUID']}*")
        canvas = wait_for_viewport_image(page)
        page.screenshot(path=str(out / "ohif.png"))
        canvas.screenshot(path=str(out / "viewport.png"))
    pixels = np.asarray(Image.open(out / "viewport.png").convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 32


def test_ui_shows_peoples_words_filters_pages_and_previews(demo_server):
    """Descriptions and dates instead of UIDs; patient and modality filters as the route
    filters; pages of #limit=N rows; a click on a thumbnail shows the image large."""
    out = ARTIFACTS / "ui"
    out.mkdir(parents=True, exist_ok=True)
    expected = demo_server.json("/minipacs/anomalies?limit=200")["items"]
    assert len(expected) >= 3
    with chromium_page() as page:
        page.goto(f"{demo_server.url}/minipacs/ui#limit=2")
        page.wait_for_selector('#anomalies[data-shown="|||0"]', state="attached")
        for row, image in zip(page.locator("tr.anomaly").all(), expected[:2]):
            study = demo_server.json(f"/minipacs/studies/{image['StudyInstanceUID']}")
            series = demo_server.json(f"/minipacs/series/{image['SeriesInstanceUID']}")
            assert study["StudyDescription"] and series["SeriesDescription"]
            assert study["StudyDescription"] in row.locator("td.study").inner_text()
            day = study["StudyDate"]
            assert f"{day[:4]}-{day[4:6]}-{day[6:]}" in row.locator("td.study").inner_text()
            assert series["SeriesDescription"] in row.locator("td.series").inner_text()
            assert image["StudyInstanceUID"] not in row.inner_text()
        assert page.locator("#range").inner_text() == f"1–2 of {len(expected)}"
        page.click("#next")
        page.wait_for_selector('#anomalies[data-shown="|||2"]', state="attached")
        assert page.locator("tr.anomaly td.score").all_inner_texts() == [
            f"{i['AnomalyScore']:.3f}" for i in expected[2:4]]
        assert page.locator("#next").is_disabled() == (len(expected) <= 4)
        for field, key, value in (("patient", "PatientID", expected[0]["PatientID"]),
                                  ("modality", "Modality", expected[-1]["Modality"])):
            page.fill(f"#{field}", value)
            page.click("#filters button[type=submit]")
            shown = f'|{value}||0' if field == "patient" else f'|{expected[0]["PatientID"]}|{value}|0'
            page.wait_for_selector(f'#anomalies[data-shown="{shown}"]', state="attached")
            query = f"patient={expected[0]['PatientID']}" + (f"&modality={value}" if field == "modality" else "")
            wanted = demo_server.json(f"/minipacs/anomalies?limit=2&{query}")["items"]
            assert page.locator("tr.anomaly td.patient").all_inner_texts() == [i["PatientID"] for i in wanted]
        page.fill("#patient", "")
        page.fill("#modality", "")
        page.click("#filters button[type=submit]")
        page.wait_for_selector('#anomalies[data-shown="|||0"]', state="attached")
        page.locator("tr.anomaly img.thumb").first.click()
        preview = page.locator("#preview")
        preview.wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('#preview img').naturalWidth > 0")
        assert expected[0]["AnomalyReason"] in page.locator("#caption").inner_text()
        page.screenshot(path=str(out / "ui-preview.png"))
        page.keyboard.press("Escape")
        preview.wait_for(state="hidden")


def test_reviewing_from_the_page_with_the_mouse_and_the_keyboard(demo_server):
    """Confirm a flag with its reason, dismiss one with a key, report a missed anomaly on an
    image that is not flagged; each is in /minipacs/images/<uid>/review, and the view of the
    flags nobody reviewed no longer lists the two flags reviewed."""
    out = ARTIFACTS / "ui"
    out.mkdir(parents=True, exist_ok=True)
    unreviewed = demo_server.json("/minipacs/anomalies?limit=200&reviewed=false")["items"]
    assert len(unreviewed) >= 2
    confirmed, dismissed = unreviewed[0], unreviewed[1]
    with chromium_page() as page:
        page.goto(f"{demo_server.url}/minipacs/ui")
        page.select_option("#view", "unreviewed")
        page.wait_for_selector('#anomalies[data-view="unreviewed"]', state="attached")
        first = page.locator(f'tr.anomaly[data-uid="{confirmed["SOPInstanceUID"]}"]')
        first.locator("select.review-reason").select_option("picture")
        first.locator("input.review-comment").fill("a photograph of a screen")
        first.locator("button.confirm").click()
        page.wait_for_selector(f'tr.anomaly[data-uid="{confirmed["SOPInstanceUID"]}"][data-verdict="invalid"]')
        second = page.locator(f'tr.anomaly[data-uid="{dismissed["SOPInstanceUID"]}"]')
        second.focus()
        page.keyboard.press("d")
        page.wait_for_selector(f'tr.anomaly[data-uid="{dismissed["SOPInstanceUID"]}"][data-verdict="valid"]')
        assert "dismissed" in second.locator(".verdict").inner_text()
        page.screenshot(path=str(out / "ui-reviewed.png"), full_page=True)
        page.select_option("#view", "all")
        page.wait_for_selector('#anomalies[data-view="all"]', state="attached")
        missed = page.locator("tr.anomaly:has(button.report)").first
        missed_uid = missed.get_attribute("data-uid")
        missed.locator("select.review-reason").select_option("broken_render:truncated")
        missed.focus()
        page.keyboard.press("r")
        page.wait_for_selector(f'tr.anomaly[data-uid="{missed_uid}"][data-verdict="invalid"]')
        page.select_option("#view", "unreviewed")
        page.wait_for_selector('#anomalies[data-view="unreviewed"]', state="attached")
        shown = set(page.locator("tr.anomaly").evaluate_all("rows => rows.map(r => r.dataset.uid)"))
        assert shown.isdisjoint({confirmed["SOPInstanceUID"], dismissed["SOPInstanceUID"]})
        assert len(shown) == min(25, len(unreviewed) - 2)
    review = demo_server.json(f"/minipacs/images/{confirmed['SOPInstanceUID']}/review")["Current"]
    assert (review["Verdict"], review["Reason"], review["Comment"], review["Outcome"]) == (
        "invalid", "picture", "a photograph of a screen", "confirmed")
    review = demo_server.json(f"/minipacs/images/{dismissed['SOPInstanceUID']}/review")["Current"]
    assert (review["Verdict"], review["Reason"], review["Outcome"]) == ("valid", None, "dismissed")
    review = demo_server.json(f"/minipacs/images/{missed_uid}/review")["Current"]
    assert (review["Verdict"], review["Reason"], review["Outcome"]) == (
        "invalid", "broken_render:truncated", "missed")
    counts = demo_server.json("/minipacs/model")["Reviews"]
    assert [(c["Confirmed"], c["Dismissed"], c["Missed"]) for c in counts] == [(1, 1, 1)]
