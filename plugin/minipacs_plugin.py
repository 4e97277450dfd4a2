"""The script Orthanc's Python plugin loads (``"PythonScript"`` in orthanc.json).

Thin callbacks, as in Orthanc's own samples: storing only queues the instance ID, HTTP requests
go to :class:`minipacs.routes.Router`, and the ingest worker does the rest in its own thread.
This is the only module that imports ``orthanc``.
"""

import functools
import json
import logging
import threading
import warnings

import orthanc

from minipacs import __version__
from minipacs.config import from_orthanc
from minipacs.index import Index
from minipacs.ingest import Settings, Worker, ingest, reconcile, remove
from minipacs.orthanc_ids import OrthancIds
from minipacs.render import image_array
from minipacs.rescore import Rescorer
from minipacs.scoring import ModelSlot, Score
from minipacs.routes import Router
from minipacs.static import OhifSite


class _OrthancLog(logging.Handler):
    """Send log records to Orthanc's log (all at info level when ``quiet``)."""

    def __init__(self, quiet: bool = False):
        super().__init__()
        self.quiet = quiet

    def emit(self, record: logging.LogRecord) -> None:
        message = f"{record.name}: {self.format(record)}"
        if self.quiet:
            orthanc.LogInfo(message)
        elif record.levelno >= logging.ERROR:
            orthanc.LogError(message)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(message)
        else:
            orthanc.LogInfo(message)


log = logging.getLogger("minipacs")
log.addHandler(_OrthancLog())
log.setLevel(logging.INFO)
log.propagate = False
# pydicom both logs and warns about every odd value it reads: keep one copy, for --verbose.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
logging.getLogger("pydicom").addHandler(_OrthancLog(quiet=True))
logging.getLogger("pydicom").propagate = False

orthanc_configuration = json.loads(orthanc.GetConfiguration())
config = from_orthanc(orthanc_configuration)
config.png_directory.mkdir(parents=True, exist_ok=True)
index = Index(config.database)
settings = Settings(config.png_directory, config.png_compress_level, config.window_index)


class Lookup:
    """Orthanc's REST API, asked from the worker thread only (never from a store callback)."""

    @staticmethod
    def get(uri: str) -> dict:
        return json.loads(orthanc.RestApiGet(uri))

    def tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def ids(self, instance_id: str) -> OrthancIds:
        series = self.get(f"/instances/{instance_id}/series")
        study = self.get(f"/series/{series['ID']}/study")
        return OrthancIds(study["ParentPatient"], study["ID"], series["ID"], instance_id)

    def decode(self, data: bytes, frame: int):
        image = orthanc.DecodeDicomImage(data, frame)
        return image_array(image.GetImageBuffer(), image.GetImageWidth(), image.GetImageHeight(),
                           image.GetImagePitch(), PIXEL_FORMATS[image.GetImagePixelFormat()])

    def publish(self, instance_id: str, study_id: str, score: Score) -> None:
        if METADATA_NAMES <= declared_metadata:
            orthanc.RestApiPut(f"/instances/{instance_id}/metadata/{SCORE_METADATA}",
                               f"{score.anomaly_score:.6f}")
            orthanc.RestApiPut(f"/instances/{instance_id}/metadata/{FLAG_METADATA}",
                               "1" if score.flagged else "0")
        if score.flagged and features()["labels"]:
            orthanc.RestApiPut(f"/studies/{study_id}/labels/{FLAG_LABEL}", "")


# Scores are also kept in Orthanc: as instance metadata (declared in "UserMetadata"), and as a
# label on studies with a flagged image where Orthanc has labels (1.12 and later).
SCORE_METADATA, FLAG_METADATA, FLAG_LABEL = "MiniPacsAnomalyScore", "MiniPacsFlagged", "minipacs-flagged"
METADATA_NAMES = {SCORE_METADATA, FLAG_METADATA}
declared_metadata = set(orthanc_configuration.get("UserMetadata", {}))
if not METADATA_NAMES <= declared_metadata:
    log.warning("declare %s in UserMetadata to see scores in Orthanc", sorted(METADATA_NAMES))


@functools.cache
def features() -> dict:
    """What the running Orthanc offers (asked once, outside any callback)."""
    version = json.loads(orthanc.RestApiGet("/system"))["Version"]
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return {"version": version, "labels": numbers >= (1, 12),
            "metadata": sorted(METADATA_NAMES & declared_metadata)}


PIXEL_FORMATS = {value: name for name, value in vars(orthanc.PixelFormat).items()
                 if not name.startswith("_")}


def process(instance_id: str) -> None:
    # Called in the worker thread, never in Orthanc's store thread.
    ingest(index, settings, instance_id, orthanc.GetDicomForInstance(instance_id), Lookup(), models)


models = ModelSlot(config.model_path, config.anomaly_threshold)
models.try_load()
if models.error:
    log.warning("scoring is off: %s", models.error)
worker = Worker(process, config.queue_size)
rescorer = Rescorer(index, config.png_directory, models, Lookup().publish)
router = Router(index, config.png_directory, worker.stats, models, rescorer, features)


def orthanc_instances() -> set[str]:
    return set(json.loads(orthanc.RestApiGet("/instances")))


def keep_reconciled() -> None:
    """At start, then whenever the worker is idle and the counts differ: the index follows
    Orthanc even after a crash, a full queue, or changes made while minipacs was off."""
    if config.reconcile_on_start:
        reconcile(index, config.png_directory, orthanc_instances(), worker.submit)
    while config.reconcile_interval and not stopping.wait(config.reconcile_interval):
        stored = json.loads(orthanc.RestApiGet("/statistics"))["CountInstances"]
        if worker.stats()["idle"] and stored != index.counts()["images"]:
            reconcile(index, config.png_directory, orthanc_instances(), worker.submit)


stopping = threading.Event()
LEVELS = {orthanc.ResourceType.PATIENT: "patients", orthanc.ResourceType.STUDY: "studies",
          orthanc.ResourceType.SERIES: "series", orthanc.ResourceType.INSTANCE: "images"}


def on_stored_instance(dicom, instance_id: str) -> None:
    worker.submit(instance_id)


def on_change(change_type, level, resource_id) -> None:
    if change_type == orthanc.ChangeType.DELETED and level in LEVELS:
        remove(index, config.png_directory, LEVELS[level], resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        threading.Thread(target=keep_reconciled, name="minipacs-reconcile", daemon=True).start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        stopping.set()
        worker.stop()


def on_rest(output, uri, **request) -> None:
    groups = request.get("groups") or ("",)
    response = router.handle(request["method"], groups[0], request.get("get") or {},
                             request.get("body") or b"")
    if response.status == 200:
        output.AnswerBuffer(response.body, response.content_type)
    elif response.status == 405:
        output.SendMethodNotAllowed(response.headers["Allow"])
    else:
        body = response.body.decode("ascii")
        output.SetHttpHeader("Content-Type", response.content_type)
        output.SendHttpStatus(response.status, body, len(body))


# OHIF at /ohif/, reading Orthanc's DICOMweb plugin on the same origin.
ohif = OhifSite(config.ohif_directory,
                orthanc_configuration.get("DicomWeb", {}).get("Root", "/dicom-web/"))


def on_ohif(output, uri, **request) -> None:
    groups = request.get("groups") or ("",)
    response = ohif.handle(request["method"], groups[0])
    for name, value in response.headers.items():
        if name != "Allow":
            output.SetHttpHeader(name, value)
    if response.status == 200:
        output.AnswerBuffer(response.body, response.content_type)
    elif response.status == 405:
        output.SendMethodNotAllowed(response.headers["Allow"])
    else:
        body = response.body.decode("ascii")
        output.SetHttpHeader("Content-Type", response.content_type)
        output.SendHttpStatus(response.status, body, len(body))


worker.start()
orthanc.RegisterOnStoredInstanceCallback(on_stored_instance)
orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/minipacs", on_rest)
orthanc.RegisterRestCallback("/minipacs/(.*)", on_rest)
orthanc.RegisterRestCallback("/ohif", on_ohif)
orthanc.RegisterRestCallback("/ohif/(.*)", on_ohif)
log.warning("minipacs %s: index %s, PNGs in %s", __version__, config.database, config.png_directory)
