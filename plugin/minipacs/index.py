"""The SQLite index: Patient → Study → Series → Image, with rendering parameters and status.

Rows are keyed by Orthanc's own IDs (so counts equal Orthanc's ``/statistics`` and a re-sent
instance replaces its row); the DICOM identifiers are indexed for lookups. One writer (the
ingest worker) and many readers (HTTP threads) share the file through WAL mode, each thread with
its own connection. Queries return dicts whose keys are DICOM keywords where the value is a
DICOM attribute, so JSON answers read like the standard.
"""

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    orthanc_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    patient_name TEXT,
    birth_date TEXT,
    sex TEXT
);
CREATE INDEX IF NOT EXISTS patients_by_patient_id ON patients(patient_id);

CREATE TABLE IF NOT EXISTS studies (
    orthanc_id TEXT PRIMARY KEY,
    patient TEXT NOT NULL REFERENCES patients(orthanc_id) ON DELETE CASCADE,
    study_uid TEXT NOT NULL,
    study_date TEXT,
    description TEXT,
    accession_number TEXT
);
CREATE INDEX IF NOT EXISTS studies_by_patient ON studies(patient);
CREATE INDEX IF NOT EXISTS studies_by_uid ON studies(study_uid);

CREATE TABLE IF NOT EXISTS series (
    orthanc_id TEXT PRIMARY KEY,
    study TEXT NOT NULL REFERENCES studies(orthanc_id) ON DELETE CASCADE,
    series_uid TEXT NOT NULL,
    modality TEXT,
    series_number INTEGER,
    description TEXT
);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study);
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
    model_version TEXT,
    threshold REAL,
    scored_at TEXT,
    indexed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS images_by_series ON images(series);
CREATE INDEX IF NOT EXISTS images_by_uid ON images(sop_uid);
CREATE INDEX IF NOT EXISTS images_by_status ON images(status);
CREATE INDEX IF NOT EXISTS images_flagged ON images(flagged, anomaly_score);
"""

def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema, adding the columns that an index made by an older version lacks
    (columns are only ever added), so an upgrade keeps the existing rows."""
    tables = [part for part in SCHEMA.split(";") if "CREATE TABLE" in part]
    fresh = sqlite3.connect(":memory:")
    for statement in tables:
        db.execute(statement)
        fresh.execute(statement)
    for table in ("patients", "studies", "series", "images"):
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for _, name, kind, _, default, _ in fresh.execute(f"PRAGMA table_info({table})"):
            if name not in present:
                suffix = f" DEFAULT {default}" if default is not None else ""
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}{suffix}")
    fresh.close()
    db.executescript(SCHEMA)  # the indexes (the tables exist now)


# Image statuses: what the worker concluded about an instance.
RENDERED = "rendered"
NO_PIXEL_DATA = "no_pixel_data"
RENDER_FAILED = "render_failed"
UNREADABLE = "unreadable"
STATUSES = (RENDERED, NO_PIXEL_DATA, RENDER_FAILED, UNREADABLE)

_PATIENT = """p.orthanc_id AS OrthancID, p.patient_id AS PatientID, p.patient_name AS PatientName,
    p.birth_date AS PatientBirthDate, p.sex AS PatientSex"""
_STUDY = """s.orthanc_id AS OrthancID, s.study_uid AS StudyInstanceUID, p.patient_id AS PatientID,
    s.study_date AS StudyDate, s.description AS StudyDescription,
    s.accession_number AS AccessionNumber"""
_SERIES = """se.orthanc_id AS OrthancID, se.series_uid AS SeriesInstanceUID,
    s.study_uid AS StudyInstanceUID, p.patient_id AS PatientID, se.modality AS Modality,
    se.series_number AS SeriesNumber, se.description AS SeriesDescription"""
_IMAGE = """i.orthanc_id AS OrthancID, i.sop_uid AS SOPInstanceUID, se.series_uid AS SeriesInstanceUID,
    s.study_uid AS StudyInstanceUID, p.patient_id AS PatientID, i.sop_class_uid AS SOPClassUID,
    i.instance_number AS InstanceNumber, i.transfer_syntax AS TransferSyntaxUID,
    i.status AS Status, i.status_detail AS StatusDetail, i.png AS Png, i.rows AS Rows,
    i.columns AS Columns, i.frames AS NumberOfFrames, i.rendered_frame AS RenderedFrame,
    i.photometric AS PhotometricInterpretation, i.rescale_slope AS RescaleSlope,
    i.rescale_intercept AS RescaleIntercept, i.window_center AS WindowCenter,
    i.window_width AS WindowWidth, i.window_source AS WindowSource,
    i.voi_function AS VOILUTFunction, i.inverted AS Inverted, i.decoder AS Decoder,
    se.modality AS Modality, i.anomaly_score AS AnomalyScore, i.flagged AS Flagged,
    i.model_version AS ModelVersion, i.threshold AS Threshold, i.scored_at AS ScoredAt,
    i.indexed_at AS IndexedAt"""
_FROM_IMAGE = """images i JOIN series se ON se.orthanc_id = i.series
    JOIN studies s ON s.orthanc_id = se.study JOIN patients p ON p.orthanc_id = s.patient"""
_FROM_SERIES = """series se JOIN studies s ON s.orthanc_id = se.study
    JOIN patients p ON p.orthanc_id = s.patient"""
_FROM_STUDY = "studies s JOIN patients p ON p.orthanc_id = s.patient"


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: how to select, list and look it up."""

    columns: str
    source: str
    uid: str  # the DICOM identifier column
    order: str


PATIENTS = Level(_PATIENT, "patients p", "p.patient_id", "p.patient_id, p.orthanc_id")
STUDIES = Level(_STUDY, _FROM_STUDY, "s.study_uid", "s.study_date, s.study_uid, s.orthanc_id")
SERIES = Level(_SERIES, _FROM_SERIES, "se.series_uid", "se.series_number, se.series_uid, se.orthanc_id")
IMAGES = Level(_IMAGE, _FROM_IMAGE, "i.sop_uid", "i.instance_number, i.sop_uid, i.orthanc_id")
FLAGGED = Level(_IMAGE, _FROM_IMAGE, "i.sop_uid", "i.anomaly_score DESC, i.orthanc_id")


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the worker writes for one instance, from the top of the hierarchy down."""

    patient: dict[str, Any]  # orthanc_id, patient_id, patient_name, birth_date, sex
    study: dict[str, Any]  # orthanc_id, study_uid, study_date, description, accession_number
    series: dict[str, Any]  # orthanc_id, series_uid, modality, series_number, description
    image: dict[str, Any]  # orthanc_id, sop_uid, status, ... (the images columns)


def _upsert(table: str, row: dict[str, Any]) -> str:
    names = ", ".join(row)
    marks = ", ".join(f":{k}" for k in row)
    updates = ", ".join(f"{k} = excluded.{k}" for k in row if k != "orthanc_id")
    return (f"INSERT INTO {table} ({names}) VALUES ({marks}) "
            f"ON CONFLICT(orthanc_id) DO UPDATE SET {updates}")


class Index:
    """The index file; safe to share between threads (one connection per thread)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.execute("PRAGMA journal_mode = WAL")
            _migrate(db)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = NORMAL")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # Writing -------------------------------------------------------------------------------

    def put(self, record: InstanceRecord) -> None:
        """Insert or replace one instance and its parents, in one transaction."""
        study = dict(record.study, patient=record.patient["orthanc_id"])
        series = dict(record.series, study=record.study["orthanc_id"])
        image = dict(record.image, series=record.series["orthanc_id"])
        with self._connection() as db:
            db.execute(_upsert("patients", record.patient), record.patient)
            db.execute(_upsert("studies", study), study)
            db.execute(_upsert("series", series), series)
            db.execute(_upsert("images", image), image)

    # Reading -------------------------------------------------------------------------------

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        rows = [dict(row) for row in self._connection().execute(sql, args)]
        for row in rows:  # SQLite has no booleans
            for key in ("Inverted", "Flagged"):
                if row.get(key) is not None:
                    row[key] = bool(row[key])
        return rows

    def _scalar(self, sql: str, args: tuple = ()) -> Any:
        return self._connection().execute(sql, args).fetchone()[0]

    def get(self, level: Level, uid: str) -> dict[str, Any] | None:
        """The resource whose DICOM identifier is ``uid`` (the first, should several share it)."""
        rows = self._all(f"SELECT {level.columns} FROM {level.source} WHERE {level.uid} = ? "
                         f"ORDER BY {level.order} LIMIT 1", (uid,))
        return rows[0] if rows else None

    def image_by_orthanc_id(self, orthanc_id: str) -> dict[str, Any] | None:
        rows = self._all(f"SELECT {IMAGES.columns} FROM {IMAGES.source} WHERE i.orthanc_id = ?",
                         (orthanc_id,))
        return rows[0] if rows else None

    def image_info(self, orthanc_id: str) -> dict[str, Any] | None:
        """The predecessor's ``/imageinfo`` answer: what a PNG shows and how it was made."""
        rows = self._all(
            f"""SELECT i.instance_number AS InstanceNumber, p.patient_id AS PatientID,
                i.rescale_intercept AS RescaleIntercept, i.rescale_slope AS RescaleSlope,
                se.description AS SeriesDescription, s.description AS StudyDescription,
                i.window_center AS WindowCenter, i.window_width AS WindowWidth
            FROM {IMAGES.source} WHERE i.orthanc_id = ?""", (orthanc_id,))
        return rows[0] if rows else None

    def page(self, level: Level, limit: int, offset: int, where: str = "",
             args: tuple = ()) -> tuple[list[dict[str, Any]], int]:
        """One page of a level (optionally filtered by ``where``) and the total count."""
        clause = f"WHERE {where}" if where else ""
        total = self._scalar(f"SELECT count(*) FROM {level.source} {clause}", args)
        items = self._all(f"SELECT {level.columns} FROM {level.source} {clause} "
                          f"ORDER BY {level.order} LIMIT ? OFFSET ?", args + (limit, offset))
        return items, total

    def counts(self) -> dict[str, int]:
        row = self._connection().execute(
            """SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),
                      (SELECT count(*) FROM series), (SELECT count(*) FROM images)""").fetchone()
        return dict(zip(("patients", "studies", "series", "images"), row))

    def patient_counts(self, patient_orthanc_id: str) -> dict[str, int]:
        row = self._connection().execute(
            """SELECT count(DISTINCT s.orthanc_id), count(DISTINCT se.orthanc_id), count(i.orthanc_id)
            FROM studies s LEFT JOIN series se ON se.study = s.orthanc_id
            LEFT JOIN images i ON i.series = se.orthanc_id WHERE s.patient = ?""",
            (patient_orthanc_id,)).fetchone()
        return dict(zip(("studies", "series", "images"), row))

    def status_counts(self) -> dict[str, int]:
        rows = self._connection().execute("SELECT status, count(*) FROM images GROUP BY status")
        return {status: n for status, n in rows}

    def summary(self, where: str, args: tuple) -> dict[str, Any]:
        """Images, rendered, scored and flagged images and the highest score, under a filter
        on the joined images/series/studies (e.g. ``se.study = ?``)."""
        row = self._connection().execute(
            f"""SELECT count(*), coalesce(sum(i.status = 'rendered'), 0),
                count(i.anomaly_score), coalesce(sum(i.flagged), 0), max(i.anomaly_score)
            FROM {IMAGES.source} WHERE {where}""", args).fetchone()
        return dict(zip(("images", "rendered", "scored", "flagged", "max_score"), row))

    def set_scores(self, scores: list[dict[str, Any]]) -> None:
        """Replace the scores of rendered images (``orthanc_id`` + the score columns)."""
        with self._connection() as db:
            db.executemany(
                """UPDATE images SET anomaly_score = :anomaly_score, flagged = :flagged,
                       model_version = :model_version, threshold = :threshold,
                       scored_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                   WHERE orthanc_id = :orthanc_id""", scores)

    def rendered_images(self, after: str = "", limit: int = 500) -> list[tuple[str, str, str]]:
        """(orthanc_id, png, study orthanc_id) of rendered images, in ID order after ``after``."""
        return self._connection().execute(
            """SELECT i.orthanc_id, i.png, se.study FROM images i
               JOIN series se ON se.orthanc_id = i.series
               WHERE i.status = 'rendered' AND i.orthanc_id > ? ORDER BY i.orthanc_id LIMIT ?""",
            (after, limit)).fetchall()

    def delete(self, table: str, orthanc_id: str) -> list[str]:
        """Remove a resource, everything under it and the parents it leaves empty (as Orthanc
        does); return the PNG file names of the images removed."""
        if table not in ("patients", "studies", "series", "images"):
            raise ValueError(f"no such level: {table}")
        under = {"patients": "p.orthanc_id", "studies": "s.orthanc_id",
                 "series": "se.orthanc_id", "images": "i.orthanc_id"}[table]
        with self._connection() as db:
            pngs = [row[0] for row in db.execute(
                f"SELECT i.png FROM {IMAGES.source} WHERE {under} = ? AND i.png IS NOT NULL",
                (orthanc_id,))]
            db.execute(f"DELETE FROM {table} WHERE orthanc_id = ?", (orthanc_id,))
            db.execute("DELETE FROM series WHERE orthanc_id NOT IN (SELECT series FROM images)")
            db.execute("DELETE FROM studies WHERE orthanc_id NOT IN (SELECT study FROM series)")
            db.execute("DELETE FROM patients WHERE orthanc_id NOT IN (SELECT patient FROM studies)")
        return pngs

    def orthanc_instance_ids(self) -> set[str]:
        return {row[0] for row in self._connection().execute("SELECT orthanc_id FROM images")}
