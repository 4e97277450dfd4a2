"""Two Orthanc nodes on one PostgreSQL (Debian's orthanc-postgresql), one minipacs index.

A real PostgreSQL started from Debian's packages, two real Orthanc processes with the
PostgreSQL index and storage plugins (``"Lock": false``: several writers) and the minipacs
plugin with ``MiniPacs.PostgreSQL``, sharing one PNG directory. Real files uploaded in parallel
to both nodes over REST and C-STORE, one node killed (SIGKILL) while it holds work, deletions
through either node; then both nodes answer Orthanc's own counts, every instance was written
once, and no PNG is left without its row nor a row without its PNG.
"""

import json
import signal
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

import postgres_server
from corpus import pydicom_data_files, pydicom_test_files
from orthanc_server import ROOT, OrthancServer

EXAMPLE = json.loads((ROOT / "orthanc-cluster.json").read_text())  # the README's example node
PG_PLUGINS = [Path(p) for p in EXAMPLE["Plugins"] if "PostgreSQL" in p]
psycopg = pytest.importorskip("psycopg")
missing = postgres_server.available() or next(
    (f"{p} is missing (Debian's orthanc-postgresql; ./minipacs.sh setup --dev installs it)"
     for p in PG_PLUGINS if not p.exists()), None)
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {seconds}s"
        time.sleep(0.5)


class Cluster:
    def __init__(self, workdir: Path):
        self.pg = postgres_server.PostgresServer().start()
        self.pg.create_database(EXAMPLE["PostgreSQL"]["Database"])
        self.index_dsn = self.pg.create_database("minipacs")
        self.png = workdir / "png"  # one directory every node reaches (docs/cluster.md)
        self.nodes = [self._node(workdir / name) for name in ("a", "b")]

    def _node(self, workdir: Path) -> OrthancServer:
        """A node configured as the example orthanc-cluster.json, on this cluster's addresses."""
        server = OrthancServer(workdir)
        server.config["Plugins"] += [p for p in EXAMPLE["Plugins"] if "PostgreSQL" in p]
        server.config["PostgreSQL"] = {**EXAMPLE["PostgreSQL"], "Host": "127.0.0.1", "Port": self.pg.port,
                                       "Username": "minipacs", "Password": ""}
        server.config["MiniPacs"].update({**EXAMPLE["MiniPacs"], "DataDirectory": str(server.data),
                                          "PngDirectory": str(self.png), "PostgreSQL": self.index_dsn,
                                          # No periodic reconciliation: what this test checks
                                          # must hold without it (the leases are short).
                                          "ClaimLease": 5, "ReconcileInterval": 0})
        return server

    def query(self, sql: str) -> list[tuple]:
        with psycopg.connect(self.index_dsn) as db:
            return db.execute(sql).fetchall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.pg.stop()


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        for node in cluster.nodes:
            node.start()
        yield cluster
    finally:
        cluster.stop()


def unique_files() -> list[Path]:
    """pydicom's test files and pydicom-data, one per SOP Instance UID (a re-sent instance is another test)."""
    seen, files = set(), []
    for path in pydicom_test_files() + pydicom_data_files():
        try:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        except Exception:
            continue
        if uid not in seen:
            seen.add(uid)
            files.append(path)
    return files


def counts_match(node: OrthancServer) -> bool:
    stats = node.json("/statistics")
    return node.json("/minipacs/counts") == {
        "patients": stats["CountPatients"], "studies": stats["CountStudies"],
        "series": stats["CountSeries"], "images": stats["CountInstances"]}


def test_two_nodes_index_every_instance_once_through_uploads_deletions_and_a_kill(cluster):
    a, b = cluster.nodes
    files = unique_files()
    assert len(files) > 30
    parts = [files[n::4] for n in range(4)]

    # Node A dies (SIGKILL) as soon as it holds work, uploads going on: its claims expire and
    # B finishes them. What was sent to A after its death is sent to B.
    def held_by_a():
        return cluster.query(f"SELECT count(*) FROM claims WHERE node LIKE '%:{a.process.pid}:%'")[0][0]

    def kill_a():
        wait_until(lambda: held_by_a() > 0, 120, "node A holding claims")
        a.process.send_signal(signal.SIGKILL)

    def rest(node, paths):
        for path in paths:
            try:
                node.upload(path.read_bytes())  # a file Orthanc refuses is simply not stored
            except requests.ConnectionError:
                b.upload(path.read_bytes())

    def dimse(node, paths):
        if node.storescu(paths).returncode and node is a:
            b.storescu(paths)  # already stored ones are stored again: the same instances

    killer = threading.Thread(target=kill_a)
    killer.start()
    senders = [threading.Thread(target=rest, args=(a, parts[0])),
               threading.Thread(target=rest, args=(b, parts[1])),
               threading.Thread(target=dimse, args=(a, parts[2])),
               threading.Thread(target=dimse, args=(b, parts[3]))]
    for sender in senders:
        sender.start()
    for thread in senders + [killer]:
        thread.join()
    assert a.process.wait(10) == -signal.SIGKILL  # killed while it held work
    stored = set(b.json("/instances"))
    assert len(stored) > 30
    # A deletion through B while A is down; then A comes back and deletes through itself.
    studies = b.json("/studies")
    b.session.delete(f"{b.url}/studies/{studies[0]}").raise_for_status()
    a.start()
    patients = {a.json(f"/patients/{p}")["MainDicomTags"].get("PatientID", ""): p for p in a.json("/patients")}
    patient = max(p for p in patients if p.isalnum())  # one the routes can be asked for
    a.session.delete(f"{a.url}/patients/{patients[patient]}").raise_for_status()
    instance = next(i for i in a.json("/instances"))
    sop = a.json(f"/instances/{instance}/simplified-tags")["SOPInstanceUID"]
    b.session.delete(f"{b.url}/instances/{instance}").raise_for_status()
    # Every node answers what was deleted through another as soon as that node heard of it
    # (Orthanc's change callback, just after its answer to the DELETE): one index.
    wait_until(lambda: a.get(f"/minipacs/images/{sop}").status_code == 404, 5, "the instance gone on A")
    wait_until(lambda: b.get(f"/minipacs/patients/{patient}").status_code == 404, 5, "the patient gone on B")

    for node in (a, b):
        wait_until(lambda: counts_match(node), 180, f"{node.url}'s /minipacs/counts equal to /statistics")
    wait_until(lambda: cluster.query("SELECT count(*) FROM claims")[0][0] == 0, 60, "the queue empty")
    in_orthanc = set(a.json("/instances"))
    rows = dict(cluster.query("SELECT orthanc_id, writes FROM images"))
    assert set(rows) == in_orthanc
    assert [i for i, writes in rows.items() if writes != 1] == []  # each instance written once
    pngs = {name for name, in cluster.query("SELECT png FROM images WHERE png IS NOT NULL")}
    # None missing; and none orphan once swept (a killed node's renderers wrote PNGs of instances
    # deleted since: a file without a row and without a claim goes at the next reconciliation).
    assert pngs <= {p.name for p in cluster.png.iterdir()}
    wait_until(lambda: {p.name for p in cluster.png.iterdir()} == pngs, 120, "no orphan PNG")
    assert len(pngs) > 20
    # Every node serves every image, whichever node rendered it.
    sop = b.json(f"/instances/{sorted(in_orthanc)[0]}/simplified-tags")["SOPInstanceUID"]
    assert a.json(f"/minipacs/images/{sop}") == b.json(f"/minipacs/images/{sop}")
    with_png = cluster.query("SELECT sop_uid FROM images WHERE png IS NOT NULL LIMIT 1")[0][0]
    for node in (a, b):
        answer = node.get(f"/minipacs/images/{with_png}/png")
        assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
