"""The ``/minipacs`` HTTP API as a pure function of (method, path, query) → :class:`Response`.

The entry script forwards Orthanc's REST callbacks here, so every route is unit-testable without
Orthanc, and Orthanc's own HTTP server (authentication included) stays in front of all of them.
Identifiers in paths are the DICOM ones: PatientID, Study/Series/SOP Instance UID.
"""

import json
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__
from . import index as idx
from . import openapi
from . import reasons
from . import reviews
from .kos import KeyObjects
from .rescore import Busy, Rescorer
from .scoring import ModelError, ModelSlot

# 25 rows: a page then costs about what a single resource does (bench/routes.py); ask more
# with ?limit= (a page of 100 images: ~1.9× the p99 of Orthanc's /patients/{id}, most of the
# difference SQLite reading the rows; ~2.7× where Orthanc gzips the ~100 KB answer).
DEFAULT_LIMIT = 25
MAX_LIMIT = 1000
log = logging.getLogger("minipacs")
UI_PAGE = (Path(__file__).parent / "ui.html").read_bytes()
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, message: str, **details: Any):
        super().__init__(message)
        self.status = status
        self.details = details


def json_response(payload: Any, status: int = 200, **headers: str) -> Response:
    # ASCII-only JSON: Orthanc's error-answer call measures the body in characters.
    return Response(status, json.dumps(payload, ensure_ascii=True).encode("ascii"),
                    headers=headers)


def page_response(items: str, **fields: Any) -> Response:
    """A page whose items are JSON text already (written by SQLite), put into the answer as
    they are: parsing and writing them again would cost more than the query."""
    rest = json.dumps(fields, ensure_ascii=True)
    return Response(200, f'{{"items": {items}, {rest[1:]}'.encode())


DOCUMENT = openapi.document()  # built once: it changes only with the code
OPENAPI = json_response(DOCUMENT)


def _natural(query: Mapping[str, str], key: str, default: int, maximum: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, f"'{key}' must be a non-negative integer, not {raw!r}")
    value = int(raw)
    if value > maximum:
        raise HttpError(400, f"'{key}' must be at most {maximum}, not {value}")
    return value


def paging(query: Mapping[str, str]) -> tuple[int, int]:
    """``limit`` (1..1000, default 25) and ``offset`` (default 0) from the query string."""
    limit = _natural(query, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    if limit == 0:
        raise HttpError(400, "'limit' must be at least 1")
    return limit, _natural(query, "offset", 0, 10**9)


Handler = Callable[..., Any]


def _boolean(query: Mapping[str, str], key: str) -> bool | None:
    """``true`` or ``false`` (None when absent)."""
    raw = query.get(key)
    if raw is None or raw == "":
        return None
    if raw not in ("true", "false"):
        raise HttpError(400, f"{key!r} must be true or false, not {raw!r}")
    return raw == "true"


class Router:
    """Dispatches ``/minipacs/...`` requests to the index and the model."""

    def __init__(self, index: idx.Index, png_directory: Path,
                 ingest_stats: Callable[[], dict[str, Any]],
                 models: ModelSlot | None = None, rescorer: Rescorer | None = None,
                 orthanc_features: Callable[[], dict[str, Any]] = dict,
                 key_objects: KeyObjects | None = None):
        self.index = index
        self.png_directory = Path(png_directory)
        self.ingest_stats = ingest_stats
        self.models = models or ModelSlot(None)
        self.rescorer = rescorer
        self.orthanc_features = orthanc_features
        self.key_objects = key_objects
        level_routes = [
            ("patients", "patient", idx.PATIENTS, "studies", idx.STUDIES, "s.patient"),
            ("studies", "study", idx.STUDIES, "series", idx.SERIES, "se.study"),
            ("series", "series", idx.SERIES, "images", idx.IMAGES, "i.series"),
            ("images", "image", idx.IMAGES, None, None, None),
        ]
        routes: list[tuple[str, Handler | dict[str, Handler]]] = [
            (r"", self.welcome),
            (r"ui", lambda q: Response(200, UI_PAGE, "text/html; charset=utf-8")),
            (r"openapi\.json", lambda q: OPENAPI),
            (r"ingest", self.ingest),
            (r"counts", lambda q: self.index.counts()),
            (r"anomalies", self.anomalies),
            (r"model", self.model),
            (r"model/reload", {"POST": self.reload_model}),
            (r"rescore", {"GET": self.rescore_progress, "POST": self.start_rescore}),
            (r"imageinfo/(?P<name>.+)", self.image_info),
            (r"images/(?P<uid>.+)/png", self.png),
            (r"images/(?P<uid>.+)/score", self.image_score),
            (r"images/(?P<uid>.+)/review", {"GET": self.review, "POST": self.add_review}),
            (r"reviews", self.review_list),
            (r"studies/(?P<uid>.+)/summary", self._summary(idx.STUDIES, "study", "se.study")),
            (r"studies/(?P<uid>.+)/kos", {"GET": self.key_object, "POST": self.make_key_object}),
            (r"series/(?P<uid>.+)/summary", self._summary(idx.SERIES, "series", "i.series")),
            (r"patients/(?P<uid>.+)/(?P<what>studycount|seriescount|imagecount|counts)",
             self.patient_counts),
        ]
        for name, noun, level, child_name, child, parent_column in level_routes:
            routes.append((name, self._lister(level, name)))
            routes.append((f"{name}/count", self._counter(name)))
            if child is not None:
                routes.append((f"{name}/(?P<uid>.+)/{child_name}",
                               self._children(level, noun, child, parent_column)))
            routes.append((f"{name}/(?P<uid>.+)", self._getter(level, noun)))
        # No trailing slash but for the root: Orthanc turns a backslash into a slash, and
        # "patients/<backslash>" must not become the list "patients/".
        self.routes = [(re.compile(pattern or "/?"), handler if isinstance(handler, dict)
                        else {"GET": handler}) for pattern, handler in routes]
        self.parameters = self._described_parameters()

    def _described_parameters(self) -> dict[tuple[int, str], tuple[str, ...]]:
        """The query parameters of each (route, method), as the OpenAPI description lists them:
        one list, so that what is accepted is what is described."""
        accepted = {}
        for path, operations in DOCUMENT["paths"].items():
            concrete = re.sub(r"\{[^}]+\}", "x", path.removeprefix("/minipacs/"))
            route = next(i for i, (pattern, _) in enumerate(self.routes) if pattern.fullmatch(concrete))
            for method, operation in operations.items():
                accepted[route, method.upper()] = tuple(
                    p["name"] for p in operation["parameters"] if p["in"] == "query")
        return accepted

    # Dispatch -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: Mapping[str, str], body: bytes = b"",
               user: str | None = None) -> Response:
        """Answer one request; never raises (an unexpected error is a logged JSON 500).

        ``query`` as Orthanc hands it over: names and values still percent-encoded (RFC 3986
        2.1), which are decoded here, once. ``user``: who asks, where Orthanc authenticated them
        (a POST records or logs it)."""
        path = path.lstrip("/")
        query = {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in query.items()}
        try:
            for route, (pattern, handlers) in enumerate(self.routes):
                match = pattern.fullmatch(path)
                if match:
                    if method not in handlers:
                        allowed = ",".join(handlers)
                        raise HttpError(405, f"{method} is not allowed here; use {allowed}",
                                        allowed=allowed)
                    accepted = self.parameters.get((route, method), ())
                    unknown = sorted(set(query) - set(accepted))
                    if unknown:  # a typo would otherwise filter nothing, silently
                        raise HttpError(400, f"unknown query parameter {unknown[0]!r}; "
                                        f"{method} /minipacs/{path} accepts "
                                        f"{', '.join(accepted) or 'none'}", Accepted=list(accepted))
                    arguments = match.groupdict()
                    if method == "POST":
                        arguments.update(body=body, user=user)
                    result = handlers[method](query, **arguments)
                    return result if isinstance(result, Response) else json_response(result)
            raise HttpError(404, f"no such route: /minipacs/{path}")
        except HttpError as exc:
            headers = {"Allow": exc.details["allowed"]} if exc.status == 405 else {}
            return json_response({"error": str(exc), "status": exc.status, **exc.details},
                                 exc.status, **headers)
        except Exception as exc:  # a bug or a broken index file: answer, and keep Orthanc up
            log.exception("%s /minipacs/%s failed", method, path)
            return json_response({"error": f"internal error: {type(exc).__name__}: {exc}",
                                  "status": 500}, 500)

    # Handlers -------------------------------------------------------------------------------

    def welcome(self, query):
        return {"name": "minipacs", "version": __version__,
                "message": "Welcome to the minipacs API", "counts": self.index.counts(),
                "model": self.models.describe(), "orthanc": self.orthanc_features()}

    def ingest(self, query):
        return {"worker": self.ingest_stats(), "statuses": self.index.status_counts()}

    def _found(self, level: idx.Level, noun: str, uid: str) -> dict[str, Any]:
        row = self.index.get(level, uid)
        if row is None:
            raise HttpError(404, f"no such {noun}: {uid}")
        return row

    def _getter(self, level: idx.Level, noun: str) -> Handler:
        return lambda query, uid: self._found(level, noun, uid)

    def _counter(self, name: str) -> Handler:
        return lambda query: {"count": self.index.counts()[name]}

    def _lister(self, level: idx.Level, name: str) -> Handler:
        def page(query):
            status = query.get("status")
            if name != "images" or status is None:
                return self._page(level, query, "", ())
            if status not in idx.STATUSES:
                raise HttpError(400, f"'status' must be one of {', '.join(idx.STATUSES)}")
            return self._page(level, query, "i.status = ?", (status,),
                              self.index.status_counts().get(status, 0))
        return page

    def _children(self, level: idx.Level, noun: str, child: idx.Level, parent_column: str) -> Handler:
        def page(query, uid):
            parent = self._found(level, noun, uid)
            return self._page(child, query, f"{parent_column} = ?", (parent["OrthancID"],))
        return page

    def _page(self, level: idx.Level, query, where: str, args: tuple,
              total: int | None = None) -> Response:
        limit, offset = paging(query)
        items, total = self.index.page_json(level, limit, offset, where, args, total)
        return page_response(items, total=total, limit=limit, offset=offset)

    def anomalies(self, query):
        """Flagged images, most anomalous first, filtered by patient/study/series/modality and
        minimum score."""
        clauses, args = ["i.flagged = 1"], []
        if query.get("reason") and not reasons.known(query["reason"]):
            raise HttpError(400, f"unknown reason {query['reason']!r}; reasons: "
                            f"{', '.join(reasons.FILTERS)}", Reasons=list(reasons.FILTERS))
        for key, clause in idx.ANOMALY_FILTERS.items():
            if query.get(key):
                clauses.append(clause)
                args.append(query[key])
        if "min_score" in query:
            try:
                minimum = float(query["min_score"])
            except ValueError:
                minimum = float("nan")
            if not 0.0 <= minimum <= 1.0:
                raise HttpError(400, f"'min_score' must be a number within [0, 1], not {query['min_score']!r}")
            clauses.append("i.anomaly_score >= ?")
            args.append(minimum)
        if query.get("reviewed"):
            clauses.append(reviews.UNREVIEWED if _boolean(query, "reviewed") is False
                           else f"NOT {reviews.UNREVIEWED}")
        limit, offset = paging(query)
        unfiltered = len(clauses) == 1  # then the total comes from the counters
        total = self.index.flagged_count() if unfiltered else None
        items, total = self.index.page_json(idx.FLAGGED, limit, offset, " AND ".join(clauses),
                                            tuple(args), total)
        return page_response(items, total=total, limit=limit, offset=offset,
                             model=self.models.describe())

    def image_score(self, query, uid):
        image = self._found(idx.IMAGES, "image", uid)
        if image["AnomalyScore"] is None:
            raise HttpError(404, f"image {uid} has no score", Status=image["Status"],
                            StatusDetail=image["StatusDetail"], Model=self.models.describe())
        return {key: image[key] for key in ("SOPInstanceUID", "OrthancID", "AnomalyScore",
                                            "Flagged", "AnomalyReason", "ModelVersion", "Threshold", "ScoredAt")}

    def _summary(self, level: idx.Level, noun: str, column: str) -> Handler:
        def summary(query, uid):
            found = self._found(level, noun, uid)
            return {**found, **self.index.summary(f"{column} = ?", (found["OrthancID"],))}
        return summary

    def model(self, query):
        """The model in use, and how many images it has not scored (a rescore's work)."""
        model = self.models.describe()
        if model["Loaded"]:
            model.update(self.index.unscored_by(model["Version"]))
        return {**model, "Reviews": reviews.by_model(self.index)}

    def reload_model(self, query, body, user):
        """Load the configured model file again, or ``{"Path": "..."}``, without a restart; a
        model that fails :class:`Scorer`'s checks is a 400 and the one in use stays."""
        try:
            request = json.loads(body or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"body must be JSON: {exc}")
        path = request.get("Path") if isinstance(request, dict) else None
        if not isinstance(request, dict) or (path is not None and not isinstance(path, str)):
            raise HttpError(400, 'body must be {} or {"Path": "<model.onnx>"}')
        if path is not None and not Path(path).is_file():
            raise HttpError(404, f"no model file at {path}", Model=self.models.describe())
        try:
            self.models.load(path)
        except ModelError as exc:
            raise HttpError(400, str(exc), Model=self.models.describe())
        log.warning("model %s loaded%s", self.models.describe().get("Version"), f" by {user}" if user else "")
        return self.model(query)

    def rescore_progress(self, query):
        if self.rescorer is None:
            raise HttpError(404, "rescoring is not available")
        return self.rescorer.progress()

    def start_rescore(self, query, body, user):
        if self.rescorer is None:
            raise HttpError(404, "rescoring is not available")
        try:
            progress = self.rescorer.start()
            log.warning("rescore started%s", f" by {user}" if user else "")
            return progress
        except Busy as exc:
            raise HttpError(409, str(exc), Progress=self.rescorer.progress())
        except ModelError as exc:
            raise HttpError(409, f"no model to rescore with: {exc}")

    def _reviewed(self, image: dict[str, Any]) -> dict[str, Any]:
        found = reviews.history(self.index, image["OrthancID"])
        return {"SOPInstanceUID": image["SOPInstanceUID"], "OrthancID": image["OrthancID"],
                "StudyInstanceUID": image["StudyInstanceUID"], "Flagged": image["Flagged"],
                "AnomalyReason": image["AnomalyReason"], "ModelVersion": image["ModelVersion"],
                "Current": found[0] if found else None, "History": found}

    def review(self, query, uid):
        """The image's current verdict and its history."""
        return self._reviewed(self._found(idx.IMAGES, "image", uid))

    def add_review(self, query, uid, body, user):
        """Record a reviewer's verdict (see :mod:`minipacs.reviews`); then the study's KOS follows."""
        image = self._found(idx.IMAGES, "image", uid)
        try:
            verdict, reason, comment = reviews.checked(body, image)
        except reviews.ReviewError as exc:
            raise HttpError(400, str(exc), Reasons=list(reasons.REASONS))
        reviews.add(self.index, image["OrthancID"], verdict, reason, comment, user)
        answer = self._reviewed(image)
        if self.key_objects is not None:
            study = self.index.study_of("images", image["OrthancID"])
            try:  # the review is recorded whatever happens to the KOS
                answer["KeyObject"] = self.key_objects.reviewed(study) if study else None
            except Exception as exc:
                log.exception("updating the KOS of study %s failed", image["StudyInstanceUID"])
                answer["KeyObjectError"] = f"{type(exc).__name__}: {exc}"
        return answer

    def _key_objects(self) -> KeyObjects:
        if self.key_objects is None:
            raise HttpError(404, "key object selection documents are not available")
        return self.key_objects

    def key_object(self, query, uid):
        """The study's current KOS, if minipacs made one."""
        study = self._found(idx.STUDIES, "study", uid)
        current = self._key_objects().current(study["OrthancID"])
        if current is None:
            raise HttpError(404, f"study {uid} has no KOS of minipacs")
        return {"StudyInstanceUID": uid, **current}

    def make_key_object(self, query, uid, body, user):
        """Write the study's KOS anew (flagged, confirmed and reported images; not the
        dismissed), replacing the previous one."""
        study = self._found(idx.STUDIES, "study", uid)
        result = self._key_objects().update(study["OrthancID"])
        log.warning("KOS of study %s written%s: %d instance(s)", uid, f" by {user}" if user else "",
                    len(result["Instances"]))
        return {"StudyInstanceUID": uid, **result}

    def review_list(self, query):
        """Reviewed images, the latest first (or the flagged ones nobody reviewed: reviewed=false)."""
        reviewed = _boolean(query, "reviewed") is not False
        for key, allowed in (("verdict", reviews.VERDICTS), ("agrees", ("true", "false"))):
            if query.get(key) and query[key] not in allowed:
                raise HttpError(400, f"{key!r} must be one of {', '.join(allowed)}, not {query[key]!r}")
        if query.get("reason") and query["reason"] not in reasons.FILTERS[:-1]:
            raise HttpError(400, f"unknown reason {query['reason']!r}; reasons: "
                            f"{', '.join(reasons.FILTERS[:-1])}", Reasons=list(reasons.FILTERS[:-1]))
        limit, offset = paging(query)
        items, total = reviews.page(self.index, query, limit, offset, reviewed)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    def patient_counts(self, query, uid, what):
        patient = self._found(idx.PATIENTS, "patient", uid)
        counts = self.index.patient_counts(patient["OrthancID"])
        key = {"studycount": "studies", "seriescount": "series", "imagecount": "images"}.get(what)
        return {"PatientID": uid, **({key: counts[key]} if key else counts)}

    def image_info(self, query, name):
        orthanc_id = name[:-4] if name.endswith(".png") else name
        if not ORTHANC_ID.fullmatch(orthanc_id):
            raise HttpError(400, "expected '<orthanc-instance-id>' or '<orthanc-instance-id>.png'")
        info = self.index.image_info(orthanc_id)
        if info is None:
            raise HttpError(404, f"no such image file: {name}")
        return info

    def png(self, query, uid):
        image = self._found(idx.IMAGES, "image", uid)
        if image["Png"] is None:
            raise HttpError(404, f"image {uid} has no PNG", Status=image["Status"],
                            StatusDetail=image["StatusDetail"])
        # The file name comes from the index (an Orthanc ID), never from the request.
        try:
            data = (self.png_directory / image["Png"]).read_bytes()
        except OSError as exc:
            raise HttpError(404, f"PNG of image {uid} is missing: {exc.strerror}")
        return Response(200, data, "image/png")
