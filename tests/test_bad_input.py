"""Malformed input, generated here from a real CT slice: every stored instance gets a status
with a clear reason, no PNG is written from pixels that could not be decoded, Orthanc stays up,
and minipacs's memory stays bounded."""

import http.client
import inspect
import io
import json
import re

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from corpus import find
from minipacs import ingest
from orthanc_server import OrthancServer
from test_codestream import hostile
from test_limits import (deflated_cases, doubling_lut, float_at_the_budget, overlay_larger_than_the_image,
                         overlay_over_the_budget, palette, with_values)

# limits.check_deflated must run before pydicom inflates a file (in ingest.read_dataset):
# until it does, the deflate bombs would cost gigabytes here, so they are left out.
DEFLATE_BOUND = "check_deflated" in inspect.getsource(ingest.read_dataset)


def ct() -> Dataset:
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def nested(depth: int) -> Sequence:
    item = Dataset()
    item.CodeMeaning = "leaf"
    for _ in range(depth):
        parent = Dataset()
        parent.ContentSequence = Sequence([item])
        item = parent
    return Sequence([item])


def cases():
    """name → (dataset or bytes, expected status, regular expression of the reason)."""
    out = {}
    ds = ct()
    ds.Rows = 256
    out["rows_larger_than_the_data"] = (ds, "render_failed", "less than expected")
    ds = ct()
    ds.Rows = 64
    out["rows_smaller_than_the_data"] = (ds, "rendered", "larger than the given .* 'Number of Frames'")
    for name, width in (("zero_window_width", 0), ("negative_window_width", -10)):
        ds = ct()
        ds.WindowCenter, ds.WindowWidth = 40, width
        out[name] = (ds, "rendered", None)
    ds = ct()
    ds.Rows = ds.Columns = 60000
    out["huge_dimensions"] = (ds, "render_failed", "more than minipacs renders")
    ds = ct()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 20])
    out["garbage_jpeg_pixel_data"] = (ds, "render_failed", "cannot decode pixel data .JPEG Baseline")
    ds = ct()
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    out["unknown_transfer_syntax"] = (ds, "rendered", None)  # by Orthanc's decoder: see below
    ds = ct()
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    del ds.RescaleSlope, ds.RescaleIntercept
    values = np.ones((ds.Rows, ds.Columns), np.float32)
    values[3, 3], values[4, 4] = np.nan, np.inf
    ds.FloatPixelData = values.tobytes()
    out["nan_and_inf_float_pixels"] = (ds, "render_failed", "NaN or infinite")
    ds = ct()
    ds.add_new(0x00280011, "US", None)  # Columns empty: a wrong value for a required element
    ds.Columns = None
    out["empty_columns"] = (ds, "render_failed", "Missing required element: .0028,0011. 'Columns'")
    ds = ct()
    del ds.Rows
    ds.add_new(0x00280010, "LO", "one hundred")  # Rows with a wrong VR and a non-number
    out["wrong_vr_for_rows"] = (ds, "render_failed", "Rows")
    ds = ct()
    ds.ContentSequence = nested(40)
    out["deep_sequences"] = (ds, "rendered", None)
    ds = ct()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg=山田^太郎"
    ds.PatientID = "ÄÖÜ-" + "x" * 60
    out["non_ascii_and_long_patient_id"] = (ds, "rendered", None)
    # Decoder bombs: a few hundred bytes whose codestream header claims 65535² (60000² for
    # JPEG 2000), refused before decoding (tests/test_codestream.py has the others).
    bombs = hostile()
    for name in ("jpeg_baseline_sof_65535", "jpeg_ls_sof55_65535", "j2k_siz_60000"):
        ds, reason = bombs[name]
        out[f"decoder_bomb_{name}"] = (ds, "render_failed", reason)
    # Other bombs (tests/test_limits.py has each in detail).
    out["segmented_lut_doubling"] = (palette(doubling_lut(40)), "render_failed",
                                     "segmented palette LUT expands to more than 65536 entries")
    out["overlay_46341"] = (overlay_over_the_budget(), "render_failed",
                            "overlay 6000 of 46341×46341 pixels is more than minipacs renders")
    out["overlay_4096_by_128_frames"] = (overlay_larger_than_the_image(), "rendered", None)
    # Absurd values: a window that is none falls back to min-max; a rescale is refused.
    for name, values in (("window_width_inf", {"WindowWidth": "inf", "WindowCenter": "40"}),
                         ("window_center_-9.22e18", {"WindowWidth": "400", "WindowCenter": "-9.22e18"}),
                         ("window_center_abc", {"WindowWidth": "400", "WindowCenter": "abc"})):
        out[name] = (with_values(**values), "rendered", None)
    for slope in ("nan", "1e308"):
        out[f"rescale_slope_{slope}"] = (with_values(RescaleSlope=slope), "render_failed",
                                         re.escape(f"Rescale Slope {float(slope):g} and Intercept "
                                                   "-1024 give modality values that are not finite"))
    ds = ct()
    ds.PatientID = ["SYN022-a", "b"]
    out["multi_valued_patient_id"] = (ds, "rendered", None)
    return out


def files():
    """name → (data set, file, status, reason) of cases whose file is not the data set as is."""
    ds, data = float_at_the_budget()
    out = {"float32_11585_deflated": (ds, data, "rendered", None)}
    if DEFLATE_BOUND:
        out.update({name: (ds, data, "render_failed", reason)
                    for name, (ds, data, reason) in deflated_cases().items()})
    return out


CASES = cases()
FILES = files()
CASES.update({name: (ds, status, reason) for name, (ds, _, status, reason) in FILES.items()})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("bad")).start()
    try:
        server.rss_at_start = rss_kb(server)
        server.answers = {name: server.upload(FILES[name][1] if name in FILES else encode(ds))
                          for name, (ds, _, _) in CASES.items()}
        truncated = encode(ct())
        server.answers["truncated_file"] = server.upload(truncated[: len(truncated) - 9000])
        server.answers["garbage_bytes"] = server.upload(np.random.default_rng(1).bytes(5000))
        server.wait_for_ingest()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_malformed_instance_gets_a_status_and_a_reason(server, name):
    ds, status, reason = CASES[name]
    assert server.answers[name].status_code == 200, server.answers[name].text
    image = server.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    assert image["Status"] == status, image["StatusDetail"]
    if reason:
        assert image["StatusDetail"] and re.search(reason, image["StatusDetail"])
    png = server.data / "png" / f"{image['OrthancID']}.png"
    assert png.exists() == (status == "rendered")


def rss_kb(server) -> int:
    return int(open(f"/proc/{server.process.pid}/status").read().split("VmRSS:")[1].split()[0])


def test_memory_stays_bounded(server):
    """A 60000² frame, frames whose codestream claims 65535², LUT segments, overlays and
    deflated data that would expand to gigabytes are refused before anything is allocated, and
    a float frame at the budget is rendered a chunk at a time, in the sandboxed renderers:
    Orthanc's own resident memory grows by far less than they would take (4 to 17 GB)."""
    assert server.alive()
    grown = rss_kb(server) - server.rss_at_start
    assert grown < 512_000, f"Orthanc's memory grew by {grown} kB"


def test_files_orthanc_refuses_leave_no_trace_and_orthanc_stays_up(server):
    assert server.answers["garbage_bytes"].status_code == 400
    # A file cut in its pixel data: DCMTK refuses it.
    assert server.answers["truncated_file"].status_code == 400
    assert server.alive()
    stats = server.json("/statistics")
    assert server.json("/minipacs/counts")["images"] == stats["CountInstances"] == len(CASES)


def test_absurd_windows_fall_back_to_min_max(server):
    plain = server.json(f"/minipacs/images/{CASES['window_center_abc'][0].SOPInstanceUID}")
    for name in ("window_width_inf", "window_center_-9.22e18", "window_center_abc"):
        image = server.json(f"/minipacs/images/{CASES[name][0].SOPInstanceUID}")
        assert (image["WindowSource"], image["WindowCenter"], image["WindowWidth"]) == \
            ("minmax", plain["WindowCenter"], plain["WindowWidth"]), name


def test_multi_valued_patient_id_is_indexed_as_dicom_encodes_it(server):
    ds = CASES["multi_valued_patient_id"][0]
    image = server.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    assert image["PatientID"] == "SYN022-a\\b"
    patient = server.json(f"/instances/{image['OrthancID']}/patient")
    assert patient["MainDicomTags"]["PatientID"] == image["PatientID"]
    found = server.get("/minipacs/patients?limit=1000").json()["items"]
    ours = next(p for p in found if p["PatientID"] == image["PatientID"])
    assert ours["OrthancID"] == patient["ID"]


def raw_get(server, target: str) -> dict:
    """GET with the request target exactly as written (requests would decode %2D, %5F)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    connection.request("GET", target)
    return json.loads(connection.getresponse().read())


def test_query_values_are_decoded_since_orthanc_hands_them_over_as_sent(server):
    failed = raw_get(server, "/minipacs/images?limit=1000&status=render%5Ffailed")
    assert failed["total"] == sum(status == "render_failed" for _, status, _ in CASES.values())
    everything = raw_get(server, "/minipacs/anomalies?limit=1000")["items"]
    ours = raw_get(server, "/minipacs/anomalies?limit=1000&patient=SYN022%2Da%5Cb")["items"]
    assert ours == [i for i in everything if i["PatientID"] == "SYN022-a\\b"]
    typo = raw_get(server, "/minipacs/anomalies?patinet=SYN022-a")
    assert typo["status"] == 400 and "'patinet'" in typo["error"] and "patient" in typo["Accepted"]


@pytest.mark.skipif(not DEFLATE_BOUND, reason="ingest.read_dataset does not call "
                                              "minipacs.limits.check_deflated yet")
def test_deflate_bombs_are_in_the_cases():
    assert set(deflated_cases()) <= set(CASES)


def test_orthancs_decoder_reads_what_pydicom_does_not_know(server):
    """pydicom has no decoder for an unknown transfer syntax; DCMTK (in Orthanc) reads the data
    set as it finds it, so the image is rendered, and the index says by which decoder."""
    ds = CASES["unknown_transfer_syntax"][0]
    image = server.json(f"/minipacs/images/{ds.SOPInstanceUID}")
    assert image["Decoder"] == "fallback" and image["TransferSyntaxUID"] == "1.2.826.0.1.3680043.9.9999.1"


def test_non_ascii_patient_is_reachable_by_its_id(server):
    ds = CASES["non_ascii_and_long_patient_id"][0]
    patient = server.json(f"/minipacs/patients/{ds.PatientID}")
    assert patient["PatientName"] == str(ds.PatientName)
    orthanc_id = server.json(f"/minipacs/images/{ds.SOPInstanceUID}")["OrthancID"]
    assert server.get(f"/instances/{orthanc_id}").status_code == 200
