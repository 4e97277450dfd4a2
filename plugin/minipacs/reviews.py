"""Reviewers' verdicts on images: confirm or dismiss a flag, report an anomaly the model missed.

A review says ``invalid`` (an anomaly, with its reason) or ``valid``; a later review of the same
image replaces its verdict and the earlier ones stay as its history. Each review keeps what the
model said when it was made (flag, score, reason, version), so that the precision a team sees
per model version survives rescoring. The rows live in the index's ``reviews`` table
(``index.REVIEWS_SCHEMA``); the SQL here is portable (SQLite and PostgreSQL), but for reading the
images' JSON ``item``.
"""

import base64
import binascii
import json
import time
from collections.abc import Mapping
from typing import Any

from . import index as idx
from . import reasons

INVALID, VALID = "invalid", "valid"
VERDICTS = (INVALID, VALID)
#: What a review says of the model's flag: it was right (confirmed), a false alarm (dismissed),
#: an anomaly it did not flag (missed), or an image it rightly left alone (agreed).
CONFIRMED, DISMISSED, MISSED, AGREED = "confirmed", "dismissed", "missed", "agreed"
MAX_COMMENT = 2000

_COLUMNS = ("seq", "verdict", "reason", "comment", "reviewer", "reviewed_at", "model_flagged",
            "model_score", "model_reason", "model_version")
_KEYS = ("Revision", "Verdict", "Reason", "Comment", "Reviewer", "ReviewedAt", "ModelFlagged",
         "ModelScore", "ModelReason", "ModelVersion")
_SELECT = ", ".join(f"r.{c}" for c in _COLUMNS)
# The reason or its family, as ?reason= of /minipacs/anomalies: the reason, its length + 1 and
# the reason + ":" (no operator on a parameter: PostgreSQL must know each one's type).
_REASON = "(r.reason = ? OR substr(r.reason, 1, ?) = ?)"
# The review agrees with the image's score now (which a rescore may have changed).
_AGREES = ("((r.verdict = 'invalid' AND i.flagged = 1) OR "
           "(r.verdict = 'valid' AND (i.flagged IS NULL OR i.flagged = 0)))")
#: An image nobody reviewed (a filter naming ``i``).
UNREVIEWED = "NOT EXISTS (SELECT 1 FROM reviews r WHERE r.image = i.orthanc_id)"


class ReviewError(ValueError):
    """A review that cannot be recorded; the message says why."""


def outcome(verdict: str, flagged: Any) -> str:
    if verdict == INVALID:
        return CONFIRMED if flagged else MISSED
    return DISMISSED if flagged else AGREED


def review_of(row: tuple) -> dict[str, Any]:
    review = dict(zip(_KEYS, row))
    review["ModelFlagged"] = None if review["ModelFlagged"] is None else bool(review["ModelFlagged"])
    review["Outcome"] = outcome(review["Verdict"], review["ModelFlagged"])
    return review


def checked(body: bytes, image: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    """(verdict, reason, comment) of a request body, or :class:`ReviewError`. An ``invalid``
    verdict needs one of ``reasons.REASONS``; confirming a flag without one takes the model's."""
    try:
        request = json.loads(body or b"null")
    except ValueError as exc:
        raise ReviewError(f"body must be JSON: {exc}")
    if not isinstance(request, dict):
        raise ReviewError('body must be {"verdict": "invalid"|"valid", "reason": ..., "comment": ...}')
    unknown = sorted(set(request) - {"verdict", "reason", "comment"})
    if unknown:
        raise ReviewError(f"unknown key {unknown[0]!r}; a review has verdict, reason, comment")
    verdict, reason, comment = request.get("verdict"), request.get("reason"), request.get("comment")
    if verdict not in VERDICTS:
        raise ReviewError(f"'verdict' must be 'invalid' (an anomaly) or 'valid', not {verdict!r}")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise ReviewError(f"'comment' must be a string of at most {MAX_COMMENT} characters")
    if verdict == VALID:
        if reason not in (None, VALID):
            raise ReviewError(f"a 'valid' verdict takes no reason, not {reason!r}")
        return verdict, None, comment
    if reason is None and image.get("Flagged") and image.get("AnomalyReason") in reasons.REASONS:
        reason = image["AnomalyReason"]
    if reason not in reasons.REASONS:
        raise ReviewError(f"an 'invalid' verdict needs a reason, one of {', '.join(reasons.REASONS)}; "
                          f"not {reason!r}")
    return verdict, reason, comment


def reviewer_from(headers: Mapping[str, str], trusted: bool) -> str | None:
    """The user of an HTTP Basic ``Authorization`` header, where Orthanc checked it
    (``trusted``: its authentication is on); None otherwise (no authentication, or a token of
    an authorization plugin, which names no user)."""
    if not trusted:
        return None
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


def now() -> str:
    seconds = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


def add(index: idx.Index, orthanc_id: str, verdict: str, reason: str | None, comment: str | None,
        reviewer: str | None) -> None:
    """Record a review of an indexed image; it becomes the image's current verdict."""
    with index._writing() as db:
        model = db.execute("SELECT flagged, anomaly_score, anomaly_reason, model_version FROM images "
                           "WHERE orthanc_id = ?", (orthanc_id,)).fetchone()
        if model is None:  # deleted meanwhile
            return
        seq = db.execute("SELECT coalesce(max(seq), 0) + 1 FROM reviews WHERE image = ?",
                         (orthanc_id,)).fetchone()[0]
        db.execute("UPDATE reviews SET latest = 0 WHERE image = ? AND latest = 1", (orthanc_id,))
        db.execute("""INSERT INTO reviews (image, seq, latest, verdict, reason, comment, reviewer,
                          reviewed_at, model_flagged, model_score, model_reason, model_version)
                      VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                   (orthanc_id, seq, verdict, reason, comment, reviewer, now(), *model))


def history(index: idx.Index, orthanc_id: str) -> list[dict[str, Any]]:
    """The image's reviews, the current one first."""
    return [review_of(row) for row in index._connection().execute(
        f"SELECT {_SELECT} FROM reviews r WHERE r.image = ? ORDER BY r.seq DESC", (orthanc_id,))]


#: The filters of /minipacs/reviews naming the images (``i``) with one argument each.
IMAGE_FILTERS = {key: idx.ANOMALY_FILTERS[key] for key in ("patient", "study", "series", "modality")}
IMAGE_FILTERS["model_version"] = "i.model_version = ?"


def page(index: idx.Index, query: Mapping[str, str], limit: int, offset: int,
         reviewed: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Reviewed images, the latest review first, each with its current ``Review``; or, with
    ``reviewed`` false, the flagged images nobody reviewed yet, most anomalous first. Filters
    (checked by the caller): those of :data:`IMAGE_FILTERS`, ``verdict``, ``reason`` (the
    reviewer's, or its family) and ``agrees`` (``true``/``false``: with the image's flag now)."""
    clauses, args = [], []
    for key, clause in IMAGE_FILTERS.items():
        if query.get(key):
            clauses.append(clause)
            args.append(query[key])
    if reviewed:
        if query.get("verdict"):
            clauses.append("r.verdict = ?")
            args.append(query["verdict"])
        if query.get("reason"):
            clauses.append(_REASON)
            args += [query["reason"], len(query["reason"]) + 1, query["reason"] + ":"]
        if query.get("agrees"):
            clauses.append(_AGREES if query["agrees"] == "true" else f"NOT {_AGREES}")
        source = "reviews r JOIN images i ON i.orthanc_id = r.image"
        clauses.insert(0, "r.latest = 1")
        order, select = "r.reviewed_at DESC, r.image", f"i.item, {_SELECT}"
    else:
        source, order, select = "images i", "i.anomaly_score DESC, i.orthanc_id", "i.item"
        clauses[:0] = ["i.flagged = 1", UNREVIEWED]
        if any(query.get(key) for key in ("verdict", "reason", "agrees")):
            clauses.append("1 = 0")  # a filter of reviews: no unreviewed image has one
    where = " AND ".join(clauses)
    db = index._connection()
    total = db.execute(f"SELECT count(*) FROM {source} WHERE {where}", tuple(args)).fetchone()[0]
    rows = db.execute(f"SELECT {select} FROM {source} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                      (*args, limit, offset)).fetchall()
    items = [{**json.loads(row[0]), "Review": review_of(row[1:]) if reviewed else None} for row in rows]
    return items, total


def by_model(index: idx.Index) -> list[dict[str, Any]]:
    """Per model version reviewed: its flags confirmed and dismissed, the anomalies it missed,
    and the precision the team saw (confirmed / reviewed flags)."""
    rows = index._connection().execute(
        """SELECT model_version,
               sum(CASE WHEN verdict = 'invalid' AND model_flagged = 1 THEN 1 ELSE 0 END),
               sum(CASE WHEN verdict = 'valid' AND model_flagged = 1 THEN 1 ELSE 0 END),
               sum(CASE WHEN verdict = 'invalid' AND (model_flagged IS NULL OR model_flagged = 0)
                   THEN 1 ELSE 0 END),
               count(*)
           FROM reviews WHERE latest = 1 GROUP BY model_version ORDER BY model_version""").fetchall()
    return [{"ModelVersion": version, "Confirmed": confirmed, "Dismissed": dismissed, "Missed": missed,
             "Reviewed": n, "Precision": confirmed / (confirmed + dismissed) if confirmed + dismissed else None}
            for version, confirmed, dismissed, missed, n in rows]


def rejected(index: idx.Index, study_orthanc_id: str) -> list[dict[str, Any]]:
    """The images of a study to list as rejected for quality reasons: flagged and not dismissed,
    or found invalid by a reviewer (a confirmed flag, a reported miss); with the identifiers a
    KOS references them by (an unreadable instance, without a SOP class, cannot be referenced)."""
    rows = index._connection().execute(
        """SELECT i.sop_uid, i.sop_class_uid, i.series_uid, i.orthanc_id, i.status FROM images i
           JOIN series se ON se.orthanc_id = i.series
           LEFT JOIN reviews r ON r.image = i.orthanc_id AND r.latest = 1
           WHERE se.study = ? AND (r.verdict = 'invalid' OR (r.verdict IS NULL AND i.flagged = 1))
               AND i.sop_class_uid IS NOT NULL
           ORDER BY i.series_uid, i.instance_number, i.sop_uid""", (study_orthanc_id,)).fetchall()
    return [dict(zip(("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "OrthancID", "Status"), row))
            for row in rows]
