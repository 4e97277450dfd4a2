"""The index on PostgreSQL, shared by several Orthanc nodes (``MiniPacs.PostgreSQL``).

The same tables, indexes and queries as :mod:`minipacs.index` (written for both dialects);
what PostgreSQL forces differs here: its placeholders, JSON written by ``json_build_object``,
triggers as functions, counters kept in one row per connection (so that concurrent writers
never wait on one counter row, nor deadlock on two), and claims with a lease, which make the
claims table the cluster's queue of work: an instance is queued once (from Orthanc's change
log, see :mod:`minipacs.cluster`), taken by one node (``FOR UPDATE SKIP LOCKED``), and its
row is written only by the node whose claim it still is. A node that dies leaves claims that
expire after ``lease`` seconds; another node takes them.
"""

import contextlib
import functools
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from . import index as idx

# Times as SQLite writes them, and seconds since the epoch (leases).
FUNCTIONS = """
CREATE OR REPLACE FUNCTION minipacs_now() RETURNS text LANGUAGE sql VOLATILE AS
$$ SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;
CREATE OR REPLACE FUNCTION minipacs_epoch() RETURNS double precision LANGUAGE sql VOLATILE AS
$$ SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision) $$;
"""

# Claims are the queue: a row per instance to render; ``node`` holds it until ``expires``.
CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    orthanc_id TEXT PRIMARY KEY,
    attempts INTEGER NOT NULL DEFAULT 0,  -- renderings started and never written
    claimed_at TEXT,
    node TEXT,  -- the node that holds it; NULL while queued
    expires DOUBLE PRECISION,  -- seconds since the epoch; past it, another node may take it
    queued DOUBLE PRECISION NOT NULL DEFAULT minipacs_epoch()
);
CREATE INDEX IF NOT EXISTS claims_in_order ON claims(queued);
CREATE TABLE IF NOT EXISTS counters (name TEXT, backend INTEGER, n INTEGER NOT NULL,
                                     PRIMARY KEY (name, backend));
-- What the nodes have followed of Orthanc: the last change read from its change log.
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _count(name: str, delta: str) -> str:
    return (f"INSERT INTO counters VALUES ({name}, pg_backend_pid(), {delta}) "
            f"ON CONFLICT (name, backend) DO UPDATE SET n = counters.n + {delta};")


def _triggers() -> str:
    """The counters, the copies of the parents' columns in the images and the images' JSON
    answer, as SQLite's triggers keep them (minipacs.index)."""
    flagged = "(CASE WHEN {row}.flagged = 1 THEN 1 ELSE 0 END)"
    item = re.sub(r"\bi\.", "NEW.", idx._json_object(idx._IMAGE, postgresql=True))
    levels = []
    for table in idx.LEVELS:
        levels.append(f"""
CREATE OR REPLACE FUNCTION minipacs_count_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    IF TG_OP = 'INSERT' THEN {_count(f"'{table}'", "1")}
    ELSE {_count(f"'{table}'", "-1")} END IF; RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER {table}_counted AFTER INSERT OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION minipacs_count_{table}();""")
    added = _count("'status:' || NEW.status", "1") + _count("'flagged'", flagged.format(row="NEW"))
    removed = _count("'status:' || OLD.status", "-1") + _count("'flagged'", "-" + flagged.format(row="OLD"))
    levels.append(f"""
CREATE OR REPLACE FUNCTION minipacs_count_statuses() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    IF TG_OP <> 'INSERT' THEN {removed} END IF;
    IF TG_OP <> 'DELETE' THEN {added} END IF; RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER images_statuses_counted AFTER INSERT OR DELETE ON images
    FOR EACH ROW EXECUTE FUNCTION minipacs_count_statuses();
CREATE OR REPLACE TRIGGER images_statuses_changed AFTER UPDATE ON images FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.flagged IS DISTINCT FROM NEW.flagged)
    EXECUTE FUNCTION minipacs_count_statuses();""")
    copies = [("series", "modality = NEW.modality, series_uid = NEW.series_uid",
               "NEW.modality IS DISTINCT FROM OLD.modality OR NEW.series_uid IS DISTINCT FROM OLD.series_uid",
               "series = NEW.orthanc_id"),
              ("studies", "study_uid = NEW.study_uid", "NEW.study_uid IS DISTINCT FROM OLD.study_uid",
               "series IN (SELECT orthanc_id FROM series WHERE study = NEW.orthanc_id)"),
              ("patients", "patient_id = NEW.patient_id", "NEW.patient_id IS DISTINCT FROM OLD.patient_id",
               """series IN (SELECT se.orthanc_id FROM series se JOIN studies s
                  ON s.orthanc_id = se.study WHERE s.patient = NEW.orthanc_id)""")]
    for table, columns, changed, where in copies:
        levels.append(f"""
CREATE OR REPLACE FUNCTION minipacs_copy_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    IF {changed} THEN UPDATE images SET {columns} WHERE {where}; END IF; RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER {table}_copied AFTER UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION minipacs_copy_{table}();""")
    levels.append(f"""
CREATE OR REPLACE FUNCTION minipacs_item() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    NEW.item := CAST({item} AS text); RETURN NEW; END $$;
CREATE OR REPLACE TRIGGER images_item BEFORE INSERT OR UPDATE ON images
    FOR EACH ROW EXECUTE FUNCTION minipacs_item();""")
    return "\n".join(levels)


def _nulls(columns: str) -> str:
    """An ORDER BY or index's columns sorting NULL as SQLite does: first, last when descending."""
    return ", ".join(f"{term} NULLS LAST" if term.endswith(" DESC") else f"{term} NULLS FIRST"
                     for term in (t.strip() for t in columns.split(",")))


def schema() -> str:
    # Text compared byte by byte, as SQLite does, whatever the database's locale.
    tables = re.sub(r"\bREAL\b", "DOUBLE PRECISION", idx.TABLES + idx.REVIEWS_SCHEMA).replace(
        " TEXT", ' TEXT COLLATE "C"')
    tables = re.sub(r"(CREATE INDEX IF NOT EXISTS \w+\s+ON \w+)\(([^)]*)\)",
                    lambda m: f"{m.group(1)}({_nulls(m.group(2))})", tables)
    tables = tables.replace("DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))", "DEFAULT minipacs_now()")
    return FUNCTIONS + tables + CLAIMS + _triggers()


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """SQLite's placeholders (``?``, ``:name``) as psycopg's (``%s``, ``%(name)s``)."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", sql)


def _integers(args: Any) -> Any:
    """Booleans as the integers SQLite stores them (the columns are INTEGER in both dialects)."""
    if isinstance(args, dict):
        return {k: int(v) if isinstance(v, bool) else v for k, v in args.items()}
    return [int(v) if isinstance(v, bool) else v for v in args]


class _Connection:
    """A psycopg connection that takes the queries of :class:`minipacs.index.Index` as they are."""

    def __init__(self, connection: psycopg.Connection):
        self.connection = connection

    def execute(self, sql: str, args: Any = ()) -> psycopg.Cursor:
        cursor = self.connection.cursor()
        cursor.execute(_placeholders(sql), _integers(args)) if args else cursor.execute(sql)
        return cursor

    def executemany(self, sql: str, rows: Sequence) -> psycopg.Cursor:
        cursor = self.connection.cursor()
        if rows:
            cursor.executemany(_placeholders(sql), [_integers(row) for row in rows])
        return cursor


class PostgresIndex(idx.Index):
    """The index in a PostgreSQL database, shared by the nodes of a cluster. ``node`` names
    this process in the claims; ``lease`` is how long a claim lasts unless renewed."""

    errors = (psycopg.Error,)
    anomaly_filters = {**idx.ANOMALY_FILTERS,
                       "reason": "starts_with(i.anomaly_reason || ':', ? || ':')"}
    now = "minipacs_now()"
    key = "orthanc_id"

    def __init__(self, dsn: str, node: str, lease: float = 30.0):
        self.path, self.node, self.lease = dsn, node, lease
        self._connections: dict[int, _Connection] = {}
        self._write_lock = threading.Lock()
        with self._writing() as db:
            # Nodes starting together: one creates the schema, the others wait for it.
            db.execute("SELECT pg_advisory_xact_lock(4242)")
            db.execute(schema())

    def _connection(self) -> _Connection:
        db = self._connections.get(threading.get_ident())
        if db is None or db.connection.closed or db.connection.broken:  # PostgreSQL restarted
            db = _Connection(psycopg.connect(self.path, autocommit=True))
            self._connections[threading.get_ident()] = db
        return db

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Connection]:
        """One transaction; the lock orders this process's writers, as on SQLite, so that a
        deletion and a worker's ``keep`` never interleave (PostgreSQL orders the nodes)."""
        db = self._connection()
        with self._write_lock, db.connection.transaction():
            yield db

    def close(self) -> None:
        db = self._connections.pop(threading.get_ident(), None)
        if db is not None:
            db.connection.close()

    @functools.cache
    def order(self, level: idx.Level) -> str:
        return _nulls(level.order)

    @functools.cache
    def columns(self, level: idx.Level) -> str:
        if not level.fields:
            return level.columns
        return f"CAST({idx._json_object(level.fields, postgresql=True)} AS text)"

    # Claims with a lease ------------------------------------------------------------------

    def _finish_claims(self, db, done: Sequence[str]) -> set[str] | None:
        """Release this node's claims of ``done``; the rows of the others are not written (their
        claim expired and another node took them, or they were deleted meanwhile)."""
        if not done:
            return None
        owned = db.execute("DELETE FROM claims WHERE orthanc_id = ANY(?) AND node = ? "
                           "RETURNING orthanc_id", (list(done), self.node)).fetchall()
        return {row[0] for row in owned}

    def enqueue(self, orthanc_ids: Sequence[str], db: _Connection | None = None) -> None:
        """Queue instances not indexed yet, once for the whole cluster."""
        rows = [(i, i) for i in orthanc_ids]
        sql = ("INSERT INTO claims(orthanc_id) SELECT ? WHERE NOT EXISTS "
               "(SELECT 1 FROM images WHERE orthanc_id = ?) ON CONFLICT DO NOTHING")
        if db is not None:
            db.executemany(sql, rows)
            return
        with self._writing() as db:
            db.executemany(sql, rows)

    def take(self, limit: int) -> list[tuple[str, int]]:
        """Hold up to ``limit`` queued instances (or ones whose holder's lease expired) for this
        node: (orthanc_id, renderings started before)."""
        with self._writing() as db:
            return db.execute(
                """UPDATE claims SET node = ?, expires = minipacs_epoch() + ? WHERE orthanc_id IN (
                       SELECT orthanc_id FROM claims WHERE node IS NULL OR expires < minipacs_epoch()
                       ORDER BY queued LIMIT ? FOR UPDATE SKIP LOCKED)
                   RETURNING orthanc_id, attempts""", (self.node, self.lease, limit)).fetchall()

    def claim(self, orthanc_ids: Sequence[str]) -> None:
        """Count an attempt at each instance, holding it for this node unless another node's
        lease on it runs."""
        with self._writing() as db:
            db.executemany(
                """INSERT INTO claims AS c(orthanc_id, attempts, claimed_at, node, expires)
                   VALUES (?, 1, minipacs_now(), ?, minipacs_epoch() + ?)
                   ON CONFLICT (orthanc_id) DO UPDATE SET attempts = c.attempts + 1,
                       claimed_at = excluded.claimed_at, node = excluded.node, expires = excluded.expires
                   WHERE c.node IS NULL OR c.node = excluded.node OR c.expires < minipacs_epoch()""",
                [(i, self.node, self.lease) for i in orthanc_ids])

    def release(self, orthanc_ids: Sequence[str]) -> None:
        with self._writing() as db:
            db.execute("DELETE FROM claims WHERE orthanc_id = ANY(?) AND node = ?",
                       (list(orthanc_ids), self.node))

    def claims(self, orthanc_ids: Sequence[str] | None = None) -> dict[str, int]:
        """The attempts at each instance claimed and never written, of ``orthanc_ids`` or, for
        all, those no live node holds."""
        if orthanc_ids is None:
            return dict(self._connection().execute(
                "SELECT orthanc_id, attempts FROM claims WHERE attempts > 0 AND "
                "(node IS NULL OR expires < minipacs_epoch())", ()).fetchall())
        return dict(self._connection().execute(
            "SELECT orthanc_id, attempts FROM claims WHERE attempts > 0 AND orthanc_id = ANY(?)",
            (list(orthanc_ids),)).fetchall())

    def queued(self) -> set[str]:
        return {row[0] for row in self._connection().execute("SELECT orthanc_id FROM claims")}

    def renew(self) -> None:
        """Extend this node's leases (it is alive)."""
        with self._writing() as db:
            db.execute("UPDATE claims SET expires = minipacs_epoch() + ? WHERE node = ?",
                       (self.lease, self.node))

    def let_go(self) -> None:
        """Give this node's claims back to the queue (it is stopping)."""
        with self._writing() as db:
            db.execute("UPDATE claims SET node = NULL, expires = NULL WHERE node = ?", (self.node,))

    # Orthanc's change log -----------------------------------------------------------------

    @contextlib.contextmanager
    def following(self) -> Iterator[tuple[_Connection, int] | None]:
        """The change log's position, held by this node for one transaction (None while another
        node holds it): what is read of the log is applied and the position moved in one go."""
        with self._writing() as db:
            db.execute("INSERT INTO state VALUES ('last_change', '-1') ON CONFLICT DO NOTHING", ())
            row = db.execute("SELECT value FROM state WHERE name = 'last_change' "
                             "FOR UPDATE SKIP LOCKED", ()).fetchone()
            yield None if row is None else (db, int(row[0]))

    def moved(self, db: _Connection, last: int) -> None:
        db.execute("UPDATE state SET value = ? WHERE name = 'last_change'", (str(last),))
