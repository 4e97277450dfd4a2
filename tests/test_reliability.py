"""Nothing lost: deletions follow Orthanc, and a crash mid-ingest is caught up exactly once."""

import signal
import sqlite3
import threading
import time

from minipacs import synth
from orthanc_server import OrthancServer


def wait_until(condition, seconds=60.0, what="condition"):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {seconds}s"
        time.sleep(0.2)


def indexed_ids(server) -> set[str]:
    ids, offset = set(), 0
    while True:
        page = server.json(f"/minipacs/images?limit=1000&offset={offset}")
        ids |= {i["OrthancID"] for i in page["items"]}
        offset += 1000
        if offset >= page["total"]:
            return ids


def same_as_orthanc(server) -> bool:
    return indexed_ids(server) == set(server.json("/instances"))


def test_deletions_at_every_level_remove_rows_and_pngs(tmp_path):
    server = OrthancServer(tmp_path).start()
    try:
        for ds in synth.generate(2, seed=11, size=64, slices=4, anomalies=0):
            server.upload(synth.encode(ds))
        server.wait_for_ingest()
        png_dir = server.data / "png"
        assert len(list(png_dir.glob("*.png"))) == len(server.json("/instances"))
        patient, other = server.json("/patients")
        study = server.json(f"/patients/{other}")["Studies"][0]
        series = server.json(f"/studies/{server.json(f'/patients/{other}')['Studies'][1]}")["Series"][0]
        instance = server.json(f"/series/{server.json(f'/studies/{study}')['Series'][0]}")["Instances"][0]
        for resource in (f"/instances/{instance}", f"/series/{series}", f"/studies/{study}",
                         f"/patients/{patient}"):
            assert server.session.delete(server.url + resource).status_code == 200
            wait_until(lambda: same_as_orthanc(server), 20, f"index after DELETE {resource}")
            stats = server.json("/statistics")
            assert server.json("/minipacs/counts") == {
                "patients": stats["CountPatients"], "studies": stats["CountStudies"],
                "series": stats["CountSeries"], "images": stats["CountInstances"]}
            assert {p.stem for p in png_dir.glob("*.png")} == set(server.json("/instances"))
    finally:
        server.stop()


def test_kill_9_mid_ingest_then_restart_indexes_everything_once(tmp_path):
    files = [synth.encode(ds) for ds in synth.generate(3, seed=12, size=512, slices=10, anomalies=0)]
    server = OrthancServer(tmp_path)
    server.config["MiniPacs"]["ReconcileInterval"] = 1
    server.start()
    sent = []

    def upload_all():
        for data in files:
            try:
                sent.append(server.upload(data).status_code)
            except Exception:
                return  # the server is gone

    uploader = threading.Thread(target=upload_all)
    uploader.start()
    # Kill while the worker still has instances to do: stored in Orthanc, not yet indexed.
    wait_until(lambda: len(sent) >= len(files) // 3
               and server.json("/minipacs/ingest")["worker"]["queued"] > 1, 60, "a backlog")
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    uploader.join(30)
    server.start()
    try:
        stored_before = set(server.json("/instances"))
        assert 0 < len(stored_before) < len(files)
        wait_until(lambda: same_as_orthanc(server), 120, "catch-up after the crash")
        assert server.json("/minipacs/ingest")["statuses"] == {"rendered": len(stored_before)}
        # Continuous reconciliation: what was not sent before the crash goes in now and is indexed.
        for data in files:
            server.upload(data)
        wait_until(lambda: same_as_orthanc(server) and len(server.json("/instances")) == len(files),
                   120, "the rest indexed")
    finally:
        server.stop()


def test_a_stale_row_beside_a_missing_one_heals_at_the_next_reconciliation(tmp_path):
    """The counts agree (one row too many, one too few): the identities do not, and the next
    store moves Orthanc's change log, which has the next idle round compare them."""
    server = OrthancServer(tmp_path)
    server.config["MiniPacs"]["ReconcileInterval"] = 1
    server.start()
    try:
        files = [synth.encode(ds) for ds in synth.generate(1, seed=13, size=64, slices=4, anomalies=0)]
        for data in files[:3]:
            server.upload(data)
        server.wait_for_ingest()
        gone = server.json("/instances")[0]
        with sqlite3.connect(server.data / "index.sqlite") as db:  # as if its NewInstance were lost,
            db.execute("DELETE FROM images WHERE orthanc_id = ?", (gone,))
            db.execute("""INSERT INTO images (orthanc_id, series, sop_uid, status) SELECT 'stale',
                          series, '9.9.9', status FROM images LIMIT 1""")  # and a deletion missed
        server.upload(files[3])
        # Before the tenth round (10 s), which compares them in any case.
        wait_until(lambda: same_as_orthanc(server), 6, "the index equal to Orthanc by identity")
        assert len(server.json("/instances")) == 4
    finally:
        server.stop()
