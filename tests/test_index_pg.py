"""The index on PostgreSQL (minipacs.index_pg) against the one on SQLite: the same files give the
same answers on every query the routes make, and the claims' leases hand work from node to node.

A real PostgreSQL from Debian's packages (tests/postgres_server.py), one database per test."""

import json
import time
import uuid

import pytest

import postgres_server
from corpus import pydicom_test_files
from minipacs import index as idx
from minipacs import reviews
from minipacs.cluster import ChangeFollower, GAP_WAIT
from minipacs.ingest import Settings, ingest
from test_ingest_and_index import OfflineLookup, instance_id_of, record

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.skipif(postgres_server.available() is not None,
                                reason=postgres_server.available() or "")
from minipacs.index_pg import PostgresIndex  # noqa: E402  (psycopg is there)


@pytest.fixture(scope="module")
def server():
    server = postgres_server.PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def dsn(server):
    return server.create_database("t" + uuid.uuid4().hex[:12])


TIMES = ("IndexedAt", "ScoredAt")  # when each index wrote the row


def ordered(text: str):
    """A JSON text with its objects as lists of pairs (the keys' order counts too), but the times."""
    return json.loads(text, object_pairs_hook=lambda pairs: [p for p in pairs if p[0] not in TIMES])


def answers(index: idx.Index, some_image: str, some_study: str, some_patient: str) -> dict:
    """What every route asks the index, as comparable values."""
    found = {"counts": index.counts(), "statuses": index.status_counts(),
             "flagged": index.flagged_count(), "unscored": index.unscored_by("m1"),
             "rendered": index.rendered_images(),
             "png_names": index.png_names(), "ids": index.orthanc_instance_ids()}
    for level in (idx.PATIENTS, idx.STUDIES, idx.SERIES, idx.IMAGES):
        for limit, offset in ((100, 0), (3, 2)):
            items, total = index.page_json(level, limit, offset)
            found[level.name, limit, offset] = (ordered(items), total)
    for key, clause in index.anomaly_filters.items():
        value = {"modality": "CT", "reason": "picture", "patient": some_patient,
                 "study": some_study}.get(key, "none")
        items, total = index.page_json(idx.FLAGGED, 50, 0, "i.flagged = 1 AND " + clause, (value,))
        found["anomalies", key] = (ordered(items), total)
    items, total = index.page_json(idx.IMAGES, 50, 0, "i.status = ?", (idx.RENDERED,))
    found["rendered_page"] = (ordered(items), total)
    image = index.image_by_orthanc_id(some_image)
    found["image"] = image
    found["by_uid"] = index.get(idx.IMAGES, image["SOPInstanceUID"]) if image else None
    found["image_info"] = index.image_info(some_image)
    study = index.get(idx.STUDIES, some_study)
    found["study"] = study
    if study:
        found["summary"] = index.summary("se.study = ?", (study["OrthancID"],))
        found["study_flagged"] = index.study_flagged(study["OrthancID"])
    patient = index.get(idx.PATIENTS, some_patient)
    found["patient_counts"] = index.patient_counts(patient["OrthancID"]) if patient else None
    return found


def test_the_same_files_give_the_same_answers_on_sqlite_and_postgresql(tmp_path, dsn):
    (tmp_path / "png").mkdir()
    settings = Settings(tmp_path / "png", 1)
    lite, pg = idx.Index(tmp_path / "index.sqlite"), PostgresIndex(dsn, "node-a")
    ids = []
    for path in pydicom_test_files()[:25]:
        try:
            instance_id = instance_id_of(path)
        except Exception:  # no identifiers to place it by without Orthanc
            continue
        pg.claim([instance_id])  # on PostgreSQL a row is written by the node holding its claim
        for index in (lite, pg):
            ingest(index, settings, instance_id, path.read_bytes(), OfflineLookup())
        ids.append(instance_id)
    assert len(ids) > 10 and lite.counts() == pg.counts()
    scores = [{"orthanc_id": i, "anomaly_score": [0.1 + 0.2, 0.97, 1e-300, 0.5][n % 4],
               "flagged": n % 2, "anomaly_reason": "picture" if n % 2 else None,
               "model_version": ["m1", "m2"][n % 2], "threshold": 0.5} for n, i in enumerate(ids)]
    for index in (lite, pg):
        index.set_scores(scores)
    image = ids[3]
    study = lite.image_by_orthanc_id(image)["StudyInstanceUID"]
    patient = lite.image_by_orthanc_id(image)["PatientID"]

    def same():
        expected, got = answers(lite, image, study, patient), answers(pg, image, study, patient)
        for key in expected:
            if key in ("image", "by_uid"):
                for one in (expected[key], got[key]):
                    for time_key in TIMES if one else ():
                        one.pop(time_key)
            assert got[key] == expected[key], key
        return expected

    assert same()["flagged"] > 0
    # Deleting at every level, and replacing a row, keep them the same.
    series = lite.image_by_orthanc_id(ids[5])["SeriesInstanceUID"]
    for index in (lite, pg):
        index.delete("images", ids[0])
        index.delete("series", index.get(idx.SERIES, series)["OrthancID"])
        index.put(record(patient=patient, sop="9.9.9", status=idx.RENDER_FAILED))
        index.put(record(patient=patient, sop="9.9.9", status=idx.UNREADABLE))
    same()
    for index in (lite, pg):
        index.delete("patients", index.get(idx.PATIENTS, patient)["OrthancID"])
    same()
    assert pg.counts() == {level: pg._scalar(f"SELECT count(*) FROM {level}") for level in idx.LEVELS}


def test_claims_hand_a_dead_nodes_work_to_another_node_and_rows_are_written_once(dsn):
    a, b = PostgresIndex(dsn, "node-a", lease=3), PostgresIndex(dsn, "node-b", lease=3)
    records = [record(sop=f"1.2.3.{n}") for n in range(4)]
    ids = [r.image["orthanc_id"] for r in records]
    a.enqueue(ids)
    a.enqueue(ids)  # queued once, however often it is heard of
    assert len(a.queued()) == 4
    assert sorted(i for i, _ in a.take(3)) == sorted(ids[:3])
    assert [i for i, _ in b.take(10)] == [ids[3]]  # the held ones are skipped
    a.claim(ids[:3])
    b.claim(ids[:3])  # a's leases run: b gets none of them
    assert b.put_many(records[:3], done=ids[:3]) == []
    time.sleep(3.2)  # a died: nothing renewed its leases
    taken = dict(b.take(10))  # b's own lease on ids[3] ran out too
    assert taken == {**{i: 1 for i in ids[:3]}, ids[3]: 0}  # one attempt each by a, none at ids[3]
    assert b.claims(ids) == {i: 1 for i in ids[:3]}
    b.claim(ids)
    assert a.put_many(records, done=ids) == []  # a's late results are dropped
    assert b.put_many(records, done=ids) == records
    assert b.queued() == set() and b.counts()["images"] == 4
    assert {w for w, in b._connection().execute("SELECT writes FROM images").fetchall()} == {1}
    b.enqueue(ids)  # already indexed: not queued again
    assert b.queued() == set()
    # A live node keeps what it holds; a stopping one hands it back at once.
    a.enqueue(["x1", "x2"])
    assert len(a.take(10)) == 2
    time.sleep(2)
    a.renew()
    time.sleep(1.5)
    assert b.take(10) == []
    a.let_go()
    assert sorted(i for i, _ in b.take(10)) == ["x1", "x2"]


class ChangeLog:
    """Orthanc's ``/changes`` answers, from a list (what tests/test_cluster.py gets from Orthanc)."""

    def __init__(self, changes):
        self.changes = changes

    def __call__(self, since):
        if since is None:
            return {"Changes": self.changes[-1:], "Last": self.changes[-1]["Seq"] if self.changes else 0}
        after = [c for c in self.changes if c["Seq"] > since]
        return {"Changes": after, "Done": True, "Last": after[-1]["Seq"] if after else since}


def change(seq, kind, level, orthanc_id):
    return {"Seq": seq, "ChangeType": kind, "ResourceType": level, "ID": orthanc_id}


def test_the_change_log_queues_each_new_instance_once_and_waits_a_moment_at_a_gap(dsn):
    index = PostgresIndex(dsn, "node-a")
    kept = record(sop="1.1")
    index.claim([kept.image["orthanc_id"]])
    index.put_many([kept], done=[kept.image["orthanc_id"]])
    log = ChangeLog([change(1, "NewInstance", "Instance", "old")])
    woken = []
    follower = ChangeFollower(index, log, lambda: woken.append(1))
    assert follower.step() is False and index.queued() == set()  # starts at the log's end
    log.changes += [change(2, "NewInstance", "Instance", "new-1"),
                    change(3, "NewInstance", "Instance", kept.image["orthanc_id"]),  # indexed
                    change(5, "NewSeries", "Series", "s"),
                    change(6, "NewInstance", "Instance", "new-2")]
    follower.step()
    # Seq 4 is not there (a transaction still open, or rolled back, or its resource deleted):
    # the position waits for it, the new instances past it are queued at once.
    assert index.queued() == {"new-1", "new-2"} and woken and follower.followed == 2
    follower.step()
    assert follower.followed == 2
    time.sleep(GAP_WAIT + 0.1)
    follower.step()  # seq 4 never came: moved past it
    assert index.queued() == {"new-1", "new-2"} and follower.followed == 5
    assert follower.step() is False
    # Another node resumes from the position kept in the index.
    other = ChangeFollower(PostgresIndex(dsn, "node-b"), log, lambda: None)
    log.changes.append(change(7, "NewInstance", "Instance", "new-3"))
    other.step()
    assert other.followed == 1 and index.queued() == {"new-1", "new-2", "new-3"}


def test_reviews_read_the_same_on_both_dialects(tmp_path, dsn):
    """minipacs.reviews writes and reads its table through the index's connection: its SQL is
    the same for both."""
    lite, pg = idx.Index(tmp_path / "index.sqlite"), PostgresIndex(dsn, "node-a")
    records = [record(sop=f"1.2.3.{n}") for n in range(4)]
    for r in records:
        r.image.update(flagged=1, anomaly_score=0.9, anomaly_reason="picture", model_version="m1")
    pg.claim([r.image["orthanc_id"] for r in records])
    found = []
    for index in (lite, pg):
        index.put_many(records, done=[r.image["orthanc_id"] for r in records])
        reviews.add(index, records[0].image["orthanc_id"], "invalid", "picture", "seen", "ann")
        reviews.add(index, records[1].image["orthanc_id"], "valid", None, None, None)
        reviews.add(index, records[1].image["orthanc_id"], "invalid", "overlay", None, None)
        items, total = reviews.page(index, {"reason": "overlay"}, 10, 0)
        unreviewed, left = reviews.page(index, {}, 10, 0, reviewed=False)
        found.append((total, [i["OrthancID"] for i in items], left, reviews.by_model(index),
                       [len(reviews.history(index, r.image["orthanc_id"])) for r in records],
                       reviews.rejected(index, records[0].study["orthanc_id"])))
    assert found[0] == found[1] and found[0][0] == 1 and found[0][2] == 2


def test_two_nodes_writing_one_studys_kos_leave_one_document(dsn):
    """Each node has its own lock: when two nodes write a study's KOS at once, the one writing
    last deletes the document the other wrote (the one in the shared row), not the one it read
    before: Orthanc keeps one KOS per study."""
    from minipacs.kos import KeyObjects

    a, b = PostgresIndex(dsn, "node-a"), PostgresIndex(dsn, "node-b")
    r = record(sop="1.2.3.1")
    r.image.update(flagged=1, anomaly_score=0.9, anomaly_reason="picture", model_version="m1",
                   sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    a.claim([r.image["orthanc_id"]])
    a.put_many([r], done=[r.image["orthanc_id"]])
    study = r.study["orthanc_id"]
    stored, deleted = [], []

    def store(data: bytes) -> str:
        stored.append(f"kos-{len(stored)}")
        return stored[-1]

    def node(index):
        return KeyObjects(index, store, deleted.append, lambda _: {"MainDicomTags": {}, "PatientMainDicomTags": {}})

    first, second = node(a), node(b)
    first.current = second.current = lambda _: None  # both read "no KOS yet", as at once
    first.update(study)
    second.update(study)
    assert stored == ["kos-0", "kos-1"] and deleted == ["kos-0"]
    assert node(a).current(study)["OrthancID"] == "kos-1"
