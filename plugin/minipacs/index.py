"""The SQLite index: Patient → Study → Series → Image, with rendering parameters and status.

Rows are keyed by Orthanc's own IDs (so counts equal Orthanc's ``/statistics`` and a re-sent
instance replaces its row); the DICOM identifiers are indexed for lookups. One writer (the
ingest worker) and many readers (HTTP threads) share the file through WAL mode, each thread with
its own connection. A resource is answered as a JSON object whose keys are DICOM keywords where
the value is a DICOM attribute, so answers read like the standard; SQLite writes these objects
itself, so that a page of them reaches the HTTP answer without becoming Python objects.

Every route must stay cheap with a million images: counts come from a ``counters`` table kept by
triggers, each listing's order has an index that yields it (so a page reads ``limit + offset``
index entries, never the whole table), a page is chosen on its own table before the rows of the
parents are joined, and images carry their parents' identifiers so that theirs need no join,
and their own JSON answer (``item``, written by triggers), so that a page of them is read, not
written, per request.
"""

import contextlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The tables and indexes, in SQL that both SQLite and PostgreSQL take (index_pg.py turns REAL
# into double precision and the default time into its own); what each dialect adds follows.
TABLES = """
CREATE TABLE IF NOT EXISTS patients (
    orthanc_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    patient_name TEXT,
    birth_date TEXT,
    sex TEXT
);
CREATE INDEX IF NOT EXISTS patients_in_order ON patients(patient_id, orthanc_id);

CREATE TABLE IF NOT EXISTS studies (
    orthanc_id TEXT PRIMARY KEY,
    patient TEXT NOT NULL REFERENCES patients(orthanc_id) ON DELETE CASCADE,
    study_uid TEXT NOT NULL,
    study_date TEXT,
    description TEXT,
    accession_number TEXT
);
CREATE INDEX IF NOT EXISTS studies_of_patient ON studies(patient, study_date, study_uid, orthanc_id);
CREATE INDEX IF NOT EXISTS studies_in_order ON studies(study_date, study_uid, orthanc_id);
CREATE INDEX IF NOT EXISTS studies_by_uid ON studies(study_uid);

CREATE TABLE IF NOT EXISTS series (
    orthanc_id TEXT PRIMARY KEY,
    study TEXT NOT NULL REFERENCES studies(orthanc_id) ON DELETE CASCADE,
    series_uid TEXT NOT NULL,
    modality TEXT,
    series_number INTEGER,
    description TEXT
);
CREATE INDEX IF NOT EXISTS series_of_study ON series(study, series_number, series_uid, orthanc_id);
CREATE INDEX IF NOT EXISTS series_in_order ON series(series_number, series_uid, orthanc_id);
CREATE INDEX IF NOT EXISTS series_by_uid ON series(series_uid);

CREATE TABLE IF NOT EXISTS images (
    orthanc_id TEXT PRIMARY KEY,
    series TEXT NOT NULL REFERENCES series(orthanc_id) ON DELETE CASCADE,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT,
    instance_number INTEGER,
    transfer_syntax TEXT,
    status TEXT NOT NULL,
    status_detail TEXT,
    png TEXT,
    rows INTEGER,
    columns INTEGER,
    frames INTEGER,
    rendered_frame INTEGER,
    photometric TEXT,
    rescale_slope REAL,
    rescale_intercept REAL,
    window_center REAL,
    window_width REAL,
    window_source TEXT,
    voi_function TEXT,
    inverted INTEGER,
    decoder TEXT,
    anomaly_score REAL,
    flagged INTEGER,
    anomaly_reason TEXT,  -- why it is flagged (minipacs.reasons)
    model_version TEXT,
    threshold REAL,
    scored_at TEXT,
    indexed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    modality TEXT,  -- the series' own, copied so that anomalies by modality need no join
    -- The parents' identifiers, copied so that a page of images needs no join (the joins cost
    -- as much as the rest of the page).
    series_uid TEXT,
    study_uid TEXT,
    patient_id TEXT,
    item TEXT,  -- the row as its JSON answer, kept by triggers (see _item_statements)
    writes INTEGER NOT NULL DEFAULT 1  -- rows written for it by the workers (exactly once: 1)
);
CREATE INDEX IF NOT EXISTS images_of_series ON images(series, instance_number, sop_uid, orthanc_id);
CREATE INDEX IF NOT EXISTS images_in_order ON images(instance_number, sop_uid, orthanc_id);
CREATE INDEX IF NOT EXISTS images_by_uid ON images(sop_uid);
CREATE INDEX IF NOT EXISTS images_of_status ON images(status, instance_number, sop_uid, orthanc_id);
-- A series' images with what summaries count: a study's or patient's summary and counts read
-- this index alone, never the image rows (~1 KB each with their item), and the flagged images of
-- a series are found by seeking it (a study summary at a million images: 0.09 -> 0.02 ms).
CREATE INDEX IF NOT EXISTS images_summary ON images(series, flagged, anomaly_score, status);
-- "flagged" in the columns too: SQLite counts on a partial index without reading the rows
-- only when the index holds every column the query names.
CREATE INDEX IF NOT EXISTS images_flagged_in_order ON images(anomaly_score DESC, orthanc_id, flagged)
    WHERE flagged = 1;
CREATE INDEX IF NOT EXISTS images_flagged_by_modality
    ON images(modality, anomaly_score DESC, orthanc_id, flagged) WHERE flagged = 1;
-- What a rescore would change (/minipacs/model, read by every UI page): seeks, not a scan of a
-- million rows (0.8 s), since both counts are usually zero.
CREATE INDEX IF NOT EXISTS images_by_model ON images(model_version, status);
"""
SCHEMA = TABLES + """
-- Instances handed to a renderer and not yet written: a crash (of Orthanc or of a renderer)
-- leaves the claim, so that one that keeps crashing is given up after a few attempts.
CREATE TABLE IF NOT EXISTS claims (
    orthanc_id TEXT PRIMARY KEY,
    attempts INTEGER NOT NULL,
    claimed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TRIGGER IF NOT EXISTS series_modality AFTER UPDATE OF modality ON series
WHEN old.modality IS NOT new.modality BEGIN
    UPDATE images SET modality = new.modality WHERE series = new.orthanc_id;
END;
-- An identifier changes under the same Orthanc ID only in its spelling (Orthanc's ID hashes it
-- as Orthanc normalises it), when a re-sent instance spells it otherwise.
CREATE TRIGGER IF NOT EXISTS series_uid_copied AFTER UPDATE OF series_uid ON series
WHEN old.series_uid IS NOT new.series_uid BEGIN
    UPDATE images SET series_uid = new.series_uid WHERE series = new.orthanc_id;
END;
CREATE TRIGGER IF NOT EXISTS study_uid_copied AFTER UPDATE OF study_uid ON studies
WHEN old.study_uid IS NOT new.study_uid BEGIN
    UPDATE images SET study_uid = new.study_uid
    WHERE series IN (SELECT orthanc_id FROM series WHERE study = new.orthanc_id);
END;
CREATE TRIGGER IF NOT EXISTS patient_id_copied AFTER UPDATE OF patient_id ON patients
WHEN old.patient_id IS NOT new.patient_id BEGIN
    UPDATE images SET patient_id = new.patient_id WHERE series IN (SELECT se.orthanc_id
        FROM series se JOIN studies s ON s.orthanc_id = se.study WHERE s.patient = new.orthanc_id);
END;
"""
# Reviewers' verdicts (minipacs.reviews): one row per review, the image's history; ``latest`` marks
# its current verdict. What the model said when the review was made is kept beside it, so that a
# rescore changes the image's score, never what the reviewer saw. Keyed by the image's Orthanc ID:
# ingest and rescoring never touch these rows (an upsert keeps its key), and a deleted image takes
# its reviews with it (ON DELETE CASCADE). Portable SQL: SQLite and PostgreSQL accept it as it is.
REVIEWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    image TEXT NOT NULL REFERENCES images(orthanc_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,  -- 1, 2, ... for each image
    latest INTEGER NOT NULL,  -- 1 on the image's current review, 0 on those it replaced
    verdict TEXT NOT NULL,  -- invalid (an anomaly) or valid
    reason TEXT,  -- why invalid (minipacs.reasons)
    comment TEXT,
    reviewer TEXT,  -- Orthanc's authenticated user, where there is one
    reviewed_at TEXT NOT NULL,
    model_flagged INTEGER,  -- what the model said when the review was made
    model_score REAL,
    model_reason TEXT,
    model_version TEXT,
    PRIMARY KEY (image, seq)
);
CREATE INDEX IF NOT EXISTS reviews_in_order ON reviews(latest, reviewed_at, image);
-- The KOS (Key Object Selection) document minipacs keeps in each study (minipacs.kos).
CREATE TABLE IF NOT EXISTS key_objects (
    study TEXT PRIMARY KEY REFERENCES studies(orthanc_id) ON DELETE CASCADE,
    instance TEXT NOT NULL,  -- the KOS's Orthanc ID
    sop_uid TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS key_objects_by_instance ON key_objects(instance);
"""
# Indexes of older versions that the ones above replace.
OBSOLETE_INDEXES = ("patients_by_patient_id", "studies_by_patient", "series_by_study",
                    "images_by_series", "images_by_status", "images_flagged")

_FROM_IMAGE = """images i JOIN series se ON se.orthanc_id = i.series
    JOIN studies s ON s.orthanc_id = se.study JOIN patients p ON p.orthanc_id = s.patient"""
_FROM_SERIES = """series se JOIN studies s ON s.orthanc_id = se.study
    JOIN patients p ON p.orthanc_id = s.patient"""
_FROM_STUDY = "studies s JOIN patients p ON p.orthanc_id = s.patient"

# What fills a column for the rows that existed before it was added.
BACKFILL = {("images", column): f"UPDATE images SET {column} = {value} FROM {_FROM_SERIES} "
            "WHERE se.orthanc_id = images.series"
            for column, value in (("modality", "se.modality"), ("series_uid", "se.series_uid"),
                                  ("study_uid", "s.study_uid"), ("patient_id", "p.patient_id"))}
LEVELS = ("patients", "studies", "series", "images")


def _counter_statements() -> list[str]:
    """The ``counters`` table, filled from the rows present, and the triggers that keep it:
    one row per level and one per image status (``status:<status>``)."""
    statements = ["CREATE TABLE counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
                  "INSERT INTO counters SELECT 'status:' || status, count(*) FROM images GROUP BY status"]
    add_status = ("INSERT INTO counters VALUES ('status:' || new.status, 1) "
                  "ON CONFLICT(name) DO UPDATE SET n = n + 1;")
    for table in LEVELS:
        added, removed = (add_status, "'status:' || old.status") if table == "images" else ("", "")
        statements += [
            f"INSERT INTO counters SELECT '{table}', count(*) FROM {table}",
            f"""CREATE TRIGGER {table}_added AFTER INSERT ON {table} BEGIN
                UPDATE counters SET n = n + 1 WHERE name = '{table}'; {added} END""",
            f"""CREATE TRIGGER {table}_removed AFTER DELETE ON {table} BEGIN
                UPDATE counters SET n = n - 1 WHERE name IN ('{table}', {removed or "''"}); END""",
        ]
    statements.append(f"""CREATE TRIGGER images_status AFTER UPDATE OF status ON images
        WHEN old.status IS NOT new.status BEGIN
            UPDATE counters SET n = n - 1 WHERE name = 'status:' || old.status; {add_status} END""")
    return statements


# The number of flagged images (added after the others: an older index gains it on opening).
_FLAGGED_COUNTER = [
    "INSERT INTO counters SELECT 'flagged', count(*) FROM images WHERE flagged = 1",
    """CREATE TRIGGER images_flagged_added AFTER INSERT ON images WHEN new.flagged IS 1 BEGIN
        UPDATE counters SET n = n + 1 WHERE name = 'flagged'; END""",
    """CREATE TRIGGER images_flagged_removed AFTER DELETE ON images WHEN old.flagged IS 1 BEGIN
        UPDATE counters SET n = n - 1 WHERE name = 'flagged'; END""",
    """CREATE TRIGGER images_flagged_changed AFTER UPDATE OF flagged ON images
        WHEN (old.flagged IS 1) IS NOT (new.flagged IS 1) BEGIN
            UPDATE counters SET n = n + (new.flagged IS 1) - (old.flagged IS 1)
            WHERE name = 'flagged'; END""",
]


def _add_counters(db: sqlite3.Connection) -> None:
    """Create the counters in one transaction with the count they start from, unless another
    connection did first."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'counters'").fetchone():
            for statement in _counter_statements():
                db.execute(statement)
        if not db.execute("SELECT 1 FROM counters WHERE name = 'flagged'").fetchone():
            for statement in _FLAGGED_COUNTER:
                db.execute(statement)
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema, adding the columns that an index made by an older version lacks
    (columns are only ever added), so an upgrade keeps the existing rows."""
    tables = [part for part in SCHEMA.split(";") if "CREATE TABLE" in part]
    fresh = sqlite3.connect(":memory:")
    for statement in tables:
        db.execute(statement)
        fresh.execute(statement)
    for table in LEVELS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for _, name, kind, _, default, _ in fresh.execute(f"PRAGMA table_info({table})"):
            if name not in present:
                suffix = f" DEFAULT {default}" if default is not None else ""
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}{suffix}")
                if (table, name) in BACKFILL:
                    db.execute(BACKFILL[table, name])
    fresh.close()
    for name in OBSOLETE_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS {name}")
    db.executescript(SCHEMA)  # the indexes and triggers (the tables exist now)
    db.executescript(REVIEWS_SCHEMA)
    _item_triggers(db)
    _add_counters(db)


def _item_triggers(db: sqlite3.Connection) -> None:
    """Create the triggers that keep ``item``; where an older version's differ (its answer had
    fewer keys), replace them and rewrite every item."""
    statements = _item_statements()
    names = [re.search(r"TRIGGER IF NOT EXISTS (\w+)", s).group(1) for s in statements]
    found = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name IN "
                            f"({', '.join('?' * len(names))})", names).fetchall())
    stale = [name for name, statement in zip(names, statements)
             if name in found and found[name] != statement.replace("IF NOT EXISTS ", "")]
    for name in stale:
        db.execute(f"DROP TRIGGER {name}")
    for statement in statements:
        db.execute(statement)
    if stale:
        db.execute(BACKFILL["images", "item"])
        db.commit()  # the UPDATE opened a transaction; the counters start one of their own


# Image statuses: what the worker concluded about an instance.
RENDERED = "rendered"
NO_PIXEL_DATA = "no_pixel_data"
RENDER_FAILED = "render_failed"
UNREADABLE = "unreadable"
WRITE_FAILED = "write_failed"  # rendered, but the PNG could not be written (retried)
STATUSES = (RENDERED, NO_PIXEL_DATA, RENDER_FAILED, UNREADABLE, WRITE_FAILED)

BOOLEAN, REAL = "boolean", "real"  # the kinds of column that JSON shows otherwise than SQLite
# Each level's answer: (JSON key, SQL expression[, kind]) in the order the keys are shown.
_PATIENT = (("OrthancID", "p.orthanc_id"), ("PatientID", "p.patient_id"),
            ("PatientName", "p.patient_name"), ("PatientBirthDate", "p.birth_date"),
            ("PatientSex", "p.sex"))
_STUDY = (("OrthancID", "s.orthanc_id"), ("StudyInstanceUID", "s.study_uid"),
          ("PatientID", "p.patient_id"), ("StudyDate", "s.study_date"),
          ("StudyDescription", "s.description"), ("AccessionNumber", "s.accession_number"))
_SERIES = (("OrthancID", "se.orthanc_id"), ("SeriesInstanceUID", "se.series_uid"),
           ("StudyInstanceUID", "s.study_uid"), ("PatientID", "p.patient_id"),
           ("Modality", "se.modality"), ("SeriesNumber", "se.series_number"),
           ("SeriesDescription", "se.description"))
_IMAGE = (("OrthancID", "i.orthanc_id"), ("SOPInstanceUID", "i.sop_uid"),
          ("SeriesInstanceUID", "i.series_uid"), ("StudyInstanceUID", "i.study_uid"),
          ("PatientID", "i.patient_id"), ("SOPClassUID", "i.sop_class_uid"),
          ("InstanceNumber", "i.instance_number"), ("TransferSyntaxUID", "i.transfer_syntax"),
          ("Status", "i.status"), ("StatusDetail", "i.status_detail"), ("Png", "i.png"),
          ("Rows", "i.rows"), ("Columns", "i.columns"), ("NumberOfFrames", "i.frames"),
          ("RenderedFrame", "i.rendered_frame"), ("PhotometricInterpretation", "i.photometric"),
          ("RescaleSlope", "i.rescale_slope", REAL),
          ("RescaleIntercept", "i.rescale_intercept", REAL),
          ("WindowCenter", "i.window_center", REAL), ("WindowWidth", "i.window_width", REAL),
          ("WindowSource", "i.window_source"), ("VOILUTFunction", "i.voi_function"),
          ("Inverted", "i.inverted", BOOLEAN), ("Decoder", "i.decoder"),
          ("Modality", "i.modality"), ("AnomalyScore", "i.anomaly_score", REAL),
          ("Flagged", "i.flagged", BOOLEAN), ("AnomalyReason", "i.anomaly_reason"),
          ("ModelVersion", "i.model_version"),
          ("Threshold", "i.threshold", REAL), ("ScoredAt", "i.scored_at"),
          ("IndexedAt", "i.indexed_at"))


def _json_value(sql: str, kind: str = "", postgresql: bool = False) -> str:
    """A column as a JSON value that reads back as the value stored: SQLite has no booleans,
    and writes a REAL with 15 significant digits, too few to read back the same float (17 are
    enough, and ``json()`` makes the text a number); PostgreSQL's doubles are already written
    so. JSON has no infinity: it becomes null."""
    if kind == BOOLEAN:
        if postgresql:  # the column is an INTEGER there too
            return f"CASE WHEN {sql} <> 0 THEN true WHEN {sql} = 0 THEN false END"
        return f"json(CASE WHEN {sql} THEN 'true' WHEN NOT {sql} THEN 'false' END)"
    if kind == REAL:
        if postgresql:
            return f"CASE WHEN abs({sql}) < CAST('Infinity' AS double precision) THEN {sql} END"
        return (f"CASE WHEN abs({sql}) <= 1.7976931348623157e308 "
                f"THEN json(printf('%!.17g', {sql})) END")
    return sql


def _json_object(columns: tuple[tuple[str, ...], ...], postgresql: bool = False) -> str:
    """The SQL expression of a row as one JSON object, its keys in the order of ``columns``."""
    values = ", ".join(f"'{key}', {_json_value(sql, *kind, postgresql=postgresql)}"
                       for key, sql, *kind in columns)
    return f"{'json_build_object' if postgresql else 'json_object'}({values})"


def _image_json(row: str) -> str:
    """An image's JSON answer written from the columns of ``row`` (``new`` in a trigger)."""
    return re.sub(r"\bi\.", f"{row}.", _json_object(_IMAGE))


def _item_statements() -> list[str]:
    """The triggers that write each image row's JSON answer into its ``item`` column whenever
    the row is written: a page of images then reads rows, not 31 columns turned into JSON
    (half the SQLite time of a page, measured at 100,000 images)."""
    return [f"""CREATE TRIGGER IF NOT EXISTS images_item_{event.lower()}
        AFTER {event} ON images {when} BEGIN
            UPDATE images SET item = {_image_json("new")} WHERE rowid = new.rowid; END"""
            for event, when in (("INSERT", ""), ("UPDATE", "WHEN new.item IS old.item"))]


BACKFILL["images", "item"] = f"UPDATE images SET item = {_image_json('images')}"


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: how to select, list and look it up."""

    columns: str  # one JSON object per row (SQLite's; see _json_object)
    source: str
    uid: str  # the DICOM identifier column
    order: str  # an index yields it (see SCHEMA)
    table: str  # the level's own table and alias, which page filters may name alone
    fields: tuple = ()  # the (key, SQL[, kind]) of ``columns``, for another dialect's JSON

    @property
    def name(self) -> str:
        return self.table.split()[0]

    @property
    def alias(self) -> str:
        return self.table.split()[1]


PATIENTS = Level(_json_object(_PATIENT), "patients p", "p.patient_id", "p.patient_id, p.orthanc_id",
                 "patients p", _PATIENT)
STUDIES = Level(_json_object(_STUDY), _FROM_STUDY, "s.study_uid",
                "s.study_date, s.study_uid, s.orthanc_id", "studies s", _STUDY)
SERIES = Level(_json_object(_SERIES), _FROM_SERIES, "se.series_uid",
               "se.series_number, se.series_uid, se.orthanc_id", "series se", _SERIES)
IMAGES = Level("i.item", "images i", "i.sop_uid",
               "i.instance_number, i.sop_uid, i.orthanc_id", "images i")
FLAGGED = Level("i.item", "images i", "i.sop_uid", "i.anomaly_score DESC, i.orthanc_id",
                "images i")

# Filters of flagged images by a parent's identifier or the modality, naming ``i`` alone (see
# Index.page); the parents' series are found first, then their images by index.
ANOMALY_FILTERS = {
    "patient": """i.series IN (SELECT se.orthanc_id FROM series se
        JOIN studies s ON s.orthanc_id = se.study JOIN patients p ON p.orthanc_id = s.patient
        WHERE p.patient_id = ?)""",
    "study": """i.series IN (SELECT se.orthanc_id FROM series se
        JOIN studies s ON s.orthanc_id = se.study WHERE s.study_uid = ?)""",
    "series": "i.series IN (SELECT se.orthanc_id FROM series se WHERE se.series_uid = ?)",
    "modality": "i.modality = ?",
    # A reason or its family: "broken_render" finds "broken_render:noise" (routes check the value
    # against minipacs.reasons first, so it holds no GLOB wildcard).
    "reason": "i.anomaly_reason || ':' GLOB ? || ':*'",
}


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the worker writes for one instance, from the top of the hierarchy down."""

    patient: dict[str, Any]  # orthanc_id, patient_id, patient_name, birth_date, sex
    study: dict[str, Any]  # orthanc_id, study_uid, study_date, description, accession_number
    series: dict[str, Any]  # orthanc_id, series_uid, modality, series_number, description
    image: dict[str, Any]  # orthanc_id, sop_uid, status, ... (the images columns)
    computed_id: str | None = None  # the instance's Orthanc ID as computed from its identifiers


def _upsert(table: str, row: dict[str, Any]) -> str:
    """Insert or update a row (the same statement in both dialects); an image's ``writes``
    counts the times it was written."""
    names = ", ".join(row)
    marks = ", ".join(f":{k}" for k in row)
    updates = [f"{k} = excluded.{k}" for k in row if k != "orthanc_id"]
    if table == "images":
        updates.append("writes = images.writes + 1")
    return (f"INSERT INTO {table} ({names}) VALUES ({marks}) "
            f"ON CONFLICT(orthanc_id) DO UPDATE SET {', '.join(updates)}")


class Index:
    """The index file; safe to share between threads (one connection per thread, one writer
    at a time). :class:`minipacs.index_pg.PostgresIndex` is the same index on PostgreSQL: the
    queries below are written for both, and what the dialects force differs in the attributes
    and methods that one overrides."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)  #: what a failed query raises
    anomaly_filters = ANOMALY_FILTERS
    now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"  #: the time, as the rows record it
    key = "rowid"  #: the column a page's rows are found by

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Keyed by OS thread, not threading.local: Orthanc's Python plugin runs each REST
        # callback in a fresh Python thread state, which would open a connection per request.
        self._connections: dict[int, sqlite3.Connection] = {}
        self._write_lock = threading.Lock()
        with self._writing() as db:
            db.execute("PRAGMA journal_mode = WAL")
            _migrate(db)

    def _connection(self) -> sqlite3.Connection:
        db = self._connections.get(threading.get_ident())
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = NORMAL")
            # Temporary tables and sorts in memory: no temporary files in /tmp, which a
            # read-only container (the Docker image runs so) does not have.
            db.execute("PRAGMA temp_store = MEMORY")
            self._connections[threading.get_ident()] = db
        return db

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction of this process at a time. SQLite lets one writer in and makes
        the others sleep in its busy handler, 1 to 100 ms between tries; the index's own threads
        (two ingest workers, rescoring, deletions) wait on a lock instead, and so start as soon
        as the writer before them commits."""
        with self._write_lock, self._connection() as db:
            yield db

    def close(self) -> None:
        """Close the calling thread's connection."""
        db = self._connections.pop(threading.get_ident(), None)
        if db is not None:
            db.close()

    # Writing -------------------------------------------------------------------------------

    def put(self, record: InstanceRecord) -> None:
        """Insert or replace one instance and its parents, in one transaction."""
        self.put_many([record])

    def put_many(self, records: Sequence[InstanceRecord], keep: Callable[[InstanceRecord], bool] | None = None,
                 done: Sequence[str] = ()) -> list[InstanceRecord]:
        """Insert or replace instances and their parents, all in one transaction: a worker's
        batch of 16 costs 0.075 ms per instance instead of 0.2 with a commit each. ``keep`` is
        asked under the writer's lock, which deletions take too (a record of a resource deleted
        meanwhile is left out); the claims of ``done`` are released in the same transaction.
        Returns the records written."""
        with self._writing() as db:
            owned = self._finish_claims(db, done)
            kept = [record for record in records if (keep is None or keep(record)) and (
                owned is None or record.image["orthanc_id"] in owned)]
            for record in kept:
                study = dict(record.study, patient=record.patient["orthanc_id"])
                series = dict(record.series, study=record.study["orthanc_id"])
                image = dict(record.image, series=record.series["orthanc_id"],
                             modality=record.series.get("modality"),
                             series_uid=record.series["series_uid"],
                             study_uid=record.study["study_uid"], patient_id=record.patient["patient_id"])
                db.execute(_upsert("patients", record.patient), record.patient)
                db.execute(_upsert("studies", study), study)
                db.execute(_upsert("series", series), series)
                db.execute(_upsert("images", image), image)
        return kept

    def _finish_claims(self, db, done: Sequence[str]) -> set[str] | None:
        """Release the claims of ``done``; return the instances whose rows this process may
        write, or None for all (one node: they are all its own)."""
        db.executemany("DELETE FROM claims WHERE orthanc_id = ?", [(i,) for i in done])
        return None

    def claim(self, orthanc_ids: Sequence[str]) -> None:
        """Count an attempt at each instance before it is rendered (see ``claims``)."""
        with self._writing() as db:
            db.executemany("""INSERT INTO claims(orthanc_id, attempts) VALUES (?, 1)
                ON CONFLICT(orthanc_id) DO UPDATE SET attempts = attempts + 1,
                claimed_at = excluded.claimed_at""", [(i,) for i in orthanc_ids])

    def release(self, orthanc_ids: Sequence[str]) -> None:
        """Forget the claims of instances that need no row (deleted from Orthanc meanwhile)."""
        with self._writing() as db:
            db.executemany("DELETE FROM claims WHERE orthanc_id = ?", [(i,) for i in orthanc_ids])

    def claims(self, orthanc_ids: Sequence[str] | None = None) -> dict[str, int]:
        """The attempts at each instance claimed and never written (of ``orthanc_ids``)."""
        if orthanc_ids is None:
            return dict(self._connection().execute("SELECT orthanc_id, attempts FROM claims"))
        marks = ",".join("?" * len(orthanc_ids))
        return dict(self._connection().execute(
            f"SELECT orthanc_id, attempts FROM claims WHERE orthanc_id IN ({marks})", tuple(orthanc_ids)))

    # Reading -------------------------------------------------------------------------------

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        cursor = self._connection().execute(sql, args)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def _scalar(self, sql: str, args: tuple = ()) -> Any:
        return self._connection().execute(sql, args).fetchone()[0]

    def _object(self, sql: str, args: tuple) -> dict[str, Any] | None:
        """The first row of a query of one JSON object (a level's ``columns``), as a dict."""
        row = self._connection().execute(sql, args).fetchone()
        return None if row is None else json.loads(row[0])

    def get(self, level: Level, uid: str) -> dict[str, Any] | None:
        """The resource whose DICOM identifier is ``uid`` (the first, should several share it)."""
        return self._object(f"SELECT {self.columns(level)} FROM {level.source} WHERE {level.uid} = ? "
                            f"ORDER BY {self.order(level)} LIMIT 1", (uid,))

    def image_by_orthanc_id(self, orthanc_id: str) -> dict[str, Any] | None:
        return self._object(f"SELECT {self.columns(IMAGES)} FROM {IMAGES.source} WHERE i.orthanc_id = ?",
                            (orthanc_id,))

    def image_info(self, orthanc_id: str) -> dict[str, Any] | None:
        """The predecessor's ``/imageinfo`` answer: what a PNG shows and how it was made."""
        rows = self._all(
            f"""SELECT i.instance_number AS "InstanceNumber", p.patient_id AS "PatientID",
                i.rescale_intercept AS "RescaleIntercept", i.rescale_slope AS "RescaleSlope",
                se.description AS "SeriesDescription", s.description AS "StudyDescription",
                i.window_center AS "WindowCenter", i.window_width AS "WindowWidth"
            FROM {_FROM_IMAGE} WHERE i.orthanc_id = ?""", (orthanc_id,))
        return rows[0] if rows else None

    def page_json(self, level: Level, limit: int, offset: int, where: str = "", args: tuple = (),
                  total: int | None = None) -> tuple[str, int]:
        """One page of a level as the text of a JSON array, written by SQLite (so a route
        sends it as it is), optionally filtered by ``where`` on the level's own table, and the
        total count (``total`` where the caller has it from the counters).

        The page is chosen on the level's table alone, so the rows skipped by the offset cost
        an index entry each, not a join with every parent."""
        clause = f"WHERE {where}" if where else ""
        if total is None:
            total = (self._scalar(f"SELECT count(*) FROM {level.table} {clause}", args) if where
                     else self.counts()[level.name])
        keys = (f"SELECT {level.alias}.{self.key} AS k FROM {level.table} {clause} "
                f"ORDER BY {self.order(level)} LIMIT ? OFFSET ?")
        rows = self._connection().execute(
            f"SELECT {self.columns(level)} FROM ({keys}) page CROSS JOIN {level.source} "
            f"WHERE {level.alias}.{self.key} = page.k ORDER BY {self.order(level)}", args + (limit, offset))
        return "[" + ",".join(item for item, in rows) + "]", total

    def page(self, level: Level, limit: int, offset: int, where: str = "", args: tuple = (),
             total: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """:meth:`page_json` as dicts."""
        items, total = self.page_json(level, limit, offset, where, args, total)
        return json.loads(items), total

    def columns(self, level: Level) -> str:
        """The SQL of a level's rows as JSON text."""
        return level.columns

    def order(self, level: Level) -> str:
        """A level's ORDER BY (SQLite sorts NULL first)."""
        return level.order

    # A counter may be kept in several rows (PostgreSQL: one per connection), hence the sums.
    def counts(self) -> dict[str, int]:
        found = dict(self._connection().execute(
            "SELECT name, sum(n) FROM counters WHERE name IN ('patients', 'studies', 'series', "
            "'images') GROUP BY name"))
        return {level: found.get(level, 0) for level in LEVELS}

    def patient_counts(self, patient_orthanc_id: str) -> dict[str, int]:
        row = self._connection().execute(
            """SELECT (SELECT count(*) FROM studies WHERE patient = :p),
                (SELECT count(*) FROM series se JOIN studies s ON s.orthanc_id = se.study
                 WHERE s.patient = :p),
                (SELECT count(*) FROM images i JOIN series se ON se.orthanc_id = i.series
                 JOIN studies s ON s.orthanc_id = se.study WHERE s.patient = :p)""",
            {"p": patient_orthanc_id}).fetchone()
        return dict(zip(("studies", "series", "images"), row))

    def flagged_count(self) -> int:
        return self._scalar("SELECT coalesce(sum(n), 0) FROM counters WHERE name = 'flagged'")

    def status_counts(self) -> dict[str, int]:
        rows = self._connection().execute(
            "SELECT substr(name, 8), sum(n) FROM counters WHERE name LIKE 'status:%' "
            "GROUP BY name HAVING sum(n) > 0")
        return {status: n for status, n in rows}

    def summary(self, where: str, args: tuple) -> dict[str, Any]:
        """Images, rendered, scored and flagged images and the highest score, under a filter
        on the joined images/series (e.g. ``se.study = ?``)."""
        row = self._connection().execute(
            f"""SELECT count(*), count(CASE WHEN i.status = 'rendered' THEN 1 END),
                count(i.anomaly_score), coalesce(sum(i.flagged), 0), max(i.anomaly_score)
            FROM images i JOIN series se ON se.orthanc_id = i.series WHERE {where}""",
            args).fetchone()
        return dict(zip(("images", "rendered", "scored", "flagged", "max_score"), row))

    def unscored_by(self, version: str) -> dict[str, int]:
        """Images scored by another model version than ``version`` (Stale), and rendered images
        with no score at all (Unscored): what a rescore would change."""
        row = self._connection().execute(
            """SELECT (SELECT count(*) FROM images WHERE model_version < ? OR model_version > ?),
                      (SELECT count(*) FROM images WHERE model_version IS NULL AND status = 'rendered')""",
            (version, version)).fetchone()
        return {"Stale": row[0], "Unscored": row[1]}

    def set_scores(self, scores: list[dict[str, Any]]) -> None:
        """Replace the scores of rendered images (``orthanc_id`` + the score columns)."""
        with self._writing() as db:
            db.executemany(
                f"""UPDATE images SET anomaly_score = :anomaly_score, flagged = :flagged,
                       anomaly_reason = :anomaly_reason,
                       model_version = :model_version, threshold = :threshold,
                       scored_at = {self.now}
                   WHERE orthanc_id = :orthanc_id""", scores)

    def rendered_images(self, after: str = "", limit: int = 500) -> list[tuple[str, str, str, bool]]:
        """(orthanc_id, png, study orthanc_id, flagged now) of rendered images, in ID order after
        ``after``."""
        # "status || ''": walk the primary key in order; the status index would sort every image.
        rows = self._connection().execute(
            """SELECT i.orthanc_id, i.png, se.study, coalesce(i.flagged, 0) = 1 FROM images i
               JOIN series se ON se.orthanc_id = i.series
               WHERE i.status || '' = 'rendered' AND i.orthanc_id > ? ORDER BY i.orthanc_id
               LIMIT ?""",
            (after, limit)).fetchall()
        return [(orthanc_id, png, study, bool(flagged)) for orthanc_id, png, study, flagged in rows]

    def delete(self, table: str, orthanc_id: str) -> list[str]:
        """Remove a resource, everything under it and the parents it leaves empty (as Orthanc
        does); return the PNG file names of the images removed."""
        if table not in ("patients", "studies", "series", "images"):
            raise ValueError(f"no such level: {table}")
        with self._writing() as db:
            return self._delete(db, table, orthanc_id)

    def _delete(self, db, table: str, orthanc_id: str) -> list[str]:
        """:meth:`delete` in the transaction of ``db``; an instance's claim goes with it."""
        under = {"patients": "p.orthanc_id", "studies": "s.orthanc_id",
                 "series": "se.orthanc_id", "images": "i.orthanc_id"}[table]
        pngs = [row[0] for row in db.execute(
            f"SELECT i.png FROM {_FROM_IMAGE} WHERE {under} = ? AND i.png IS NOT NULL",
            (orthanc_id,))]
        ancestors = self._ancestors(table, orthanc_id)
        db.execute(f"DELETE FROM {table} WHERE orthanc_id = ?", (orthanc_id,))
        if table == "images":  # its claim, and the study's KOS record if it was that KOS
            db.execute("DELETE FROM claims WHERE orthanc_id = ?", (orthanc_id,))
            db.execute("DELETE FROM key_objects WHERE instance = ?", (orthanc_id,))
        for parent, child, column, parent_id in ancestors:  # only these can become empty
            db.execute(f"DELETE FROM {parent} WHERE orthanc_id = ? AND NOT EXISTS "
                       f"(SELECT 1 FROM {child} WHERE {column} = ?)", (parent_id, parent_id))
        return pngs

    def study_of(self, table: str, orthanc_id: str) -> str | None:
        """The Orthanc ID of the study holding a series or an image, if indexed."""
        return next((parent_id for parent, _, _, parent_id in self._ancestors(table, orthanc_id)
                     if parent == "studies"), None)

    def study_flagged(self, study_orthanc_id: str) -> bool | None:
        """Whether an image of the study is flagged; None when the study is not indexed."""
        row = self._connection().execute(
            """SELECT (SELECT 1 FROM studies WHERE orthanc_id = :s), EXISTS (SELECT 1 FROM images i
                 JOIN series se ON se.orthanc_id = i.series WHERE se.study = :s AND i.flagged = 1)""",
            {"s": study_orthanc_id}).fetchone()
        return None if row[0] is None else bool(row[1])

    def _ancestors(self, table: str, orthanc_id: str) -> list[tuple[str, str, str, str]]:
        """(parent table, child table, child column naming the parent, parent ID) of each
        level above a resource, nearest first."""
        found, level, current = [], table, orthanc_id
        for parent, child, column in (("series", "images", "series"), ("studies", "series", "study"),
                                      ("patients", "studies", "patient")):
            if child == level:
                row = self._connection().execute(
                    f"SELECT {column} FROM {child} WHERE orthanc_id = ?", (current,)).fetchone()
                if row is None:
                    break
                found.append((parent, child, column, row[0]))
                level, current = parent, row[0]
        return found

    def orthanc_instance_ids(self, status: str | None = None) -> set[str]:
        """The instances indexed (with that status)."""
        if status is None:
            return {row[0] for row in self._connection().execute("SELECT orthanc_id FROM images")}
        return {row[0] for row in self._connection().execute(
            "SELECT orthanc_id FROM images WHERE status = ?", (status,))}

    def queued(self) -> set[str]:
        """The instances waiting in a shared queue (none: one node's queue is in memory)."""
        return set()

    def png_names(self) -> set[str]:
        """The PNG files the index refers to."""
        return {row[0] for row in self._connection().execute(
            "SELECT png FROM images WHERE png IS NOT NULL")}
