"""The script Orthanc's Python plugin loads (``"PythonScript"`` in orthanc.json).

Thin callbacks, as in Orthanc's own samples: storing only queues the instance ID, HTTP requests
go to :class:`minipacs.routes.Router` (and :class:`minipacs.static.OhifSite`), and the ingest
worker does the rest in its own thread. This is the only module that imports ``orthanc``. If
minipacs cannot start (a bad configuration, an unreadable index), Orthanc still runs and stores:
``/minipacs`` then answers 503 with the reason, and the index catches up once it is fixed.
"""

import contextlib
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import uuid
import warnings

import orthanc

from minipacs import __version__
from minipacs.client import Orthanc as OrthancClient
from minipacs.config import from_orthanc
from minipacs.index import WRITE_FAILED, Index
from minipacs.kos import KeyObjects
from minipacs.ingest import Settings
from minipacs.reconcile import reconcile, remove, sweep
from minipacs.orthanc_ids import OrthancIds
from minipacs.render import image_array
from minipacs.rescore import Rescorer
from minipacs.reviews import reviewer_from
from minipacs.routes import Response, Router, json_response
from minipacs.sandbox import Sandbox
from minipacs.scoring import ModelSlot, Score
from minipacs.static import OhifSite, official_plugin
from minipacs.worker import Pipeline, Worker


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


# Every callable handed to RegisterRestCallback, for the interpreter's whole life. orthanc-python
# 5.0 (Debian 13) drops its reference to each REST callback while finalizing, without the GIL:
# if that was the last reference (a bound method, a lambda), the object is freed there and Orthanc
# dies with SIGSEGV/SIGABRT at every stop. A module-level function, or one kept here, survives.
_REST_CALLBACKS: list = []


def register_rest(uri: str, callback) -> None:
    _REST_CALLBACKS.append(callback)
    orthanc.RegisterRestCallback(uri, callback)


log = logging.getLogger("minipacs")
log.addHandler(_OrthancLog())
log.setLevel(logging.INFO)
log.propagate = False
# pydicom both logs and warns about every odd value it reads: keep one copy, for --verbose.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
logging.getLogger("pydicom").addHandler(_OrthancLog(quiet=True))
logging.getLogger("pydicom").propagate = False

# Scores Orthanc itself shows (MiniPacs.PublishToOrthanc, see Lookup): instance metadata declared
# in "UserMetadata", and a label on studies with a flagged image (Orthanc 1.12 and later).
SCORE_METADATA, FLAG_METADATA, FLAG_LABEL = "MiniPacsAnomalyScore", "MiniPacsFlagged", "minipacs-flagged"
REASON_METADATA = "MiniPacsAnomalyReason"
PIXEL_FORMATS = {value: name for name, value in vars(orthanc.PixelFormat).items()
                 if not name.startswith("_")}
LEVELS = {orthanc.ResourceType.PATIENT: "patients", orthanc.ResourceType.STUDY: "studies",
          orthanc.ResourceType.SERIES: "series", orthanc.ResourceType.INSTANCE: "images"}


def rest_get(uri: str) -> dict:
    return json.loads(orthanc.RestApiGet(uri))


@functools.cache
def orthanc_features() -> dict:
    """What this Orthanc offers, as its /system says (asked once, never from a store callback).
    Labels where it says HasLabels: 1.12 added both, and a database plugin without labels says
    False."""
    system = rest_get("/system")
    return {"version": system["Version"], "api_version": system.get("ApiVersion"),
            "labels": bool(system.get("HasLabels"))}


class Lookup:
    """Orthanc, asked from the worker threads only (never from a store callback).

    ``publish`` is what scores Orthanc itself shows (``MiniPacs.PublishToOrthanc``): ``none``
    (the default) nothing, so Orthanc's API and change log are bare Orthanc's; ``flagged`` a
    flagged image's reason, one write; ``all`` every image's score and flag too (two change-log
    entries per instance). Metadata must be declared in ``UserMetadata``; labels (Orthanc >= 1.12)
    mark studies with a flagged image in both publishing modes. With ``AutomaticKeyObjects``, a
    flag set or cleared schedules the study's KOS (``key_objects``). Writes to an instance deleted
    meanwhile are dropped quietly."""

    def __init__(self, index: Index, publish: str, declared: set[str],
                 revisions: OrthancClient | None = None, key_objects: KeyObjects | None = None):
        self.index, self.mode, self.revisions = index, publish, revisions
        self.key_objects = key_objects if key_objects is not None and key_objects.automatic else None
        self.scores = publish == "all" and {SCORE_METADATA, FLAG_METADATA} <= declared
        self.reasons = publish != "none" and REASON_METADATA in declared

    def _put(self, uri: str, value: str) -> None:
        with gone_quietly():
            if self.revisions:  # CheckRevisions: over HTTP, which can say If-Match
                self.revisions.revised("PUT", uri, value.encode())
            else:
                orthanc.RestApiPut(uri, value)

    def _delete(self, uri: str) -> None:
        with gone_quietly():
            if self.revisions:
                self.revisions.revised("DELETE", uri)
            else:
                orthanc.RestApiDelete(uri)

    def tags(self, instance_id: str) -> dict:
        return rest_get(f"/instances/{instance_id}/simplified-tags")

    def ids(self, instance_id: str) -> OrthancIds:
        series = rest_get(f"/instances/{instance_id}/series")
        study = rest_get(f"/series/{series['ID']}/study")
        return OrthancIds(study["ParentPatient"], study["ID"], series["ID"], instance_id)

    def decode(self, data: bytes, frame: int):
        image = orthanc.DecodeDicomImage(data, frame)
        return image_array(image.GetImageBuffer(), image.GetImageWidth(), image.GetImageHeight(),
                           image.GetImagePitch(), PIXEL_FORMATS[image.GetImagePixelFormat()])

    def publish(self, instance_id: str, study_id: str, score: Score, was_flagged: bool) -> None:
        if self.scores:
            self._put(f"/instances/{instance_id}/metadata/{SCORE_METADATA}", f"{score.anomaly_score:.6f}")
            self._put(f"/instances/{instance_id}/metadata/{FLAG_METADATA}", "1" if score.flagged else "0")
        if self.reasons and score.flagged and score.reason:
            self._put(f"/instances/{instance_id}/metadata/{REASON_METADATA}", score.reason)
        elif self.reasons and was_flagged:  # a rescore cleared the flag: so does Orthanc's copy
            self._delete(f"/instances/{instance_id}/metadata/{REASON_METADATA}")
        if self.mode != "none" and (score.flagged or was_flagged):  # else the label cannot change
            self.label(study_id)
        if self.key_objects is not None and (score.flagged or was_flagged):
            self.key_objects.schedule(study_id)

    def label(self, study_id: str) -> None:
        """Give the study the flag label while the index holds a flagged image of it, and take it
        away once none is left (a rescore, a deletion). Read first: most images change nothing,
        and a write is a transaction of Orthanc's database."""
        if not orthanc_features()["labels"]:
            return
        flagged = self.index.study_flagged(study_id)
        if flagged is None:
            return
        with gone_quietly():  # the study deleted meanwhile (its instances' DELETED come later)
            labelled = FLAG_LABEL in rest_get(f"/studies/{study_id}/labels")
            if flagged and not labelled:
                orthanc.RestApiPut(f"/studies/{study_id}/labels/{FLAG_LABEL}", "")
            elif labelled and not flagged:
                orthanc.RestApiDelete(f"/studies/{study_id}/labels/{FLAG_LABEL}")


def store_instance(data: bytes) -> str:
    """Store a DICOM file minipacs wrote (a KOS) in Orthanc; its Orthanc ID."""
    return json.loads(orthanc.RestApiPost("/instances", data))["ID"]


def delete_instance(instance_id: str) -> None:
    with gone_quietly():  # deleted meanwhile, by hand or with its study
        orthanc.RestApiDelete(f"/instances/{instance_id}")


@contextlib.contextmanager
def gone_quietly():
    """A write to an instance Orthanc deleted meanwhile (a client emptying Orthanc right after
    storing): nothing to publish, and nothing to alarm an operator with."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    except orthanc.OrthancException as exc:
        if exc.args[:1] != (orthanc.ErrorCode.UNKNOWN_RESOURCE,):
            raise


def revisions_client(configuration: dict) -> OrthancClient | None:
    """Where Orthanc checks revisions (``CheckRevisions``), a metadata write must say which
    revision it replaces (``If-Match``), which orthanc-python's in-process calls cannot: those
    writes go to Orthanc's own HTTP port, with a token Orthanc grants its plugins."""
    if not configuration.get("CheckRevisions", False):
        return None
    scheme = "https" if configuration.get("SslEnabled", False) else "http"
    client = OrthancClient(f"{scheme}://127.0.0.1:{configuration.get('HttpPort', 8042)}")
    client.headers["Authorization"] = orthanc.GenerateRestApiAuthorizationToken()
    return client


def answer(output, response: Response) -> None:
    """Send a Response through Orthanc's REST output. A 405 has no body: Orthanc (1.10.1) refuses
    one, SendHttpStatus(405, ...) and SendHttpStatusCode(405) alike, and drops the connection."""
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
        try:  # orthanc-python 5.0 takes the body alone
            output.SendHttpStatus(response.status, body)
        except TypeError:  # 4.0 wants its size too, and refuses two arguments before sending
            output.SendHttpStatus(response.status, body, len(body))


class MiniPacs:
    """Everything the plugin runs, built from Orthanc's configuration."""

    def __init__(self, configuration: dict):
        self.config = config = from_orthanc(configuration)
        self.started = time.time()
        config.png_directory.mkdir(parents=True, exist_ok=True)
        if config.postgresql:  # several nodes, one index (psycopg only where it is used)
            from minipacs.index_pg import PostgresIndex
            node = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            self.index = PostgresIndex(config.postgresql, node, config.claim_lease)
        else:
            self.index = Index(config.database)
        self.settings = Settings(config.png_directory, config.png_compress_level, config.window_index)
        declared = set(configuration.get("UserMetadata", {}))
        wanted = {"all": {SCORE_METADATA, FLAG_METADATA, REASON_METADATA},
                  "flagged": {REASON_METADATA}, "none": set()}[config.publish]
        if wanted - declared:
            log.warning("PublishToOrthanc is %r: declare %s in UserMetadata to see scores in "
                        "Orthanc", config.publish, ", ".join(sorted(wanted - declared)))
        self.key_objects = KeyObjects(self.index, store_instance, delete_instance,
                                      lambda study: rest_get(f"/studies/{study}"), config.automatic_key_objects)
        self.lookup = Lookup(self.index, config.publish, declared, revisions_client(configuration),
                             self.key_objects)
        self.models = ModelSlot(config.model_path, config.anomaly_threshold)
        self.models.try_load()
        if self.models.error:
            log.warning("scoring is off: %s", self.models.error)
        self.sandbox = Sandbox(self.settings, self.model_for_sandbox, config.renderer_memory_mb,
                               config.renderer_seconds, size=config.workers) if config.sandbox else None
        self.worker = Worker(self.process, config.queue_size, config.workers,
                             defer=config.defer_while_storing)
        self.pipeline = Pipeline(self.index, self.settings, self.lookup, self.models,
                                 orthanc.GetDicomForInstance, self.worker.submit,
                                 self.sandbox.render if self.sandbox else None)
        self.stopping = threading.Event()
        self.follower = self.feeder = None
        if config.postgresql:
            from minipacs.cluster import ChangeFollower, Feeder
            self.feeder = Feeder(self.index, self.worker.submit, lambda: self.worker.stats()["queued"],
                                 self.lookup, config.attempts)
            self.follower = ChangeFollower(self.index, changes, self.feeder.wakeup.set)
        rescorer = Rescorer(self.index, config.png_directory, self.models, self.lookup.publish)
        self.router = Router(self.index, config.png_directory, self.ingest_stats, self.models,
                             rescorer, lambda: {**orthanc_features(),
                                                "metadata": self.lookup.scores or self.lookup.reasons,
                                                "publish": config.publish}, self.key_objects)
        # Orthanc checks the HTTP Basic user only with authentication on (its default: on
        # where remote access is allowed); otherwise the header is anyone's claim.
        self.authenticated = configuration.get("AuthenticationEnabled",
                                               configuration.get("RemoteAccessAllowed", False)) is True
        self.official_ohif = official_plugin(configuration.get("Plugins", []))
        self.ohif = OhifSite(config.ohif_directory,
                             configuration.get("DicomWeb", {}).get("Root", "/dicom-web/"))

    def model_for_sandbox(self) -> dict | None:
        """The model in use, as the sandboxed renderers load it."""
        scorer = self.models.scorer
        if scorer is None:
            return None
        info = scorer.info
        return {"path": info.path, "sha256": info.sha256, "threshold": info.threshold}

    def ingest_stats(self) -> dict:
        cluster = {"node": self.index.node, "changes_followed": self.follower.followed} if self.follower else {}
        return {**self.worker.stats(), **cluster, "retrying": self.pipeline.retries.pending(),
                "gone": self.pipeline.gone,
                "renderers": self.sandbox.ready() if self.sandbox else 0,
                "renderers_replaced": self.sandbox.deaths if self.sandbox else 0,
                "key_objects_pending": self.key_objects.pending()}

    def process(self, instance_ids: list[str]) -> None:
        # Called in a worker thread, never in Orthanc's store thread.
        self.pipeline(instance_ids)

    def reconcile(self) -> None:
        if self.feeder:  # into the cluster's queue; the node that takes one gives it up if need be
            reconcile(self.index, self.config.png_directory, lambda: set(rest_get("/instances")),
                      self.enqueue)
        else:
            reconcile(self.index, self.config.png_directory, lambda: set(rest_get("/instances")),
                      self.worker.submit, self.lookup, self.config.attempts)

    def enqueue(self, instance_id: str) -> None:
        self.index.enqueue([instance_id])
        self.feeder.wakeup.set()

    def keep_reconciled(self) -> None:
        """At start, then whenever the worker is idle and the counts differ or Orthanc stored
        something since the last comparison (its change log moved: a stale row beside a missing
        one leaves the counts equal), and every tenth time in any case: the index follows Orthanc
        by identity even after a crash, a full queue, a missed deletion, or changes made while
        minipacs was off. At start, PNGs that failed to be written are retried and files without
        a row removed."""
        config = self.config
        if self.follower:  # where the change log is followed from, before Orthanc is compared
            try:
                self.follower.step()
            except Exception:
                log.exception("following Orthanc's change log failed")
        if config.reconcile_on_start:
            self.reconcile()
            for instance_id in sorted(self.index.orthanc_instance_ids(WRITE_FAILED)):
                self.worker.submit(instance_id)
            sweep(self.index, config.png_directory, self.started)
        if self.sandbox:
            try:
                self.sandbox.start()
            except Exception as exc:  # storing and indexing go on, without the isolation
                log.error("the sandboxed renderers cannot start (%s): rendering in Orthanc's "
                          "process instead", exc)
                self.pipeline.renderer = None
        if self.follower:
            for name, target in (("minipacs-changes", self.follower.run), ("minipacs-feeder", self.feeder.run)):
                threading.Thread(target=target, args=(self.stopping,), name=name, daemon=True).start()
        rounds, compared = 0, rest_get("/changes?last")["Last"]
        while config.reconcile_interval and not self.stopping.wait(config.reconcile_interval):
            rounds += 1
            if not self.worker.stats()["idle"]:
                continue
            stored, last = rest_get("/statistics")["CountInstances"], rest_get("/changes?last")["Last"]
            if rounds % 10 == 0 or last != compared or stored != self.index.counts()["images"]:
                compared = last
                self.reconcile()
                if self.follower:  # a killed node's renderings left PNGs that no node will write
                    sweep(self.index, config.png_directory, time.time() - config.claim_lease)

    def on_change(self, change_type, level, resource_id) -> None:
        # Orthanc signals changes from a thread of its own, after the store: never in its way.
        if self.follower and change_type == orthanc.ChangeType.NEW_INSTANCE:
            # Several nodes: the change log tells every node (minipacs.cluster); here, only the
            # arrival (storing first). A deletion is this node's to apply, as on one node.
            self.worker.arrived()
            self.follower.wakeup.set()
        elif change_type == orthanc.ChangeType.NEW_INSTANCE:
            self.worker.stored(resource_id)
        elif change_type == orthanc.ChangeType.DELETED and level in LEVELS:
            study = self.index.study_of(LEVELS[level], resource_id)
            remove(self.index, self.config.png_directory, LEVELS[level], resource_id,
                   self.pipeline.deletions)
            if study is not None and self.lookup.mode != "none":  # its last flagged image may be gone
                try:
                    self.lookup.label(study)
                except Exception:  # the label is a convenience; the index has the flags
                    log.exception("updating the label of study %s failed", study)
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            threading.Thread(target=self.keep_reconciled, name="minipacs-reconcile", daemon=True).start()
            if self.key_objects.automatic:
                threading.Thread(target=self.key_objects.run, args=(self.stopping,), name="minipacs-kos",
                                 daemon=True).start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.stopping.set()
            if self.sandbox:  # first: a worker in the middle of a long render returns at once
                self.sandbox.close()
            self.worker.stop()
            if self.feeder:  # what this node held goes back to the queue at once
                self.index.let_go()

    def on_rest(self, output, uri, **request) -> None:
        groups = request.get("groups") or ("",)
        user = reviewer_from(request.get("headers") or {}, self.authenticated)
        answer(output, self.router.handle(request["method"], groups[0], request.get("get") or {},
                                          request.get("body") or b"", user))

    def on_ohif(self, output, uri, **request) -> None:
        groups = request.get("groups") or ("",)
        answer(output, self.ohif.handle(request["method"], groups[0]))

    def register(self) -> None:
        self.worker.start()
        orthanc.RegisterOnChangeCallback(self.on_change)
        for uri in ("/minipacs", "/minipacs/(.*)"):
            register_rest(uri, self.on_rest)
        if self.official_ohif:
            log.warning("Orthanc's OHIF plugin (%s) serves /ohif/: minipacs links to it",
                        self.official_ohif)
        else:
            for uri in ("/ohif", "/ohif/(.*)"):
                register_rest(uri, self.on_ohif)
        where = f"PostgreSQL (node {self.index.node})" if self.follower else self.config.database
        log.warning("minipacs %s: index %s, PNGs in %s", __version__, where, self.config.png_directory)


def changes(since: int | None) -> dict:
    """A page of Orthanc's change log after ``since`` (None: its last change)."""
    return rest_get("/changes?last" if since is None else f"/changes?since={since}&limit=1000")


def register_failure(error: Exception) -> None:
    """minipacs could not start: say why on its routes, and leave Orthanc running."""
    failed = json_response({"error": f"minipacs is not running: {type(error).__name__}: {error}",
                            "status": 503}, 503)
    for uri in ("/minipacs", "/minipacs/(.*)"):
        register_rest(uri, lambda output, uri, **request: answer(output, failed))


# Orthanc's threads need the GIL to queue an instance or answer a route: let the worker's Python
# code hand it over sooner than the default 5 ms.
sys.setswitchinterval(0.0005)
try:
    MiniPacs(json.loads(orthanc.GetConfiguration())).register()
except Exception as error:  # never take Orthanc down: it keeps storing, we catch up later
    log.exception("minipacs failed to start")
    register_failure(error)
