"""The OpenAPI 3 description of the /minipacs routes, served at /minipacs/openapi.json.

Written by hand next to :mod:`minipacs.routes` (tests/test_openapi.py checks that both list the
same routes, and runs schemathesis against the live server)."""

from . import __version__, reasons, reviews

_STRING = {"type": "string"}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}
_INTEGER_OR_NULL = {"type": ["integer", "null"]}


def _object(required: list[str], **properties) -> dict:
    return {"type": "object", "required": required, "properties": properties}


SCHEMAS = {
    # Errors are ours ({"error", "status"}) or, for paths Orthanc refuses itself (".."), Orthanc's.
    # An unknown ?reason= also lists the known ones (Reasons), an unknown query parameter
    # those the route accepts (Accepted), a 405 the methods it allows (allowed).
    "Error": {"type": "object", "properties": {"error": _STRING, "status": {"type": "integer"},
                                               "Reasons": {"type": "array", "items": _STRING},
                                               "Accepted": {"type": "array", "items": _STRING},
                                               "allowed": _STRING}},
    "Count": _object(["count"], count={"type": "integer", "minimum": 0}),
    "Counts": _object(["patients", "studies", "series", "images"],
                      **{k: {"type": "integer", "minimum": 0}
                         for k in ("patients", "studies", "series", "images")}),
    "PatientCounts": _object(["PatientID"], PatientID=_STRING,
                             **{k: {"type": "integer", "minimum": 0} for k in ("studies", "series", "images")}),
    "Patient": _object(["OrthancID", "PatientID"], OrthancID=_STRING, PatientID=_STRING,
                       PatientName=_STRING_OR_NULL, PatientBirthDate=_STRING_OR_NULL,
                       PatientSex=_STRING_OR_NULL),
    "Study": _object(["OrthancID", "StudyInstanceUID", "PatientID"], OrthancID=_STRING,
                     StudyInstanceUID=_STRING, PatientID=_STRING, StudyDate=_STRING_OR_NULL,
                     StudyDescription=_STRING_OR_NULL, AccessionNumber=_STRING_OR_NULL),
    "Series": _object(["OrthancID", "SeriesInstanceUID", "StudyInstanceUID"], OrthancID=_STRING,
                      SeriesInstanceUID=_STRING, StudyInstanceUID=_STRING, PatientID=_STRING,
                      Modality=_STRING_OR_NULL, SeriesNumber=_INTEGER_OR_NULL,
                      SeriesDescription=_STRING_OR_NULL),
    "Image": _object(
        ["OrthancID", "SOPInstanceUID", "Status"], OrthancID=_STRING, SOPInstanceUID=_STRING,
        SeriesInstanceUID=_STRING, StudyInstanceUID=_STRING, PatientID=_STRING,
        Status={"enum": ["rendered", "no_pixel_data", "render_failed", "unreadable", "write_failed"]},
        StatusDetail=_STRING_OR_NULL, Png=_STRING_OR_NULL, InstanceNumber=_INTEGER_OR_NULL,
        NumberOfFrames=_INTEGER_OR_NULL, WindowCenter=_NUMBER_OR_NULL, WindowWidth=_NUMBER_OR_NULL,
        WindowSource=_STRING_OR_NULL, RescaleSlope=_NUMBER_OR_NULL, RescaleIntercept=_NUMBER_OR_NULL,
        AnomalyScore={"type": ["number", "null"], "minimum": 0, "maximum": 1},
        Flagged={"type": ["boolean", "null"]}, AnomalyReason=_STRING_OR_NULL,
        ModelVersion=_STRING_OR_NULL, Threshold=_NUMBER_OR_NULL),
    "ImageInfo": _object(["InstanceNumber", "PatientID", "RescaleIntercept", "RescaleSlope",
                          "SeriesDescription", "StudyDescription", "WindowCenter", "WindowWidth"],
                         InstanceNumber=_INTEGER_OR_NULL, PatientID=_STRING,
                         RescaleIntercept=_NUMBER_OR_NULL, RescaleSlope=_NUMBER_OR_NULL,
                         SeriesDescription=_STRING_OR_NULL, StudyDescription=_STRING_OR_NULL,
                         WindowCenter=_NUMBER_OR_NULL, WindowWidth=_NUMBER_OR_NULL),
    "Score": _object(["SOPInstanceUID", "AnomalyScore", "Flagged"], SOPInstanceUID=_STRING,
                     OrthancID=_STRING, AnomalyScore={"type": "number", "minimum": 0, "maximum": 1},
                     Flagged={"type": "boolean"}, AnomalyReason=_STRING_OR_NULL,
                     ModelVersion=_STRING, Threshold={"type": "number"}, ScoredAt=_STRING_OR_NULL),
    "Summary": _object(["OrthancID", "images", "rendered", "scored", "flagged", "max_score"],
                       OrthancID=_STRING, images={"type": "integer"}, rendered={"type": "integer"},
                       scored={"type": "integer"}, flagged={"type": "integer"},
                       max_score=_NUMBER_OR_NULL),
    "Model": _object(["Loaded"], Loaded={"type": "boolean"}, Error=_STRING_OR_NULL,
                     Version=_STRING, InputSize={"type": "integer"}, Threshold={"type": "number"},
                     Preprocessing=_STRING, Sha256=_STRING, Path=_STRING, LoadedAt=_STRING,
                     Reasons={"type": "array", "items": _STRING}, WindowThreshold=_NUMBER_OR_NULL,
                     Stale={"type": "integer", "minimum": 0}, Unscored={"type": "integer", "minimum": 0},
                     Reviews={"type": "array", "items": _object(
                         ["ModelVersion", "Confirmed", "Dismissed", "Missed", "Reviewed", "Precision"],
                         ModelVersion=_STRING_OR_NULL, Confirmed={"type": "integer"},
                         Dismissed={"type": "integer"}, Missed={"type": "integer"},
                         Reviewed={"type": "integer"}, Precision=_NUMBER_OR_NULL)}),
    # A reviewer's verdict, and what the model said of the image when it was made.
    "Review": _object(["Revision", "Verdict", "Reason", "Reviewer", "ReviewedAt", "Outcome"],
                      Revision={"type": "integer", "minimum": 1}, Verdict={"enum": list(reviews.VERDICTS)},
                      Reason={"enum": [*reasons.REASONS, None]}, Comment=_STRING_OR_NULL,
                      Reviewer=_STRING_OR_NULL, ReviewedAt=_STRING, ModelFlagged={"type": ["boolean", "null"]},
                      ModelScore=_NUMBER_OR_NULL, ModelReason=_STRING_OR_NULL, ModelVersion=_STRING_OR_NULL,
                      Outcome={"enum": [reviews.CONFIRMED, reviews.DISMISSED, reviews.MISSED, reviews.AGREED]}),
    "ImageReviews": _object(["SOPInstanceUID", "OrthancID", "Current", "History"], SOPInstanceUID=_STRING,
                            OrthancID=_STRING, StudyInstanceUID=_STRING, Flagged={"type": ["boolean", "null"]},
                            AnomalyReason=_STRING_OR_NULL, ModelVersion=_STRING_OR_NULL,
                            Current={"oneOf": [{"$ref": "#/components/schemas/Review"}, {"type": "null"}]},
                            History={"type": "array", "items": {"$ref": "#/components/schemas/Review"}},
                            KeyObject={"oneOf": [{"$ref": "#/components/schemas/KeyObject"}, {"type": "null"}]},
                            KeyObjectError=_STRING),
    # The study's Key Object Selection document ("Rejected for Quality Reasons"): OrthancID and
    # SOPInstanceUID are null where nothing is left to list (the previous one is deleted).
    "KeyObject": _object(["OrthancID", "SOPInstanceUID"], StudyInstanceUID=_STRING,
                         OrthancID=_STRING_OR_NULL, SOPInstanceUID=_STRING_OR_NULL, CreatedAt=_STRING_OR_NULL,
                         Instances={"type": "array", "items": _STRING}, Replaced=_STRING_OR_NULL),
    "ReviewedImage": {"allOf": [{"$ref": "#/components/schemas/Image"}, _object(["Review"], Review={
        "oneOf": [{"$ref": "#/components/schemas/Review"}, {"type": "null"}]})]},
    "Progress": _object(["State"], State={"enum": ["idle", "running", "done", "failed"]},
                        Total={"type": "integer"}, Done={"type": "integer"},
                        Flagged={"type": "integer"}, Failed={"type": "integer"},
                        ModelVersion=_STRING, Restarts={"type": "integer", "minimum": 0}),
    "Ingest": _object(["worker", "statuses"], worker=_object(
        ["queued", "processed", "failed", "dropped", "idle", "deferring", "deferred_s"],
        queued={"type": "integer"}, processed={"type": "integer"}, failed={"type": "integer"},
        dropped={"type": "integer"}, idle={"type": "boolean"}, deferring={"type": "boolean"},
        deferred_s={"type": "number"}, retrying={"type": "integer"}, gone={"type": "integer"},
        renderers={"type": "integer"}, renderers_replaced={"type": "integer"},
        key_objects_pending={"type": "integer"}),
        statuses={"type": "object"}),
    "Welcome": _object(["name", "version", "counts"], name=_STRING, version=_STRING,
                       message=_STRING, counts={"$ref": "#/components/schemas/Counts"},
                       model={"$ref": "#/components/schemas/Model"}, orthanc={"type": "object"}),
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str) -> dict:
    return _object(["items", "total", "limit", "offset"], items={"type": "array", "items": _ref(item)},
                   total={"type": "integer", "minimum": 0}, limit={"type": "integer"},
                   offset={"type": "integer"}, model=_ref("Model"))


PAGING = [{"name": "limit", "in": "query",
           "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 25}},
          {"name": "offset", "in": "query",
           "schema": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}}]
# Orthanc turns "\" into "/" and drops "." and ".." segments before any plugin sees the path,
# so identifiers holding them cannot be asked for by path.
_IDENTIFIER = {"type": "string", "pattern": r"^(?!\.{1,2}$)[^/\\]+$"}
_FILE_NAME = {"type": "string", "pattern": r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}(\.png)?$"}


def _uid(name: str = "uid", schema: dict = _IDENTIFIER) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema}


_RELOAD = {"type": "object", "properties": {"Path": _STRING_OR_NULL}}
_REVIEW = {"type": "object", "required": ["verdict"], "additionalProperties": False, "properties": {
    "verdict": {"enum": list(reviews.VERDICTS)},
    "reason": {"enum": [*reasons.REASONS, None], "description": "why 'invalid'; confirming a flag "
               "without one takes the model's; a 'valid' verdict takes none"},
    "comment": {"type": ["string", "null"], "maxLength": reviews.MAX_COMMENT}}}
_TRUE_FALSE = {"enum": ["true", "false"]}


def _operation(summary: str, schema: dict | None, *, parameters=(), content="application/json",
               errors=(404,), method="get", body: dict | None = None) -> dict:
    ok = {"description": "OK", "content": {content: {"schema": schema} if schema else {}}}
    responses = {"200": ok, **{str(code): {"description": "error", "content": {
        "application/json": {"schema": _ref("Error")}}} for code in (400, *errors)}}
    operation = {"summary": summary, "parameters": list(parameters), "responses": responses}
    if body:
        operation["requestBody"] = {"required": body is _REVIEW, "content": {"application/json": {
            "schema": body}}}
    return {method: operation}


def document() -> dict:
    paths = {
        "/minipacs/": _operation("Welcome, version, counts, model", _ref("Welcome"), errors=()),
        "/minipacs/counts": _operation("Patients, studies, series, images", _ref("Counts"), errors=()),
        "/minipacs/ingest": _operation("The ingest worker and images per status", _ref("Ingest"), errors=()),
        "/minipacs/ui": _operation("The flagged-images page", None, content="text/html", errors=()),
        "/minipacs/openapi.json": _operation("This description", {"type": "object"}, errors=()),
        "/minipacs/anomalies": _operation(
            "Flagged images, most anomalous first", _page("Image"), errors=(),
            parameters=PAGING + [{"name": k, "in": "query", "schema": _STRING}
                                 for k in ("patient", "study", "series", "modality")]
            + [{"name": "min_score", "in": "query",
                "schema": {"type": "number", "minimum": 0, "maximum": 1}},
               {"name": "reason", "in": "query", "schema": {"enum": list(reasons.FILTERS)},
                "description": "A reason (minipacs.reasons) or its family: broken_render finds "
                               "every broken_render:<kind>"},
               {"name": "reviewed", "in": "query", "schema": _TRUE_FALSE,
                "description": "false: only the flags nobody reviewed yet"}]),
        "/minipacs/model": _operation("The model in use and the images it has not scored",
                                      _ref("Model"), errors=()),
        "/minipacs/model/reload": _operation("Load the configured model file again ({}), or another, "
                                             "once checked", _ref("Model"), method="post", body=_RELOAD),
        "/minipacs/rescore": {**_operation("Rescoring progress", _ref("Progress")),
                              **_operation("Rescore every rendered image", _ref("Progress"),
                                           method="post", errors=(404, 409))},
        "/minipacs/imageinfo/{name}": _operation("What a PNG shows and how it was made",
                                                 _ref("ImageInfo"), parameters=[_uid("name", _FILE_NAME)]),
        "/minipacs/images/{uid}/png": _operation("The rendered PNG", None, content="image/png",
                                                 parameters=[_uid()]),
        "/minipacs/images/{uid}/score": _operation("The image's score", _ref("Score"), parameters=[_uid()]),
        "/minipacs/images/{uid}/review": {
            **_operation("The image's current review and its history", _ref("ImageReviews"),
                         parameters=[_uid()]),
            **_operation("Review the image: confirm or dismiss its flag, or report a missed anomaly; "
                         "replaces its current verdict (the history is kept)", _ref("ImageReviews"),
                         parameters=[_uid()], method="post", body=_REVIEW)},
        "/minipacs/reviews": _operation(
            "Reviewed images, the latest review first; reviewed=false: the flagged images nobody "
            "reviewed, most anomalous first", _page("ReviewedImage"), errors=(),
            parameters=PAGING + [{"name": k, "in": "query", "schema": _STRING}
                                 for k in ("patient", "study", "series", "modality", "model_version")]
            + [{"name": "reviewed", "in": "query", "schema": _TRUE_FALSE},
               {"name": "verdict", "in": "query", "schema": {"enum": list(reviews.VERDICTS)}},
               {"name": "reason", "in": "query", "schema": {"enum": list(reasons.FILTERS[:-1])},
                "description": "The reviewer's reason, or its family"},
               {"name": "agrees", "in": "query", "schema": _TRUE_FALSE,
                "description": "whether the verdict agrees with the image's flag now"}]),
        "/minipacs/studies/{uid}/summary": _operation("Images, flagged, max score", _ref("Summary"),
                                                      parameters=[_uid()]),
        "/minipacs/studies/{uid}/kos": {
            **_operation("The study's Key Object Selection document made by minipacs", _ref("KeyObject"),
                         parameters=[_uid()]),
            **_operation("Write the study's KOS (Rejected for Quality Reasons) anew: its flagged, "
                         "confirmed and reported images, not the dismissed; replaces the previous one",
                         _ref("KeyObject"), parameters=[_uid()], method="post")},
        "/minipacs/series/{uid}/summary": _operation("Images, flagged, max score", _ref("Summary"),
                                                     parameters=[_uid()]),
    }
    for what in ("studycount", "seriescount", "imagecount", "counts"):
        paths[f"/minipacs/patients/{{uid}}/{what}"] = _operation(
            f"The patient's {what}", _ref("PatientCounts"), parameters=[_uid()])
    levels = (("patients", "Patient", "studies", "Study"), ("studies", "Study", "series", "Series"),
              ("series", "Series", "images", "Image"), ("images", "Image", None, None))
    for name, item, child, child_item in levels:
        extra = [{"name": "status", "in": "query", "schema": {
            "enum": ["rendered", "no_pixel_data", "render_failed", "unreadable", "write_failed"]}}] if name == "images" else []
        paths[f"/minipacs/{name}"] = _operation(f"A page of {name}", _page(item),
                                                parameters=PAGING + extra, errors=())
        paths[f"/minipacs/{name}/count"] = _operation(f"How many {name}", _ref("Count"), errors=())
        paths[f"/minipacs/{name}/{{uid}}"] = _operation(f"One of the {name}", _ref(item), parameters=[_uid()])
        if child:
            paths[f"/minipacs/{name}/{{uid}}/{child}"] = _operation(
                f"A page of its {child}", _page(child_item), parameters=[_uid()] + PAGING)
    return {"openapi": "3.1.0",
            "info": {"title": "minipacs", "version": __version__,
                     "description": "Rendered, indexed and scored DICOM, inside Orthanc."},
            "paths": paths, "components": {"schemas": SCHEMAS}}
