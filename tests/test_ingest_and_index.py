"""The pipeline and the index, without Orthanc: real files in, rows and PNGs out."""

import io
import os
import re
import sqlite3
import threading
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from corpus import find
from minipacs import index as idx
from minipacs.ingest import Settings, describe, ingest
from minipacs.worker import Worker
from minipacs.orthanc_ids import orthanc_ids


class OfflineLookup:
    """Stands in for Orthanc's REST API: answers from the files themselves."""

    def __init__(self, tags=None):
        self._tags = tags or {}
        self.asked = []

    def tags(self, instance_id):
        self.asked.append(("tags", instance_id))
        return self._tags[instance_id]

    def ids(self, instance_id):
        self.asked.append(("ids", instance_id))
        raise AssertionError("computed IDs should have matched")


def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def index(tmp_path):
    return idx.Index(tmp_path / "index.sqlite")


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "png").mkdir()
    return Settings(tmp_path / "png", 1)


def instance_id_of(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                       ds.SOPInstanceUID).instance


def run(index, settings, name, lookup=None):
    path = find(name)
    return ingest(index, settings, instance_id_of(path), path.read_bytes(), lookup or OfflineLookup())


def test_orthanc_ids_match_what_orthanc_assigned_to_ct_small():
    # The ID Orthanc 1.10.1 answered when CT_small.dcm was uploaded to it.
    assert instance_id_of(find("CT_small.dcm")) == "f689ddd2-662f8fe1-8b18180d-ec2a2cee-937917af"


def test_rendered_image_gets_png_and_parameters(index, settings):
    image = run(index, settings, "CT_small.dcm")
    assert image["status"] == idx.RENDERED
    png = settings.png_directory / image["png"]
    assert png.name == f"{image['orthanc_id']}.png"
    assert np.asarray(Image.open(png)).shape == (128, 128)
    row = index.get(idx.IMAGES, image["sop_uid"])
    assert row["RescaleIntercept"] == -1024.0 and row["WindowSource"] == "minmax"
    assert row["PatientID"] == "1CT1" and row["NumberOfFrames"] == 1
    assert row["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"


def test_resending_replaces_rows_instead_of_duplicating(index, settings):
    first = run(index, settings, "CT_small.dcm")
    run(index, settings, "CT_small.dcm")
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "images": 1}
    assert index.get(idx.IMAGES, first["sop_uid"])["Status"] == idx.RENDERED


def test_object_without_pixels_is_indexed_without_png(index, settings):
    image = run(index, settings, "rtplan.dcm")
    assert image["status"] == idx.NO_PIXEL_DATA and image["png"] is None
    assert not list(settings.png_directory.iterdir())


def test_broken_pixel_data_records_the_reason_and_removes_an_old_png(index, settings, tmp_path):
    good = run(index, settings, "CT_small.dcm")
    assert (settings.png_directory / good["png"]).exists()
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:1000]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    image = ingest(index, settings, good["orthanc_id"], buffer.getvalue(), OfflineLookup())
    assert image["status"] == idx.RENDER_FAILED
    assert "cannot decode pixel data" in image["status_detail"]
    assert not (settings.png_directory / good["png"]).exists()
    assert index.counts()["images"] == 1


def test_unreadable_file_is_placed_with_orthancs_tags(index, settings):
    ds = pydicom.dcmread(find("CT_small.dcm"), stop_before_pixels=True)
    tags = {k: str(ds.get(k)) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                        "SOPInstanceUID", "Modality")}
    instance = instance_id_of(find("CT_small.dcm"))
    lookup = OfflineLookup({instance: tags})
    image = ingest(index, settings, instance, b"DICM but not really", lookup)
    assert image["status"] == idx.UNREADABLE and "pydicom cannot read" in image["status_detail"]
    assert lookup.asked == [("tags", instance)]
    assert index.get(idx.SERIES, ds.SeriesInstanceUID)["Modality"] == "CT"


def test_orthanc_is_asked_for_ids_when_its_reading_differs(index, settings):
    path = find("CT_small.dcm")

    class Lookup(OfflineLookup):
        def ids(self, instance_id):
            self.asked.append(("ids", instance_id))
            return orthanc_ids("other", "s", "se", "x")._replace(instance=instance_id)

    lookup = Lookup()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    record = describe(ds, "not-the-computed-id", lookup)
    assert lookup.asked == [("ids", "not-the-computed-id")]
    assert record.patient["orthanc_id"] == orthanc_ids("other", "s", "se", "x").patient
    assert record.patient["patient_id"] == "1CT1"


def test_multi_valued_identifiers_are_joined_as_dicom_encodes_them():
    """PatientID a\\b was indexed as "['a', 'b']", whose Orthanc IDs Orthanc then had to be
    asked for; joined by a backslash, as in the file and in Orthanc's tags, they are computed."""
    ds = pydicom.dcmread(find("CT_small.dcm"), stop_before_pixels=True)
    ds.PatientID, ds.PatientName = ["a", "b"], ["Doe^J", "Roe^R"]
    ids = orthanc_ids("a\\b", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    for source in (ds, {"PatientID": "a\\b", "PatientName": "Doe^J\\Roe^R",
                        **{k: str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                         "SOPInstanceUID")}}):
        record = describe(source, ids.instance, OfflineLookup())  # ids() would fail the test
        assert record.patient["patient_id"] == "a\\b" and record.patient["orthanc_id"] == ids.patient
        assert record.patient["patient_name"] == "Doe^J\\Roe^R"


def test_counts_and_pages_follow_the_hierarchy(index, settings):
    for name in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "rtplan.dcm"):
        run(index, settings, name)
    counts = index.counts()
    assert counts["images"] == 4 and counts["patients"] == len(
        {pydicom.dcmread(find(n), stop_before_pixels=True).PatientID
         for n in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "rtplan.dcm")})
    items, total = index.page(idx.IMAGES, 2, 0)
    rest, _ = index.page(idx.IMAGES, 2, 2)
    assert total == 4 and len(items) == 2 and len(rest) == 2
    assert {i["OrthancID"] for i in items}.isdisjoint(i["OrthancID"] for i in rest)
    ct = index.get(idx.PATIENTS, "1CT1")
    assert index.patient_counts(ct["OrthancID"]) == {"studies": 1, "series": 1, "images": 1}
    assert index.status_counts() == {idx.RENDERED: 3, idx.NO_PIXEL_DATA: 1}


def test_index_uses_wal_and_indexes_every_foreign_key(index):
    db = index._connection()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for table, column in (("studies", "patient"), ("series", "study"), ("images", "series")):
        indexed = {row[2] for name, in db.execute(f"SELECT name FROM pragma_index_list('{table}')")
                   for row in db.execute(f"PRAGMA index_info('{name}')")}
        assert column in indexed, (table, column)


def test_readers_in_other_threads_see_the_writes(index, settings):
    run(index, settings, "CT_small.dcm")
    seen = []
    reader = threading.Thread(target=lambda: seen.append(index.counts()["images"]))
    reader.start()
    reader.join()
    assert seen == [1]


def test_worker_counts_outcomes_and_reports_idle():
    done, release = [], threading.Event()

    def handle(instance_ids):
        release.wait(5)
        if "bad" in instance_ids:
            raise ValueError("boom")
        done.extend(instance_ids)

    worker = Worker(handle, queue_size=2)
    worker.start()
    assert worker.submit("a") and worker.submit("bad")
    assert worker.stats()["idle"] is False
    release.set()
    wait_until(lambda: worker.stats()["idle"])
    worker.stop()
    stats = worker.stats()
    assert done == ["a"] and stats["processed"] == 1 and stats["failed"] == 1


def test_stop_finishes_the_instance_in_hand_and_leaves_the_rest():
    started, release, done = threading.Event(), threading.Event(), []

    def handle(instance_ids):
        started.set()
        release.wait(5)
        done.extend(instance_ids)

    worker = Worker(handle, queue_size=10, batch=1)
    worker.start()
    worker.submit("first")
    worker.submit("second")
    started.wait(5)
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    release.set()
    stopper.join(5)
    assert done == ["first"]


def test_full_queue_drops_without_blocking_the_caller():
    block = threading.Event()
    worker = Worker(lambda i: block.wait(5), queue_size=1)
    worker.start()
    worker.submit("in-hand")
    wait_until(lambda: worker._queue.empty())  # the worker holds "in-hand"
    assert worker.submit("queued") is True
    assert worker.submit("overflow") is False
    assert worker.stats()["dropped"] == 1
    block.set()
    worker.stop()


def test_deleting_a_resource_removes_what_is_under_it_and_empty_parents(index, settings):
    from minipacs.reconcile import remove

    images = [run(index, settings, name) for name in ("emri_small.dcm", "CT_small.dcm")]
    ct = index.get(idx.PATIENTS, "1CT1")
    assert remove(index, settings.png_directory, "patients", ct["OrthancID"]) == 1
    assert not (settings.png_directory / images[1]["png"]).exists()
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "images": 1}
    assert remove(index, settings.png_directory, "images", images[0]["orthanc_id"]) == 1
    assert index.counts() == {"patients": 0, "studies": 0, "series": 0, "images": 0}
    assert not list(settings.png_directory.iterdir())
    with pytest.raises(ValueError):
        index.delete("sqlite_master", "x")


def test_reconcile_queues_the_missing_and_forgets_the_deleted(index, settings):
    from minipacs.reconcile import reconcile

    kept = run(index, settings, "CT_small.dcm")["orthanc_id"]
    gone = run(index, settings, "MR_small.dcm")["orthanc_id"]
    queued = []
    assert reconcile(index, settings.png_directory, lambda: {kept, "new-1", "new-2"}, queued.append) == (2, 1)
    assert queued == ["new-1", "new-2"]
    assert index.orthanc_instance_ids() == {kept} and gone not in index.orthanc_instance_ids()
    assert reconcile(index, settings.png_directory, lambda: {kept}, queued.append) == (0, 0)


def test_an_index_made_by_an_older_version_gains_the_new_columns(tmp_path, settings):
    import sqlite3

    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.executescript("""
        CREATE TABLE patients (orthanc_id TEXT PRIMARY KEY, patient_id TEXT NOT NULL);
        CREATE TABLE images (orthanc_id TEXT PRIMARY KEY, series TEXT NOT NULL, sop_uid TEXT NOT NULL,
                             status TEXT NOT NULL, indexed_at TEXT NOT NULL DEFAULT 'x');
        INSERT INTO patients VALUES ('p', 'kept');""")
    old.commit()
    old.close()
    index = idx.Index(tmp_path / "old.sqlite")
    assert index.get(idx.PATIENTS, "kept")["PatientName"] is None
    run(index, settings, "CT_small.dcm")
    assert index.counts()["images"] == 1 and index.get(idx.PATIENTS, "1CT1")


def test_a_backlog_is_handled_in_batches_and_a_bad_instance_costs_only_itself():
    started, release, batches = threading.Event(), threading.Event(), []

    def handle(instance_ids):
        started.set()
        release.wait(5)
        if "bad" in instance_ids:
            raise ValueError("boom")
        batches.append(instance_ids)

    worker = Worker(handle, queue_size=100, batch=4)
    worker.start()
    worker.submit("first")
    started.wait(5)
    for name in ("a", "b", "bad", "c", "d", "e"):
        worker.submit(name)
    release.set()
    wait_until(lambda: worker.stats()["idle"])
    worker.stop()
    assert batches[0] == ["first"]
    assert [len(b) for b in batches[1:]] == [1, 1, 1, 2]  # [a, b, bad, c] failed, then one by one
    assert sorted(sum(batches, [])) == ["a", "b", "c", "d", "e", "first"]
    assert worker.stats()["processed"] == 6 and worker.stats()["failed"] == 1


def test_several_worker_threads_share_the_queue():
    seen, lock = [], threading.Lock()

    def handle(instance_ids):
        time.sleep(0.01)
        with lock:
            seen.extend((i, threading.current_thread().name) for i in instance_ids)

    worker = Worker(handle, queue_size=100, threads=3)
    worker.start()
    for n in range(30):
        worker.submit(str(n))
    wait_until(lambda: worker.stats()["idle"])
    worker.stop()
    assert sorted(int(i) for i, _ in seen) == list(range(30))
    assert len({name for _, name in seen}) > 1 and worker.stats()["processed"] == 30


def _store_burst(worker, names, every: float) -> tuple[float, float]:
    """Tell the worker that Orthanc stored ``names``, one every ``every`` seconds; the burst's
    start and end (monotonic)."""
    start = time.monotonic()
    for name in names:
        worker.stored(name)
        time.sleep(every)
    return start, time.monotonic()


def test_the_worker_waits_while_orthanc_stores_a_burst_then_catches_up():
    handled = []
    worker = Worker(lambda ids: handled.append((time.monotonic(), list(ids))), queue_size=100,
                    batch=50, defer=30, burst=3, burst_window=0.3)
    worker.start()
    _, end = _store_burst(worker, [str(n) for n in range(20)], every=0.02)
    assert worker.stats()["deferring"] is True
    wait_until(lambda: worker.stats()["idle"])
    worker.stop()
    # Nothing once the burst is seen (its first two instances may go before), then one batch.
    early = sum((ids for at, ids in handled if at < end), [])
    assert set(early) <= {"0", "1"} and len(handled) - len(early) == 1
    assert sorted(sum((ids for _, ids in handled), []), key=int) == [str(n) for n in range(20)]
    assert worker.stats()["deferred_s"] > 0.3
    assert worker.stats()["deferring"] is False


def test_a_trickle_of_instances_is_not_deferred():
    handled = []
    worker = Worker(lambda ids: handled.append((time.monotonic(), ids)), queue_size=100,
                    defer=30, burst=3, burst_window=0.3)
    worker.start()
    for name in ("a", "b", "c"):
        sent = time.monotonic()
        worker.stored(name)
        wait_until(lambda: len(handled) == "abc".index(name) + 1)
        assert handled[-1][0] - sent < 0.3
        time.sleep(0.35)  # slower than 3 per burst window
    worker.stop()


def test_a_long_burst_is_deferred_only_for_so_long_then_the_worker_catches_up():
    handled = []
    worker = Worker(lambda ids: handled.extend(ids), queue_size=1000, batch=4,
                    defer=1, burst=3, burst_window=0.5)
    worker.start()
    start, end = _store_burst(worker, [str(n) for n in range(150)], every=0.02)
    caught_up_while_storing = len(handled)
    wait_until(lambda: worker.stats()["idle"])
    worker.stop()
    assert end - start > 2.5 and caught_up_while_storing > 50
    assert sorted(handled, key=int) == [str(n) for n in range(150)]


def test_without_defer_the_worker_starts_at_once():
    handled = []
    worker = Worker(lambda ids: handled.extend(ids), queue_size=100, defer=0, burst=3,
                    burst_window=10)
    worker.start()
    _store_burst(worker, [str(n) for n in range(10)], every=0.0)
    wait_until(lambda: len(handled) == 10, seconds=2)
    assert worker.stats()["deferring"] is False and worker.stats()["deferred_s"] == 0
    worker.stop()


def record(patient="P", study="1.2", series="1.2.3", sop="1.2.3.4", modality="CT",
           status=idx.RENDERED):
    """A minimal instance, placed where Orthanc would put it."""
    ids = orthanc_ids(patient, study, series, sop)
    return idx.InstanceRecord({"orthanc_id": ids.patient, "patient_id": patient},
                              {"orthanc_id": ids.study, "study_uid": study},
                              {"orthanc_id": ids.series, "series_uid": series, "modality": modality},
                              {"orthanc_id": ids.instance, "sop_uid": sop, "status": status})


def counted(index):
    """The counts and status counts as the rows say, to check the counters against."""
    db = index._connection()
    levels = {level: db.execute(f"SELECT count(*) FROM {level}").fetchone()[0] for level in idx.LEVELS}
    return levels, dict(db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())


def test_counters_follow_inserts_replacements_status_changes_and_cascades(index):
    for n in range(3):
        index.put(record(sop=f"1.2.3.{n}"))
    index.put(record(patient="Q", study="9", series="9.1", sop="9.1.1", status=idx.RENDER_FAILED))
    index.put(record(sop="1.2.3.0", status=idx.UNREADABLE))  # re-sent: replaced, not added
    assert index.counts() == {"patients": 2, "studies": 2, "series": 2, "images": 4}
    assert index.status_counts() == {idx.RENDERED: 2, idx.RENDER_FAILED: 1, idx.UNREADABLE: 1}
    assert (index.counts(), index.status_counts()) == counted(index)
    index.delete("patients", orthanc_ids("Q", "", "", "").patient)  # rows under it cascade
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "images": 3}
    assert index.status_counts() == {idx.RENDERED: 2, idx.UNREADABLE: 1}
    assert (index.counts(), index.status_counts()) == counted(index)


def test_the_flagged_counter_follows_scores_replacements_and_deletions(index):
    def flagged():
        return index._scalar("SELECT count(*) FROM images WHERE flagged = 1")

    for n in range(4):
        index.put(record(sop=f"1.2.3.{n}"))
    ids = [index.get(idx.IMAGES, f"1.2.3.{n}")["OrthancID"] for n in range(4)]
    score = {"anomaly_score": 0.9, "model_version": "m", "threshold": 0.5, "anomaly_reason": "picture"}
    index.set_scores([{"orthanc_id": i, **score, "flagged": 1} for i in ids[:3]])
    index.set_scores([{"orthanc_id": ids[0], **score, "flagged": 0, "anomaly_reason": None}])  # rescored: not any more
    resent = record(sop="1.2.3.1")
    resent.image["flagged"] = 0  # re-sent, and scored valid this time
    index.put(resent)
    index.delete("images", ids[2])
    index.set_scores([{"orthanc_id": ids[3], **score, "flagged": None, "anomaly_reason": None}])
    assert index.flagged_count() == flagged() == 0
    index.set_scores([{"orthanc_id": i, **score, "flagged": 1} for i in (ids[0], ids[3])])
    assert index.flagged_count() == flagged() == 2
    # An index made before the counter gains it, counted, on opening.
    index._connection().executescript(
        "DELETE FROM counters WHERE name = 'flagged'; DROP TRIGGER images_flagged_added; "
        "DROP TRIGGER images_flagged_removed; DROP TRIGGER images_flagged_changed;")
    index.close()
    assert idx.Index(index.path).flagged_count() == 2


def test_a_batch_is_written_whole_or_not_at_all(index):
    index.put(record(sop="1.2.3.0"))
    with pytest.raises(sqlite3.IntegrityError):
        index.put_many([record(sop="1.2.3.1"), record(sop="1.2.3.2", status=None)])
    assert index.counts()["images"] == 1 and index.get(idx.IMAGES, "1.2.3.1") is None
    index.put_many([record(sop="1.2.3.1"), record(patient="Q", study="9", series="9.1", sop="9.1.1")])
    assert index.counts() == {"patients": 2, "studies": 2, "series": 2, "images": 3}
    assert counted(index)[0] == index.counts()


def test_writers_in_several_threads_never_wait_in_sqlites_busy_handler(index):
    """SQLite makes a second writer sleep 1-100 ms between tries; the index lets its own
    threads write one at a time instead. Without that, a busy timeout of 0 makes the second
    writer fail at once."""
    errors = []

    def write(thread: int) -> None:
        index._connection().execute("PRAGMA busy_timeout = 0")
        try:
            for n in range(40):
                index.put_many([record(patient=f"P{thread}", sop=f"1.2.3.{thread}.{n}.{k}") for k in range(20)])
                index.set_scores([{"orthanc_id": orthanc_ids(f"P{thread}", "1.2", "1.2.3", f"1.2.3.{thread}.{n}.0").instance,
                                   "anomaly_score": 0.5, "flagged": 0, "anomaly_reason": None,
                                   "model_version": "m", "threshold": 0.5}])
        except sqlite3.OperationalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert index.counts()["images"] == 3 * 40 * 20 and counted(index)[0] == index.counts()


def test_deleting_an_image_keeps_the_parents_that_still_hold_others(index):
    for sop in ("1.2.3.1", "1.2.3.2"):
        index.put(record(sop=sop))
    index.put(record(series="1.2.4", sop="1.2.4.1"))
    index.delete("images", orthanc_ids("P", "1.2", "1.2.3", "1.2.3.1").instance)
    assert index.counts() == {"patients": 1, "studies": 1, "series": 2, "images": 2}
    index.delete("images", orthanc_ids("P", "1.2", "1.2.3", "1.2.3.2").instance)
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "images": 1}


def test_images_follow_their_series_modality(index):
    index.put(record(sop="1.2.3.1", modality="OT"))
    index.put(record(sop="1.2.3.2", modality="CT"))  # the series re-sent with a corrected modality
    modalities = index._connection().execute("SELECT modality FROM images").fetchall()
    assert modalities == [("CT",), ("CT",)]


def test_images_follow_their_parents_identifiers(index):
    """Images copy their parents' identifiers (pages need no join); a re-sent instance that
    spells one otherwise under the same Orthanc IDs changes it in every image under it."""
    index.put(record(sop="1.2.3.1"))
    kept = record(sop="1.2.3.2")
    index.put(kept)
    respelled = record(sop="1.2.3.1")
    respelled.patient["patient_id"], respelled.study["study_uid"] = "P ", "1.2 "
    respelled.series["series_uid"] = "1.2.3 "
    index.put(respelled)
    items, _ = index.page(idx.IMAGES, 10, 0)
    assert [(i["PatientID"], i["StudyInstanceUID"], i["SeriesInstanceUID"]) for i in items] == [
        ("P ", "1.2 ", "1.2.3 ")] * 2
    assert index.get(idx.IMAGES, "1.2.3.2") == items[1]


def stale_items(index) -> list:
    """Images whose stored JSON answer differs from their columns' as written now."""
    return index._connection().execute(
        f"SELECT orthanc_id FROM images WHERE item IS NOT {idx._image_json('images')}").fetchall()


def test_each_image_keeps_its_json_answer_through_every_write(tmp_path, index):
    for n in range(3):
        index.put(record(sop=f"1.2.3.{n}"))
    index.put(record(sop="1.2.3.0", status=idx.RENDER_FAILED, modality="MR"))  # re-sent
    image = index.get(idx.IMAGES, "1.2.3.1")
    index.set_scores([{"orthanc_id": image["OrthancID"], "anomaly_score": 0.1 + 0.2,
                       "flagged": 1, "anomaly_reason": "broken_render:noise", "model_version": "m",
                       "threshold": 0.5}])
    respelled = record(sop="1.2.3.2")
    respelled.patient["patient_id"] = "P "
    index.put(respelled)
    assert stale_items(index) == []
    rescored = index.get(idx.IMAGES, "1.2.3.1")
    assert (rescored["AnomalyScore"], rescored["Flagged"]) == (0.1 + 0.2, True)
    assert rescored["AnomalyReason"] == "broken_render:noise"
    assert {i["PatientID"] for i in index.page(idx.IMAGES, 10, 0)[0]} == {"P "}
    # An index made before images kept their answer gets it for every row on opening.
    index._connection().executescript(
        "DROP TRIGGER images_item_insert; DROP TRIGGER images_item_update; "
        "ALTER TABLE images DROP COLUMN item;")
    index.close()
    reopened = idx.Index(index.path)
    assert stale_items(reopened) == [] and reopened.get(idx.IMAGES, "1.2.3.1") == rescored


def test_an_older_index_gains_counters_new_indexes_and_image_modalities(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.executescript("""
        CREATE TABLE patients (orthanc_id TEXT PRIMARY KEY, patient_id TEXT NOT NULL);
        CREATE TABLE studies (orthanc_id TEXT PRIMARY KEY, patient TEXT NOT NULL, study_uid TEXT NOT NULL);
        CREATE TABLE series (orthanc_id TEXT PRIMARY KEY, study TEXT NOT NULL, series_uid TEXT NOT NULL,
                             modality TEXT);
        CREATE TABLE images (orthanc_id TEXT PRIMARY KEY, series TEXT NOT NULL, sop_uid TEXT NOT NULL,
                             status TEXT NOT NULL, anomaly_score REAL, flagged INTEGER,
                             indexed_at TEXT NOT NULL DEFAULT 'x');
        CREATE INDEX images_by_series ON images(series);
        CREATE INDEX images_flagged ON images(flagged, anomaly_score);
        INSERT INTO patients VALUES ('p', 'P');
        INSERT INTO studies VALUES ('s', 'p', '1.2');
        INSERT INTO series VALUES ('se', 's', '1.2.3', 'MR');
        INSERT INTO images VALUES ('i1', 'se', '1.2.3.1', 'rendered', 0.9, 1, 'x'),
                                  ('i2', 'se', '1.2.3.2', 'render_failed', NULL, NULL, 'x');""")
    old.commit()
    old.close()
    index = idx.Index(tmp_path / "old.sqlite")
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "images": 2}
    assert index.status_counts() == {idx.RENDERED: 1, idx.RENDER_FAILED: 1}
    names = {name for name, in index._connection().execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert not names & set(idx.OBSOLETE_INDEXES)
    assert {"images_of_series", "images_flagged_in_order", "images_flagged_by_modality",
            "images_summary"} <= names
    items, total = index.page(idx.FLAGGED, 10, 0, "i.flagged = 1 AND " + idx.ANOMALY_FILTERS["modality"],
                              ("MR",))
    assert total == 1 and items[0]["OrthancID"] == "i1"
    assert (items[0]["PatientID"], items[0]["StudyInstanceUID"], items[0]["SeriesInstanceUID"],
            items[0]["Modality"]) == ("P", "1.2", "1.2.3", "MR")
    idx.Index(tmp_path / "old.sqlite")  # opening it again changes nothing
    assert index.counts()["images"] == 2


def image_steps(index, call) -> list[str]:
    """The query plan steps on the images table of every query that ``call`` runs."""
    db, queries = index._connection(), []
    db.set_trace_callback(lambda sql: queries.append(sql) if sql.lstrip().startswith("SELECT") else None)
    try:
        call()
    finally:
        db.set_trace_callback(None)
    assert queries
    # The traced text has its parameters bound already: the plan needs none.
    return [step for sql in queries for *_, step in db.execute("EXPLAIN QUERY PLAN " + sql)
            if step.startswith(("SCAN i", "SEARCH i ", "SEARCH images "))]


def test_summaries_and_counts_read_an_index_never_the_image_rows(index):
    for n in range(30):
        index.put(record(series=f"1.2.{n % 3}", sop=f"1.2.{n % 3}.{n}"))
    study = index.get(idx.STUDIES, "1.2")["OrthancID"]
    series = index.get(idx.SERIES, "1.2.1")["OrthancID"]
    patient = index.get(idx.PATIENTS, "P")["OrthancID"]
    for call in (lambda: index.summary("se.study = ?", (study,)),
                 lambda: index.summary("i.series = ?", (series,)),
                 lambda: index.patient_counts(patient)):
        steps = image_steps(index, call)
        assert steps and all("USING COVERING INDEX" in step for step in steps), steps
    assert index.summary("se.study = ?", (study,))["images"] == 30
    assert index.patient_counts(patient) == {"studies": 1, "series": 3, "images": 30}
    # A series' flagged images are sought, not filtered out of all of its images.
    flagged = "i.flagged = 1 AND " + idx.ANOMALY_FILTERS["series"]
    steps = image_steps(index, lambda: index.page_json(idx.FLAGGED, 25, 0, flagged, ("1.2.1",)))
    assert any("(series=? AND flagged=?)" in step for step in steps), steps


def test_what_a_rescore_would_change_is_sought_not_scanned(index):
    """/minipacs/model (every UI page reads it) counts stale and unscored images: seeks on an
    index, so that it costs little at a million images when both counts are small."""
    for n in range(30):
        index.put(record(sop=f"1.2.3.{n}"))
    index.set_scores([{"orthanc_id": orthanc_id, "anomaly_score": 0.1, "flagged": 0, "anomaly_reason": None,
                       "model_version": "old", "threshold": 0.5}
                      for orthanc_id in sorted(index.orthanc_instance_ids())[:10]])
    assert index.unscored_by("new") == {"Stale": 10, "Unscored": 20}
    assert index.unscored_by("old") == {"Stale": 0, "Unscored": 20}
    steps = image_steps(index, lambda: index.unscored_by("new"))
    assert steps and all(step.startswith("SEARCH") and "COVERING INDEX images_by_model" in step
                         for step in steps), steps


def test_pngs_are_written_whole_new_or_replaced(tmp_path):
    from minipacs.ingest import write_png

    path = tmp_path / "x.png"
    write_png(path, b"first")
    write_png(path, b"second, longer")  # a re-sent instance: replaced through a rename
    assert path.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_an_index_made_before_reasons_gains_anomaly_reason_in_every_item(tmp_path, monkeypatch):
    """An index written by the version before reasons (6baddad: no anomaly_reason column, item
    triggers without the key) gets the column, the new triggers and every row's answer
    rewritten on opening, its scores kept."""
    with monkeypatch.context() as older:
        older.setattr(idx, "SCHEMA", re.sub(r"\n *anomaly_reason TEXT,[^\n]*", "", idx.SCHEMA))
        older.setattr(idx, "_IMAGE", tuple(c for c in idx._IMAGE if c[0] != "AnomalyReason"))
        before = idx.Index(tmp_path / "old.sqlite")
        for n in range(3):
            before.put(record(sop=f"1.2.3.{n}"))
        with before._connection() as db:  # as that version's set_scores wrote
            db.execute("UPDATE images SET anomaly_score = 0.9, flagged = 1, model_version = 'm', "
                       "threshold = 0.5 WHERE sop_uid = '1.2.3.1'")
        columns = {row[1] for row in before._connection().execute("PRAGMA table_info(images)")}
        assert "anomaly_reason" not in columns
        old_items = before.page(idx.IMAGES, 10, 0)[0]
        assert old_items[1]["AnomalyScore"] == 0.9
        assert not any("AnomalyReason" in item for item in old_items)
        before.close()
    index = idx.Index(tmp_path / "old.sqlite")
    items = index.page(idx.IMAGES, 10, 0)[0]
    assert [item["AnomalyReason"] for item in items] == [None] * 3 and stale_items(index) == []
    assert [{k: v for k, v in item.items() if k != "AnomalyReason"} for item in items] == old_items
    flagged = index.get(idx.IMAGES, "1.2.3.1")
    index.set_scores([{"orthanc_id": flagged["OrthancID"], "anomaly_score": 0.95, "flagged": 1,
                       "anomaly_reason": "picture", "model_version": "m2", "threshold": 0.5}])
    assert index.get(idx.IMAGES, "1.2.3.1")["AnomalyReason"] == "picture"
    index.close()
    # Opening it again finds the triggers current: the answers are not rewritten again.
    with sqlite3.connect(index.path) as db:
        db.execute("UPDATE images SET item = json_set(item, '$.Marker', 1)")
    assert "Marker" in idx.Index(index.path).get(idx.IMAGES, "1.2.3.0")


def test_sweep_removes_only_old_files_without_a_row(index, settings):
    from minipacs.reconcile import sweep
    image = run(index, settings, "CT_small.dcm")
    png = settings.png_directory
    old_orphan, old_part, new_orphan = png / "gone.png", png / "x.png.part", png / "coming.png"
    for path in (old_orphan, old_part, new_orphan):
        path.write_bytes(b"\x89PNG")
    an_hour_ago = time.time() - 3600
    for path in (old_orphan, old_part, png / image["png"]):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert sweep(index, png, time.time() - 60) == 2
    assert sorted(p.name for p in png.iterdir()) == sorted([image["png"], "coming.png"])


def test_a_deletion_after_the_fetch_keeps_the_row_out(index, settings):
    """The worker fetched the file, then Orthanc deleted its study: the late write is dropped,
    and its PNG with it; a re-sent instance (fetched after the deletion) is written again."""
    from minipacs.ingest import Deletions, ingest_many
    from minipacs.reconcile import remove
    path = find("CT_small.dcm")
    instance = instance_id_of(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    study = orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).study
    deletions = Deletions()
    fetched = deletions.fetching()
    remove(index, settings.png_directory, "studies", study, deletions)
    ingest_many(index, settings, [(instance, path.read_bytes())], OfflineLookup(),
                deletions=deletions, fetched=fetched)
    deletions.done(fetched)
    assert index.counts()["images"] == 0
    assert list(settings.png_directory.iterdir()) == []
    assert index.claims() == {}
    again = deletions.fetching()
    ingest_many(index, settings, [(instance, path.read_bytes())], OfflineLookup(),
                deletions=deletions, fetched=again)
    deletions.done(again)
    assert index.counts()["images"] == 1
