"""Latency benchmark: from the start of an upload to minipacs's verdict on it, at a steady rate.

    .venv/bin/python bench/latency.py [--rate 30] [--seconds 60] [--json PATH]

Synthetic 512×512 CT instances go to Orthanc with the plugin open loop: upload i is due at
start + i/rate and is sent by a pool of clients, so a slow answer delays no later upload, and its
latency runs from that due time (a late start counts against the system, not the schedule).
The verdict is the instance's row in the plugin's index: the worker writes it once, status and
score together, in one transaction. A reader thread polls the index file read-only every few
milliseconds (WAL lets it read beside the writer without going through Orthanc, so it adds no
load there) and notes, on the same clock as the uploads, when each instance's row first shows.
The row's own ``indexed_at`` (written by SQLite, in milliseconds) checks that clock: the report
gives how long after it the reader saw each row.
"""

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

from common import context, write_results  # noqa: E402
from ingest import ct_slices  # noqa: E402
from orthanc_server import OrthancServer  # noqa: E402

WARM_UP = 5  # instances sent and indexed before the measurement: first calls load code and caches


class IndexWatcher(threading.Thread):
    """Polls the index for new image rows; ``seen`` maps an Orthanc instance ID to
    (perf_counter when first seen, status, anomaly score, indexed_at as a perf_counter time)."""

    def __init__(self, database: Path, interval: float):
        super().__init__(daemon=True)
        self.database, self.interval = database, interval
        self.seen: dict[str, tuple[float, str, float | None, float]] = {}
        self.stop = threading.Event()
        # indexed_at is wall-clock UTC; this offset puts it on the perf_counter clock.
        self.wall_minus_perf = time.time() - time.perf_counter()

    def run(self) -> None:
        db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        last = 0  # rowids grow with each insert, and one writer commits them in order
        while not self.stop.wait(self.interval):
            rows = db.execute("SELECT rowid, orthanc_id, status, anomaly_score, indexed_at FROM images "
                              "WHERE rowid > ? ORDER BY rowid", (last,)).fetchall()
            now = time.perf_counter()
            for rowid, orthanc_id, status, score, indexed_at in rows:
                indexed = datetime.strptime(indexed_at, "%Y-%m-%dT%H:%M:%S.%fZ")
                indexed_perf = indexed.replace(tzinfo=timezone.utc).timestamp() - self.wall_minus_perf
                self.seen[orthanc_id] = (now, status, score, indexed_perf)
                last = rowid
        db.close()

    def wait_for(self, ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(i in self.seen for i in ids):
            if not self.is_alive():
                raise RuntimeError("the index reader stopped (its traceback is above)")
            if time.monotonic() > deadline:
                missing = sum(i not in self.seen for i in ids)
                raise TimeoutError(f"{missing} of {len(ids)} instances not indexed after {timeout}s")
            time.sleep(0.05)


def upload_at_rate(url: str, files: list[bytes], rate: float, clients: int) -> list[dict]:
    """POST the files open loop, one due every 1/rate s; per upload its due time, start, end
    (perf_counter) and Orthanc ID."""
    local = threading.local()

    def send(due: float, data: bytes) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        began = time.perf_counter()
        answer = local.session.post(url + "/instances", data=data, timeout=120)
        answer.raise_for_status()
        return {"due": due, "began": began, "answered": time.perf_counter(), "id": answer.json()["ID"]}

    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        futures = []
        for i, data in enumerate(files):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            futures.append(pool.submit(send, due, data))
        return [f.result() for f in futures]


def ms_stats(seconds: list[float]) -> dict:
    values = np.array(seconds) * 1000
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30, help="uploads per second")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8, help="upload threads (open loop: enough "
                                                              "that none waits for a free one)")
    parser.add_argument("--poll-ms", type=float, default=5, help="how often the index is read")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run = context()  # before the run adds its own load
    count = round(args.rate * args.seconds)
    files = ct_slices(WARM_UP + count)
    with tempfile.TemporaryDirectory() as work:
        server = OrthancServer(Path(work))
        database = server.data / "index.sqlite"
        server.config["MiniPacs"]["Database"] = str(database)  # named, not left to the default
        server.start()
        try:
            model = server.json("/minipacs/model")
            for data in files[:WARM_UP]:
                server.upload(data).raise_for_status()
            server.wait_for_ingest()
            watcher = IndexWatcher(database, args.poll_ms / 1000)
            watcher.start()
            uploads = upload_at_rate(server.url, files[WARM_UP:], args.rate, args.clients)
            watcher.wait_for([u["id"] for u in uploads], timeout=300)
            watcher.stop.set()
            watcher.join()
        finally:
            server.stop()
    verdicts = [watcher.seen[u["id"]] for u in uploads]
    began = [u["began"] for u in uploads]
    results = {
        **run, "model": model.get("Version"), "instances": len(uploads),
        "rate_asked_per_s": args.rate, "rate_achieved_per_s": (len(began) - 1) / (began[-1] - began[0]),
        "clients": args.clients, "poll_ms": args.poll_ms,
        "latency_ms": ms_stats([seen - u["due"] for u, (seen, *_) in zip(uploads, verdicts)]),
        "upload_ms": ms_stats([u["answered"] - u["began"] for u in uploads]),
        "start_delay_ms": ms_stats([u["began"] - u["due"] for u in uploads]),
        "seen_after_indexed_at_ms": ms_stats([seen - indexed for seen, _, _, indexed in verdicts]),
        "statuses": {s: sum(v[1] == s for v in verdicts) for s in sorted({v[1] for v in verdicts})},
        "scored": sum(v[2] is not None for v in verdicts),
    }
    print(f"latency benchmark: {len(uploads)} CT 512×512 instances at {args.rate:g}/s asked, "
          f"{results['rate_achieved_per_s']:.1f}/s sent, model {results['model']}")
    for label, name in (("upload start to verdict", "latency_ms"), ("upload_ms", "upload_ms"),
                        ("start_delay_ms", "start_delay_ms"),
                        ("seen_after_indexed_at_ms", "seen_after_indexed_at_ms")):
        print(f"  {label:24s} p50 {results[name]['p50']:7.1f} ms   p99 {results[name]['p99']:7.1f} ms   "
              f"max {results[name]['max']:7.1f} ms")
    print(f"  statuses {results['statuses']}, {results['scored']} scored")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
