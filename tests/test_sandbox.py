"""The sandboxed renderers: same outcomes as rendering in process, and a file that exhausts a
limit, or a renderer that dies, costs that one instance and nothing else."""

import io
import os
import signal
import sqlite3
import threading
import time

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from corpus import find
from minipacs import index as idx
from minipacs.config import DEFAULT_MODEL
from minipacs.ingest import Settings, render_and_score
from minipacs.sandbox import Sandbox
from minipacs.scoring import Scorer
from minipacs.worker import Pipeline

FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "SC_rgb_rle.dcm",
         "MR_small_jpeg_ls_lossless.dcm"]


def noise_image(n: int) -> bytes:
    """An uncompressed n × n 16-bit image of noise: decoding and rendering cost grow with n²."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.Modality = "HOSTILE", "OT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(n).integers(0, 65535, (n, n), dtype=np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "png").mkdir()
    return Settings(tmp_path / "png", 1)


def model_spec(scorer):
    return lambda: {"path": scorer.info.path, "sha256": scorer.info.sha256,
                    "threshold": scorer.info.threshold}


def without_time(image):
    return {k: v for k, v in image.items() if k != "scored_at"}


def test_sandboxed_outcomes_equal_in_process_ones(settings):
    scorer = Scorer(DEFAULT_MODEL)
    items = [(f"id-{name}", find(name).read_bytes(), None) for name in FILES]
    expected = render_and_score(settings, items, scorer)
    pngs = {p.name: p.read_bytes() for p in settings.png_directory.iterdir()}
    for p in settings.png_directory.iterdir():
        p.unlink()
    sandbox = Sandbox(settings, model_spec(scorer), 1024, 60)
    try:
        got = sandbox.render(items)
    finally:
        sandbox.close()
    assert [without_time(o.image) for o in got] == [without_time(o.image) for o in expected]
    assert [o.record for o in got] == [o.record for o in expected]
    assert {p.name: p.read_bytes() for p in settings.png_directory.iterdir()} == pngs
    assert sum(o.image["anomaly_score"] is not None for o in got) == 5  # rtplan has no pixels


def test_memory_limit_costs_one_instance(settings):
    """6000² float temporaries do not fit 150 MB: a MemoryError inside the child, recorded."""
    items = [("a", find("CT_small.dcm").read_bytes(), None), ("big", noise_image(6000), None),
             ("b", find("MR_small.dcm").read_bytes(), None)]
    sandbox = Sandbox(settings, lambda: None, 150, 60)
    try:
        got = sandbox.render(items)
    finally:
        sandbox.close()
    assert [o.image["status"] for o in got] == ["rendered", "render_failed", "rendered"]
    assert "MemoryError" in got[1].image["status_detail"] or "memory limit" in got[1].image["status_detail"]
    assert not (settings.png_directory / "big.png").exists()


def test_time_limit_kills_the_renderer_and_the_batch_goes_on(settings):
    items = [("a", find("CT_small.dcm").read_bytes(), None), ("slow", noise_image(8000), None),
             ("b", find("MR_small.dcm").read_bytes(), None)]
    sandbox = Sandbox(settings, lambda: None, 4096, 0.25)  # 8000² takes about 0.9 s
    try:
        started = time.monotonic()
        got = sandbox.render(items)
        assert time.monotonic() - started < 30
    finally:
        sandbox.close()
    assert [o.image["status"] for o in got] == ["rendered", "render_failed", "rendered"]
    assert "time limit (0.25 s)" in got[1].image["status_detail"]
    assert got[1].record is None  # placed by Orthanc's tags, the child having died
    assert sandbox.deaths == 1


def test_a_renderer_killed_mid_batch_costs_only_its_instance(settings):
    items = [("victim", noise_image(6000), None), ("a", find("CT_small.dcm").read_bytes(), None),
             ("b", find("MR_small.dcm").read_bytes(), None)]
    sandbox = Sandbox(settings, lambda: None, 4096, 60)
    child = sandbox._child()
    sandbox._idle.put(child)
    killer = threading.Timer(0.3, os.kill, (child.process.pid, signal.SIGKILL))  # 'victim' takes seconds
    killer.start()
    try:
        got = sandbox.render(items)
    finally:
        killer.join()
        sandbox.close()
    assert [o.image["status"] for o in got] == ["render_failed", "rendered", "rendered"]
    assert "SIGKILL" in got[0].image["status_detail"]


class Tags:
    """Orthanc's answers for the pipeline, from the files themselves (unit test)."""

    def __init__(self, files):
        self.files = files

    def tags(self, instance_id):
        raise AssertionError("every file here is readable")

    def ids(self, instance_id):
        raise AssertionError("computed IDs match")

    def decode(self, data, frame):
        raise AssertionError("pydicom decodes these")

    def publish(self, instance_id, study_id, score):
        pass


def test_pipeline_retries_what_a_failing_index_refused(tmp_path, settings, monkeypatch):
    """A full disk under the index: no row, no PNG left behind, the instance queued again
    with a delay, and written once the index works again."""
    from test_ingest_and_index import instance_id_of
    index = idx.Index(tmp_path / "index.sqlite")
    path = find("CT_small.dcm")
    instance = instance_id_of(path)
    submitted = []
    pipeline = Pipeline(index, settings, Tags({}), None, lambda i: path.read_bytes(), submitted.append)
    pipeline.retries._first = 0.05
    real_put = index.put_many

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index, "put_many", full)
    pipeline([instance])
    assert list(settings.png_directory.iterdir()) == []
    deadline = time.monotonic() + 5
    while not submitted:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert submitted == [instance]
    monkeypatch.setattr(index, "put_many", real_put)
    pipeline([instance])
    assert index.image_by_orthanc_id(instance)["Status"] == "rendered"
    assert index.claims() == {}
    assert [p.name for p in settings.png_directory.iterdir()] == [f"{instance}.png"]


def test_decoder_notes_stay_with_their_image_with_two_workers(settings):
    """pydicom's warnings are caught per process (warnings.catch_warnings is not thread-safe):
    each worker's child renders alone, so a note never lands on another worker's image."""
    sandbox = Sandbox(settings, lambda: None, 1024, 60)
    padded, plain = find("MR_small_padded.dcm").read_bytes(), find("MR_small.dcm").read_bytes()
    details: dict[str, list] = {"padded": [], "plain": []}

    def work(name, data):
        for n in range(15):
            details[name].append(sandbox.render([(f"{name}{n}", data, None)])[0].image["status_detail"])

    threads = [threading.Thread(target=work, args=args) for args in (("padded", padded), ("plain", plain))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sandbox.close()
    assert all(detail and "excess padding" in detail for detail in details["padded"])
    assert details["plain"] == [None] * 15


def test_a_child_left_holding_much_memory_is_replaced(settings):
    """Memory a large image left a child holding is not kept: the child is replaced (here past
    150 MB; a child without a model holds about 100 MB, 200 MB after a 7000² image)."""
    sandbox = Sandbox(settings, lambda: None, 4096, 60, recycle_mb=150)
    try:
        sandbox.render([("small", find("CT_small.dcm").read_bytes(), None)])
        small = sandbox._idle.get_nowait()
        sandbox._idle.put(small)
        sandbox.render([("big", noise_image(7000), None)])
        assert not small.alive(), "the child that rendered 7000² was kept"
        assert sandbox.deaths == 0
    finally:
        sandbox.close()
