"""Cluster benchmark: the same synthetic 512×512 CT instances uploaded by parallel REST clients to
(a) one Orthanc with minipacs on SQLite (the default), (b) bare Orthanc on PostgreSQL (its index
and storage), (c) one Orthanc with minipacs, both on PostgreSQL (minipacs's index too), and (d) two
such nodes sharing the PostgreSQL databases and one PNG directory, half the clients on each; in
one run on one machine.

    .venv/bin/python bench/cluster.py [--instances 400] [--clients 4] [--json PATH]

For each: the upload rate, the end-to-end rate (until both nodes' /minipacs/counts say every
instance is indexed and the cluster's queue is empty), and that each instance was written once.
Then the PNG store: the PNG route's latency on each node (every node serves every PNG from the
shared directory), and writing and reading the same PNGs as files and as PostgreSQL bytea rows,
the alternative store (docs/cluster.md says why the directory).
"""

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

import psycopg  # noqa: E402

from common import context, write_results  # noqa: E402
from ingest import ct_slices, upload_all, wait_until_renderers  # noqa: E402
from orthanc_server import OrthancServer  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402
from test_cluster import PG_PLUGINS  # noqa: E402


def pg_node(work: Path, pg: PostgresServer, orthanc_db: str, index_dsn: str, png: Path) -> OrthancServer:
    node = OrthancServer(work)
    node.config["Plugins"] += [str(p) for p in PG_PLUGINS]
    node.config["PostgreSQL"] = {"EnableIndex": True, "EnableStorage": True, "Lock": False,
                                 "Host": "127.0.0.1", "Port": pg.port, "Database": orthanc_db,
                                 "Username": "minipacs", "Password": ""}
    node.config["MiniPacs"].update(PostgreSQL=index_dsn, PngDirectory=str(png))
    return node


def indexed_everywhere(nodes: list[OrthancServer], count: int, index_dsn: str | None) -> bool:
    if any(node.json("/minipacs/counts")["images"] < count for node in nodes):
        return False
    if index_dsn is None:
        return nodes[0].json("/minipacs/ingest")["worker"]["idle"]
    with psycopg.connect(index_dsn) as db:
        return db.execute("SELECT count(*) FROM claims").fetchone()[0] == 0


def run(nodes: list[OrthancServer], files: list[bytes], clients: int, index_dsn: str | None) -> dict:
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            wait_until_renderers(node, 2)
        start = time.perf_counter()
        share = len(nodes)
        with ThreadPoolExecutor(share) as pool:  # each node gets its part, at the same time
            list(pool.map(lambda n: upload_all(nodes[n].url, files[n::share], clients // share),
                          range(share)))
        upload_s = time.perf_counter() - start
        while not indexed_everywhere(nodes, len(files), index_dsn):
            time.sleep(0.05)
        end_to_end_s = time.perf_counter() - start
        result = {"upload_per_s": len(files) / upload_s, "end_to_end_per_s": len(files) / end_to_end_s}
        if index_dsn:
            with psycopg.connect(index_dsn) as db:
                result["written_once"] = db.execute(
                    "SELECT count(*) = sum(writes) FROM images").fetchone()[0]
        result["png_route_ms"] = png_route_ms(nodes)
        return result
    finally:
        for node in nodes:
            node.stop()


def png_route_ms(nodes: list[OrthancServer], count: int = 100) -> dict:
    """Median latency of GET /minipacs/images/<uid>/png on each node, for the same images."""
    uids = [item["SOPInstanceUID"] for item in nodes[0].json(f"/minipacs/images?limit={count}")["items"]]
    found = {}
    for n, node in enumerate(nodes):
        times = []
        for uid in uids:
            start = time.perf_counter()
            assert node.get(f"/minipacs/images/{uid}/png").status_code == 200
            times.append(time.perf_counter() - start)
        found[f"node_{n}"] = 1000 * statistics.median(times)
    return found


def png_stores(pngs: list[bytes], directory: Path, dsn: str) -> dict:
    """Writing and reading the same PNGs as files (atomic: a temporary file renamed) and as
    bytea rows in PostgreSQL (16 per transaction, as the workers write): ms per PNG."""
    directory.mkdir()
    start = time.perf_counter()
    for n, data in enumerate(pngs):
        part = directory / f"{n}.png.part"
        part.write_bytes(data)
        part.rename(directory / f"{n}.png")
    file_write = time.perf_counter() - start
    start = time.perf_counter()
    for n in range(len(pngs)):
        (directory / f"{n}.png").read_bytes()
    file_read = time.perf_counter() - start
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("CREATE TABLE pngs (id INTEGER PRIMARY KEY, data BYTEA NOT NULL)")
        start = time.perf_counter()
        for first in range(0, len(pngs), 16):
            with db.transaction():
                db.cursor().executemany("INSERT INTO pngs VALUES (%s, %s)",
                                        [(n, pngs[n]) for n in range(first, min(first + 16, len(pngs)))])
        bytea_write = time.perf_counter() - start
        start = time.perf_counter()
        for n in range(len(pngs)):
            db.execute("SELECT data FROM pngs WHERE id = %s", (n,)).fetchone()
        bytea_read = time.perf_counter() - start
    per = 1000 / len(pngs)
    return {"png_bytes_mean": sum(map(len, pngs)) / len(pngs),
            "file_write_ms": file_write * per, "file_read_ms": file_read * per,
            "bytea_write_ms": bytea_write * per, "bytea_read_ms": bytea_read * per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    files = ct_slices(args.instances)
    results = {**context(), "instances": len(files), "clients": args.clients}
    with tempfile.TemporaryDirectory(prefix="minipacs-cluster-bench-") as tmp:
        work = Path(tmp)
        results["one_node_sqlite"] = run([OrthancServer(work / "sqlite")], files, args.clients, None)
        pg = PostgresServer().start()
        try:
            pg.create_database("bare")
            bare = pg_node(work / "bare", pg, "bare", "", work / "png-bare")
            bare.config.pop("PythonScript")
            bare.start()
            try:
                results["bare_orthanc_postgresql_upload_per_s"] = len(files) / upload_all(
                    bare.url, files, args.clients)
            finally:
                bare.stop()
            for name, count in (("one_node_postgresql", 1), ("two_nodes_postgresql", 2)):
                orthanc_db, index_db = f"orthanc_{count}", f"minipacs_{count}"
                pg.create_database(orthanc_db)
                index_dsn = pg.create_database(index_db)
                png = work / f"png-{count}"
                nodes = [pg_node(work / f"{name}-{n}", pg, orthanc_db, index_dsn, png) for n in range(count)]
                results[name] = run(nodes, files, args.clients, index_dsn)
            pngs = [p.read_bytes() for p in sorted((work / "png-2").glob("*.png"))]
            results["png_store"] = png_stores(pngs, work / "png-copy", pg.create_database("pngs"))
        finally:
            pg.stop()
    one = results["one_node_sqlite"]
    for name in ("one_node_postgresql", "two_nodes_postgresql"):
        results[f"{name}_end_to_end_ratio"] = results[name]["end_to_end_per_s"] / one["end_to_end_per_s"]
        results[f"{name}_upload_ratio_to_bare_postgresql"] = (
            results[name]["upload_per_s"] / results["bare_orthanc_postgresql_upload_per_s"])
    print(__import__("json").dumps(results, indent=2))
    write_results(args.json, results)


if __name__ == "__main__":
    main()
