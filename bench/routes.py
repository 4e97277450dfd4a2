"""Routes at scale: every GET /minipacs route over an index of 1,000,000 images, beside Orthanc's
own /patients/{id} and /statistics, through Orthanc's HTTP server in one run.

    .venv/bin/python bench/routes.py [--images 1000000] [--patients 10000] [--requests 1000]
                                     [--http-compression] [--postgresql] [--json PATH]

The index is filled directly (one transaction of executemany through the schema the Index class
creates), so Orthanc stores only a few real instances: reconciliation is switched off, or the
plugin would forget the rows Orthanc does not have. Every route is asked ``--requests`` times
with random identifiers that exist, by one keep-alive client, in rounds of all routes in random
order, so the machine's other work hits every route alike. Pages have the default limit (25),
but for /anomalies?min_score (20) and /images?limit=100, at random offsets within the first 100
pages. Orthanc runs as orthanc.json sets it up, without HTTP compression (its clients are on
this host); ``--http-compression`` turns it on: Orthanc then gzips every answer, of any size,
for a client that accepts gzip (as this one, and any, does).
``--postgresql`` puts the index in PostgreSQL (``MiniPacs.PostgreSQL``, a server started from
Debian's packages as the tests do; filled by COPY with the triggers off, then the items and
counters written as the triggers would have), Orthanc itself staying on SQLite.
Target: the p99 of every minipacs route ≤ the p99 of Orthanc's /patients/{id}.
"""

import argparse
import contextlib
import io
import random
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

from common import context, write_results  # noqa: E402
from minipacs import index as idx  # noqa: E402
from minipacs import synth  # noqa: E402
from minipacs.orthanc_ids import orthanc_ids  # noqa: E402
from orthanc_server import OrthancServer  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.543"
# modality: (share of studies, series per study, relative images per series, SOP class)
MODALITIES = {
    "CT": (0.35, (2, 5), 30.0, "1.2.840.10008.5.1.4.1.1.2"),
    "MR": (0.30, (3, 7), 12.0, "1.2.840.10008.5.1.4.1.1.4"),
    "CR": (0.20, (1, 2), 0.15, "1.2.840.10008.5.1.4.1.1.1"),
    "DX": (0.15, (1, 2), 0.15, "1.2.840.10008.5.1.4.1.1.1.1"),
}
# status: share of the images (the rest are rendered)
FAILURES = {idx.NO_PIXEL_DATA: 0.02, idx.RENDER_FAILED: 0.01, idx.UNREADABLE: 0.002}
ANOMALOUS = 0.01  # share of the rendered images the model flags
THRESHOLD = 0.5
MODEL = "bench-routes"
IMAGE_COLUMNS = ("orthanc_id", "series", "modality", "series_uid", "study_uid", "patient_id",
                 "sop_uid", "sop_class_uid", "instance_number", "transfer_syntax", "status",
                 "status_detail", "png", "rows", "columns", "frames", "rendered_frame",
                 "photometric", "rescale_slope", "rescale_intercept", "window_center",
                 "window_width", "window_source", "voi_function", "inverted", "decoder",
                 "anomaly_score", "flagged", "model_version", "threshold", "scored_at")


# Filling the index -------------------------------------------------------------------------

def hierarchy(patients: int, images: int, rng: random.Random):
    """Patients, studies and series rows, and how many images each series holds (≥ 1, summing
    to ``images``: a few series of many CT/MR slices, many of one or two radiographs)."""
    patient_rows, study_rows, series_rows, weights = [], [], [], []
    names = list(MODALITIES)
    shares = [MODALITIES[m][0] for m in names]
    for p in range(patients):
        patient_id = f"PAT{p:06d}"
        ids = orthanc_ids(patient_id, "", "", "")
        patient_rows.append((ids.patient, patient_id, f"DOE^PATIENT{p}",
                             f"19{rng.randint(30, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
                             rng.choice("MF")))
        for s in range(rng.randint(1, 5)):
            study_uid = f"{UID_ROOT}.1.{p}.{s}"
            modality = rng.choices(names, shares)[0]
            study_id = orthanc_ids(patient_id, study_uid, "", "").study
            study_rows.append((study_id, ids.patient, study_uid,
                               f"20{rng.randint(10, 25)}0{rng.randint(1, 9)}{rng.randint(10, 28)}",
                               f"{modality} study", f"ACC{p:06d}{s}"))
            low, high = MODALITIES[modality][1]
            for n in range(rng.randint(low, high)):
                series_uid = f"{UID_ROOT}.2.{p}.{s}.{n}"
                series_id = orthanc_ids(patient_id, study_uid, series_uid, "").series
                series_rows.append((series_id, study_id, series_uid, modality, n + 1,
                                    f"{modality} series {n + 1}", patient_id, study_uid))
                weights.append(MODALITIES[modality][2])
    if images < len(series_rows):
        raise SystemExit(f"--images must be at least {len(series_rows)} (one per series)")
    weights = np.array(weights) / sum(weights)
    sizes = 1 + np.random.default_rng(rng.randint(0, 2**32)).multinomial(images - len(series_rows), weights)
    return patient_rows, study_rows, series_rows, sizes.tolist()


def image_rows(series_rows, sizes, rng: random.Random):
    """Every image row, series after series (a generator: a million tuples need not be held)."""
    statuses = list(FAILURES) + [idx.RENDERED]
    shares = list(FAILURES.values()) + [1 - sum(FAILURES.values())]
    for (series_id, _, series_uid, modality, *_, patient_id, study_uid), size in zip(series_rows, sizes):
        for n in range(size):
            sop_uid = f"{UID_ROOT}.3.{series_uid[len(UID_ROOT) + 3:]}.{n}"
            orthanc_id = orthanc_ids(patient_id, study_uid, series_uid, sop_uid).instance
            status = rng.choices(statuses, shares)[0]
            rendered = status == idx.RENDERED
            score = (rng.uniform(THRESHOLD, 1.0) if rng.random() < ANOMALOUS
                     else rng.betavariate(1.2, 12) * THRESHOLD) if rendered else None
            yield (orthanc_id, series_id, modality, series_uid, study_uid, patient_id, sop_uid,
                   MODALITIES[modality][3], n + 1, "1.2.840.10008.1.2.1", status,
                   None if rendered or status == idx.NO_PIXEL_DATA else "synthetic failure",
                   f"{orthanc_id}.png" if rendered else None,
                   512, 512, 1, 0 if rendered else None, "MONOCHROME2", 1.0, -1024.0,
                   40.0, 400.0, "dataset", "LINEAR", 0, "pydicom",
                   score, None if score is None else int(score >= THRESHOLD),
                   MODEL if rendered else None, THRESHOLD if rendered else None,
                   "2026-01-01T00:00:00.000Z" if rendered else None)


def fill_postgresql(dsn: str, patients: int, images: int, seed: int) -> None:
    """:func:`fill` into PostgreSQL: the schema made by PostgresIndex, the rows copied with the
    triggers off and the secondary indexes dropped, then each image's item and the counters
    written as the triggers write them, and the indexes rebuilt by opening the index again."""
    import psycopg
    from minipacs.index_pg import PostgresIndex

    PostgresIndex(dsn, "bench").close()
    rng = random.Random(seed)
    patient_rows, study_rows, series_rows, sizes = hierarchy(patients, images, rng)
    with psycopg.connect(dsn) as db:
        db.execute("SET session_replication_role = replica")  # no triggers, no foreign key checks
        for (name,) in db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                                  "AND indexname NOT LIKE '%_pkey'").fetchall():
            db.execute(f'DROP INDEX "{name}"')
        for table, rows, columns in (("patients", patient_rows, ""), ("studies", study_rows, ""),
                                     ("series", [row[:6] for row in series_rows], ""),
                                     ("images", image_rows(series_rows, sizes, rng),
                                      f"({', '.join(IMAGE_COLUMNS)})")):
            with db.cursor().copy(f"COPY {table} {columns} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        item = re.sub(r"\bi\.", "images.", idx._json_object(idx._IMAGE, postgresql=True))
        db.execute(f"UPDATE images SET item = CAST({item} AS text)")
        db.execute("DELETE FROM counters")
        for sql in ["SELECT 'patients', count(*) FROM patients", "SELECT 'studies', count(*) FROM studies",
                    "SELECT 'series', count(*) FROM series", "SELECT 'images', count(*) FROM images",
                    "SELECT 'flagged', count(*) FROM images WHERE flagged = 1",
                    "SELECT 'status:' || status, count(*) FROM images GROUP BY status"]:
            db.execute(f"INSERT INTO counters SELECT name, 0, n FROM ({sql}) AS c(name, n)")
    PostgresIndex(dsn, "bench").close()
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("VACUUM ANALYZE")


def fill(path: Path, patients: int, images: int, seed: int) -> None:
    """Create the index with the Index class, then insert every row in one transaction with
    the secondary indexes dropped; opening the Index again builds them (as it does for an
    index made by an older version), which is much faster than growing them row by row."""
    idx.Index(path).close()
    rng = random.Random(seed)
    patient_rows, study_rows, series_rows, sizes = hierarchy(patients, images, rng)
    db = sqlite3.connect(path)
    db.execute("PRAGMA cache_size = -500000")
    with db:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                  "AND sql IS NOT NULL").fetchall():
            db.execute(f'DROP INDEX "{name}"')
        db.executemany("INSERT INTO patients VALUES (?, ?, ?, ?, ?)", patient_rows)
        db.executemany("INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?)", study_rows)
        db.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?)", [row[:6] for row in series_rows])
        marks = ", ".join("?" * len(IMAGE_COLUMNS))
        db.executemany(f"INSERT INTO images ({', '.join(IMAGE_COLUMNS)}) VALUES ({marks})",
                       image_rows(series_rows, sizes, rng))
    db.close()
    idx.Index(path).close()


# Asking the routes ---------------------------------------------------------------------------

def samples(index: str, count: int, seed: int) -> dict[str, list]:
    """Random identifiers that exist in the index (a SQLite file or a PostgreSQL connection
    string), per kind, to draw requests from."""
    if index.startswith("postgresql:"):
        import psycopg
        db = psycopg.connect(index)
        every = "abs(hashtext(orthanc_id)) % {n} = 0"
    else:
        db = sqlite3.connect(index)
        every = "rowid % {n} = 0"
    rng = random.Random(seed)

    def pick(sql: str) -> list:
        rows = db.execute(sql).fetchall()
        return rng.sample(rows, min(count, len(rows)))

    found = {
        "patient": pick("SELECT patient_id FROM patients"),
        "study": pick("SELECT study_uid FROM studies"),
        "series": pick("SELECT series_uid FROM series"),
        "image": pick(f"SELECT sop_uid, orthanc_id FROM images WHERE {every.format(n=97)}"),
        "rendered": pick(f"SELECT sop_uid, png FROM images WHERE status = 'rendered' "
                         f"AND {every.format(n=89)}"),
    }
    db.close()
    return {kind: [row[0] if len(row) == 1 else row for row in rows] for kind, rows in found.items()}


def write_pngs(directory: Path, rendered: list[tuple[str, str]]) -> None:
    """The PNG files of the images /png is asked for (the others are never read)."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).save(buffer, "PNG")
    for _, png in rendered:
        (directory / png).write_bytes(buffer.getvalue())


def routes(ids: dict[str, list], counts: dict[str, int], orthanc_patients: list[str]) -> dict:
    """Route name → a function of a Random giving the path to ask."""
    def offset(r: random.Random, total: int, limit: int = 25) -> int:
        return 0 if total <= limit else r.randrange(0, min(total - limit, 100 * limit))

    def by_status(r: random.Random) -> str:
        status = r.choice(idx.STATUSES)
        return f"/minipacs/images?status={status}&offset={offset(r, counts.get(status, 0))}"

    one = {kind: (lambda r, kind=kind: r.choice(ids[kind])) for kind in ids}
    table = {
        "/": lambda r: "/minipacs/",
        "/counts": lambda r: "/minipacs/counts",
        "/ingest": lambda r: "/minipacs/ingest",
        "/model": lambda r: "/minipacs/model",
        "/rescore": lambda r: "/minipacs/rescore",
        "/openapi.json": lambda r: "/minipacs/openapi.json",
        "/ui": lambda r: "/minipacs/ui",
        "/anomalies": lambda r: "/minipacs/anomalies",
        "/anomalies?offset": lambda r: f"/minipacs/anomalies?offset={offset(r, counts['flagged'])}",
        "/anomalies?patient": lambda r: f"/minipacs/anomalies?patient={one['patient'](r)}",
        "/anomalies?study": lambda r: f"/minipacs/anomalies?study={one['study'](r)}",
        "/anomalies?series": lambda r: f"/minipacs/anomalies?series={one['series'](r)}",
        "/anomalies?modality": lambda r: f"/minipacs/anomalies?modality={r.choice(list(MODALITIES))}",
        "/anomalies?min_score": lambda r: f"/minipacs/anomalies?min_score={r.uniform(0.5, 1):.3f}&limit=20",
        "/images?status": by_status,
        "/images?limit=100": lambda r: f"/minipacs/images?limit=100&offset={100 * r.randrange(100)}",
        "/imageinfo/{id}.png": lambda r: f"/minipacs/imageinfo/{one['image'](r)[1]}.png",
        "/images/{uid}/png": lambda r: f"/minipacs/images/{one['rendered'](r)[0]}/png",
        "/images/{uid}/score": lambda r: f"/minipacs/images/{one['rendered'](r)[0]}/score",
        "/studies/{uid}/summary": lambda r: f"/minipacs/studies/{one['study'](r)}/summary",
        "/series/{uid}/summary": lambda r: f"/minipacs/series/{one['series'](r)}/summary",
    }
    for what in ("studycount", "seriescount", "imagecount", "counts"):
        table[f"/patients/{{uid}}/{what}"] = (
            lambda r, what=what: f"/minipacs/patients/{one['patient'](r)}/{what}")
    levels = (("patients", "patient", "studies"), ("studies", "study", "series"),
              ("series", "series", "images"), ("images", "image", None))
    for name, kind, child in levels:
        pick = (lambda r: one["image"](r)[0]) if kind == "image" else one[kind]
        table[f"/{name}"] = lambda r, name=name: f"/minipacs/{name}?offset={offset(r, counts[name])}"
        table[f"/{name}/count"] = lambda r, name=name: f"/minipacs/{name}/count"
        table[f"/{name}/{{uid}}"] = lambda r, name=name, pick=pick: f"/minipacs/{name}/{pick(r)}"
        if child:
            table[f"/{name}/{{uid}}/{child}"] = (
                lambda r, name=name, child=child, pick=pick: f"/minipacs/{name}/{pick(r)}/{child}")
    table["Orthanc /patients/{id}"] = lambda r: f"/patients/{r.choice(orthanc_patients)}"
    table["Orthanc /statistics"] = lambda r: "/statistics"
    return table


def measure(url: str, table: dict, rounds: int, seed: int) -> dict[str, list[float]]:
    """Milliseconds per request of every route, in ``rounds`` rounds of all routes in random
    order, after one round to warm up; every answer must be a 200."""
    session, rng = requests.Session(), random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in table}
    names = list(table)
    for round_ in range(rounds + 1):
        rng.shuffle(names)
        for name in names:
            path = table[name](rng)
            start = time.perf_counter()
            answer = session.get(url + path, timeout=60)
            elapsed = time.perf_counter() - start
            if answer.status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")
            if round_:
                times[name].append(elapsed * 1000)
    return times


def upload_real_instances(server: OrthancServer) -> list[str]:
    """A few synthetic instances stored in Orthanc, so /patients/{id} has patients to answer;
    return their Orthanc patient IDs."""
    for ds in synth.generate(3, seed=3, size=64, slices=4):
        server.upload(synth.encode(ds)).raise_for_status()
    server.wait_for_ingest()
    return server.json("/patients")


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=1000, help="per route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http-compression", action="store_true",
                        help="Orthanc's HttpCompressionEnabled (orthanc.json: off)")
    parser.add_argument("--postgresql", action="store_true", help="the index in PostgreSQL")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run = context()  # before the run adds its own load
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        data = Path(work) / "minipacs"
        options = {"DataDirectory": str(data), "ReconcileOnStart": False, "ReconcileInterval": 0}
        start = time.perf_counter()
        if args.postgresql:
            from postgres_server import PostgresServer
            pg = PostgresServer().start()
            stack.callback(pg.stop)
            index = options["PostgreSQL"] = pg.create_database("minipacs")
            fill_postgresql(index, args.patients, args.images, args.seed)
        else:
            index = str(data / "index.sqlite")
            fill(Path(index), args.patients, args.images, args.seed)
        fill_s = time.perf_counter() - start
        ids = samples(index, 2000, args.seed)
        write_pngs(data / "png", ids["rendered"])
        server = OrthancServer(Path(work), HttpCompressionEnabled=args.http_compression, MiniPacs=options)
        server.start()
        try:
            orthanc_patients = upload_real_instances(server)
            counts = server.json("/minipacs/counts")
            statuses = server.json("/minipacs/ingest")["statuses"]
            flagged = server.json("/minipacs/anomalies?limit=1")["total"]
            table = routes(ids, {**counts, **statuses, "flagged": flagged}, orthanc_patients)
            times = measure(server.url, table, args.requests, args.seed)
        finally:
            server.stop()
    report(args, run, counts, flagged, fill_s, times)


def report(args, run: dict, counts: dict, flagged: int, fill_s: float,
           times: dict[str, list[float]]) -> None:
    stats = {name: percentiles(values) for name, values in times.items()}
    target = stats["Orthanc /patients/{id}"]["p99_ms"]
    ours = {name: s for name, s in stats.items() if not name.startswith("Orthanc")}
    results = {
        **run, "counts": counts, "flagged": flagged, "fill_s": round(fill_s, 1),
        "requests_per_route": args.requests, "http_compression": args.http_compression,
        "index": "postgresql" if args.postgresql else "sqlite",
        "routes": stats,
        "target_p99_ms": target,
        "slower_than_target": sorted(name for name, s in ours.items() if s["p99_ms"] > target),
    }
    print(f"routes benchmark: {counts['images']:,} images, {counts['patients']:,} patients, "
          f"{flagged:,} flagged (filled in {fill_s:.0f} s), {args.requests} requests per route, "
          f"HTTP compression {'on' if args.http_compression else 'off'}, "
          f"index in {'PostgreSQL' if args.postgresql else 'SQLite'}")
    print(f"  {'route':34} {'p50 ms':>8} {'p99 ms':>8}")
    for name, s in sorted(stats.items(), key=lambda item: -item[1]["p99_ms"]):
        mark = "  > target" if name in results["slower_than_target"] else ""
        print(f"  {name:34} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f}{mark}")
    print(f"target: p99 of every minipacs route <= Orthanc /patients/{{id}} p99 ({target:.2f} ms): "
          f"{'met' if not results['slower_than_target'] else 'NOT met'}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
