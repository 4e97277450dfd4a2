"""Concurrent writers and readers, bounded in time: parallel REST and C-STORE uploaders while
readers call every GET route; zero errors, and counts equal to Orthanc's at the end."""

import threading
import time

from minipacs import synth
from minipacs.openapi import document
from orthanc_server import OrthancServer

SECONDS = 20


def test_soak_uploads_and_reads_without_errors(tmp_path):
    server = OrthancServer(tmp_path / "orthanc").start()
    errors, reads = [], [0]
    stop = threading.Event()
    patients = list(range(6))

    def rest_uploader(indices):
        for index in indices:
            for ds in synth.generate(1, seed=21, size=96, slices=6, first=index):
                if stop.is_set():
                    return
                answer = server.upload(synth.encode(ds))
                if answer.status_code != 200:
                    errors.append(f"upload {answer.status_code}")

    def cstore_uploader(indices, folder):
        for index in indices:
            batch = folder / str(index)
            for ds in synth.generate(1, seed=21, size=96, slices=6, first=index):
                path = batch / synth.relative_path(ds)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(synth.encode(ds))
            done = server.storescu(sorted(batch.rglob("*.dcm")))
            if done.returncode != 0:
                errors.append(f"storescu {done.returncode}: {done.stderr[-300:]}")

    paths = [p for p, ops in document()["paths"].items() if "get" in ops and "{" not in p]

    def reader():
        session_errors = 0
        while not stop.is_set():
            for path in paths:
                answer = server.get(path)
                if answer.status_code != 200:
                    errors.append(f"GET {path}: {answer.status_code} {answer.text[:200]}")
                    session_errors += 1
                reads[0] += 1
            images = server.json("/minipacs/images?limit=5")["items"]
            for image in images:
                for suffix in ("", "/png", "/score"):
                    answer = server.get(f"/minipacs/images/{image['SOPInstanceUID']}{suffix}")
                    if answer.status_code not in (200, 404):  # not scored yet: 404
                        errors.append(f"GET image{suffix}: {answer.status_code}")
                    reads[0] += 1

    threads = [threading.Thread(target=rest_uploader, args=(patients[0:2],)),
               threading.Thread(target=rest_uploader, args=(patients[2:4],)),
               threading.Thread(target=cstore_uploader, args=(patients[4:6], tmp_path / "cstore")),
               threading.Thread(target=reader), threading.Thread(target=reader)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + SECONDS
        for thread in threads[:3]:
            thread.join(max(0.1, deadline - time.monotonic()))
        stop.set()
        for thread in threads:
            thread.join(60)
        server.wait_for_ingest()
        stats = server.json("/statistics")
        assert not errors, errors[:10]
        assert reads[0] > 100
        assert server.json("/minipacs/counts") == {
            "patients": stats["CountPatients"], "studies": stats["CountStudies"],
            "series": stats["CountSeries"], "images": stats["CountInstances"]}
        assert stats["CountInstances"] > 0 and server.alive()
    finally:
        stop.set()
        server.stop()
