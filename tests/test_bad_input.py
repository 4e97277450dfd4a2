"""Malformed input, generated here from a real CT slice: every stored instance gets a status
with a clear reason, no PNG is written from pixels that could not be decoded, Orthanc stays up,
and minipacs's memory stays bounded."""

import io
import re

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from corpus import find
from orthanc_server import OrthancServer
from test_codestream import hostile


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
    return out


CASES = cases()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("bad")).start()
    try:
        server.answers = {name: server.upload(encode(ds)) for name, (ds, _, _) in CASES.items()}
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


def test_memory_stays_bounded(server):
    """A 60000² frame, and frames whose codestream claims 65535², are refused before anything
    is allocated: Orthanc's resident memory, which includes the plugin's, stays far below what
    such a frame would take (7 to 17 GB)."""
    rss_kb = int(open(f"/proc/{server.process.pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss_kb < 1_000_000, f"Orthanc uses {rss_kb} kB"


def test_files_orthanc_refuses_leave_no_trace_and_orthanc_stays_up(server):
    assert server.answers["garbage_bytes"].status_code == 400
    # A file cut in its pixel data: DCMTK refuses it.
    assert server.answers["truncated_file"].status_code == 400
    assert server.alive()
    stats = server.json("/statistics")
    assert server.json("/minipacs/counts")["images"] == stats["CountInstances"] == len(CASES)


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
