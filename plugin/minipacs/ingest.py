"""The ingest pipeline: one stored instance → PNG + index rows + status, off Orthanc's store path.

Orthanc's change notification of a new instance only queues its ID (an OnStoredInstance
callback would run in the storing thread, under the GIL); a :class:`Worker` thread fetches the
file and runs :func:`ingest`, after any burst that Orthanc is storing. Every outcome is recorded
as a status: the worker never raises into Orthanc.
"""

import collections
import contextlib
import io
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from . import index as idx
from .orthanc_ids import OrthancIds, orthanc_ids
from .render import Decoder, NoPixelData, RenderError, encode_png, render
from .scoring import ModelSlot, Score, score_columns

log = logging.getLogger("minipacs")
WORKER_NICENESS = 10
BATCH = 16  #: instances a worker thread takes at once from a backlog

#: Tags of an instance as Orthanc's ``/instances/{id}/simplified-tags`` gives them.
Tags = Mapping[str, Any]


class OrthancLookup(Protocol):
    """What the worker may ask Orthanc (from its own thread), when the file alone is not enough."""

    def tags(self, instance_id: str) -> Tags:
        """The instance's tags, for files that pydicom cannot read."""

    def ids(self, instance_id: str) -> OrthancIds:
        """The instance's Orthanc IDs and those of its parents."""

    def decode(self, data: bytes, frame: int) -> np.ndarray:
        """Stored values of a frame by Orthanc's decoder, for files pydicom cannot decode."""

    def publish(self, instance_id: str, study_id: str, score: Score) -> None:
        """Make a score visible in Orthanc itself (instance metadata, study label)."""


@dataclass(frozen=True)
class Settings:
    png_directory: Path
    png_compress_level: int = 1
    window_index: int = 0


def _text(source: Dataset | Tags, keyword: str) -> str | None:
    """A value as text; several values joined by a backslash, as DICOM encodes them (PS3.5 6.4)
    and as Orthanc's simplified tags give them."""
    value = source.get(keyword)
    if value is None:
        return None
    text = ("\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)).strip()
    return text or None


def _int(source: Dataset | Tags, keyword: str) -> int | None:
    try:
        return int(float(_text(source, keyword)))
    except (TypeError, ValueError):
        return None


def describe(source: Dataset | Tags, instance_id: str, lookup: OrthancLookup) -> idx.InstanceRecord:
    """The hierarchy rows of an instance, from a pydicom dataset or Orthanc's simplified tags.

    The Orthanc IDs are computed from the identifiers; where Orthanc read them differently
    (odd padding in a malformed file, say) Orthanc is asked, so the rows match its resources.
    """
    patient_id = _text(source, "PatientID") or ""
    study_uid = _text(source, "StudyInstanceUID") or ""
    series_uid = _text(source, "SeriesInstanceUID") or ""
    sop_uid = _text(source, "SOPInstanceUID") or ""
    ids = orthanc_ids(patient_id, study_uid, series_uid, sop_uid)
    if ids.instance != instance_id:
        ids = lookup.ids(instance_id)
    return idx.InstanceRecord(
        patient={"orthanc_id": ids.patient, "patient_id": patient_id,
                 "patient_name": _text(source, "PatientName"),
                 "birth_date": _text(source, "PatientBirthDate"), "sex": _text(source, "PatientSex")},
        study={"orthanc_id": ids.study, "study_uid": study_uid,
               "study_date": _text(source, "StudyDate"),
               "description": _text(source, "StudyDescription"),
               "accession_number": _text(source, "AccessionNumber")},
        series={"orthanc_id": ids.series, "series_uid": series_uid,
                "modality": _text(source, "Modality"),
                "series_number": _int(source, "SeriesNumber"),
                "description": _text(source, "SeriesDescription")},
        image={"orthanc_id": instance_id, "sop_uid": sop_uid,
               "sop_class_uid": _text(source, "SOPClassUID"),
               "instance_number": _int(source, "InstanceNumber"),
               "rows": _int(source, "Rows"), "columns": _int(source, "Columns")},
    )


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def score_images(models: ModelSlot | None, images: list[np.ndarray]) -> list[tuple[Score | None, dict]]:
    """Score rendered pixels with the model in use, if any, as one batch (about half the cost
    per image of one call each); each image's score and its index columns.

    A failing model costs the scores, never the images: the failure is logged and noted."""
    scorer = models.scorer if models else None
    if scorer is None or not images:
        return [(None, score_columns(None)) for _ in images]
    try:
        scores = scorer.scores(images)
    except Exception as exc:
        log.exception("scoring %d image(s) failed", len(images))
        return [(None, {**score_columns(None), "status_detail": f"scoring failed: {exc}"}) for _ in images]
    scored_at = now()
    return [(score, {**score_columns(score), "scored_at": scored_at}) for score in scores]


def write_png(path: Path, data: bytes) -> None:
    """Write a PNG so that no reader sees half of it. A new file is written in place: readers
    find PNGs through the index, whose row comes after; one that exists (a re-sent instance)
    is replaced through a temporary file, the rename costing a third more on this disk."""
    try:
        with open(path, "xb") as new:
            new.write(data)
        return
    except FileExistsError:
        pass
    partial = path.with_suffix(".png.part")
    partial.write_bytes(data)
    os.replace(partial, path)


def _render_columns(ds: Dataset, png_path: Path, settings: Settings,
                    fallback: Decoder) -> tuple[dict[str, Any], np.ndarray | None]:
    """Render the first frame to ``png_path``; the image columns that describe the outcome,
    and the pixels shown (None when nothing could be rendered)."""
    try:
        shown = render(ds, 0, settings.window_index, fallback)
    except NoPixelData as exc:
        return {"status": idx.NO_PIXEL_DATA, "status_detail": str(exc)}, None
    except RenderError as exc:
        return {"status": idx.RENDER_FAILED, "status_detail": str(exc)}, None
    except Exception as exc:  # a decoder bug must cost one image, not the worker
        log.exception("rendering %s failed unexpectedly", png_path.stem)
        return {"status": idx.RENDER_FAILED, "status_detail": f"{type(exc).__name__}: {exc}"}, None
    write_png(png_path, encode_png(shown.pixels, settings.png_compress_level))
    return {"status": idx.RENDERED, "status_detail": shown.notes or None,
            "png": png_path.name, "frames": shown.frames,
            "rendered_frame": shown.frame, "photometric": shown.photometric,
            "rescale_slope": shown.rescale_slope, "rescale_intercept": shown.rescale_intercept,
            "window_center": shown.window_center, "window_width": shown.window_width,
            "window_source": shown.window_source, "voi_function": shown.voi_function,
            "inverted": shown.inverted, "decoder": shown.decoder}, shown.pixels


_EMPTY_RENDER = dict.fromkeys(("status_detail", "png", "frames", "rendered_frame", "photometric",
                               "rescale_slope", "rescale_intercept", "window_center",
                               "window_width", "window_source", "voi_function", "inverted",
                               "decoder", "transfer_syntax", "anomaly_score", "flagged",
                               "anomaly_reason", "model_version", "threshold", "scored_at"))


def read_dataset(data: bytes) -> Dataset:
    """Parse a stored file; ``force`` because Orthanc keeps files without a preamble as sent."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "SOPInstanceUID" not in ds:
        raise InvalidDicomError("no SOP Instance UID where Orthanc found one")
    return ds


def _render_instance(settings: Settings, instance_id: str, data: bytes,
                     lookup: OrthancLookup) -> tuple[idx.InstanceRecord, np.ndarray | None]:
    """The index rows of one instance, its PNG written, and the pixels to score.

    Orthanc's tags are asked for only when pydicom cannot read the file, so that even an
    unreadable instance that Orthanc accepted gets its place in the hierarchy and a status;
    Orthanc's decoder only when pydicom's decoders fail.
    """
    png_path = settings.png_directory / f"{instance_id}.png"
    pixels = None
    try:
        ds = read_dataset(data)
    except Exception as exc:  # pydicom could not parse what DCMTK accepted
        record = describe(lookup.tags(instance_id), instance_id, lookup)
        columns = {**_EMPTY_RENDER, "status": idx.UNREADABLE,
                   "status_detail": f"pydicom cannot read the file: {type(exc).__name__}: {exc}"}
    else:
        record = describe(ds, instance_id, lookup)
        rendered, pixels = _render_columns(ds, png_path, settings, lambda f: lookup.decode(data, f))
        columns = {**_EMPTY_RENDER, "transfer_syntax": _text(ds.file_meta, "TransferSyntaxUID"),
                   "frames": _int(ds, "NumberOfFrames"), **rendered}
    if pixels is None:
        png_path.unlink(missing_ok=True)  # a re-sent instance that no longer renders
    image = {**record.image, **columns}
    return idx.InstanceRecord(record.patient, record.study, record.series, image), pixels


def ingest_many(index: idx.Index, settings: Settings, items: list[tuple[str, bytes]],
                lookup: OrthancLookup, models: ModelSlot | None = None) -> list[dict[str, Any]]:
    """Render, score and index instances given as (Orthanc ID, file); their image columns.

    The rendered images are scored together, in one run of the model."""
    records, pixels = zip(*(_render_instance(settings, instance_id, data, lookup)
                            for instance_id, data in items)) if items else ((), ())
    shown = [i for i, p in enumerate(pixels) if p is not None]
    scores = dict(zip(shown, score_images(models, [pixels[i] for i in shown])))
    for i, record in enumerate(records):
        columns = scores.get(i, (None, {}))[1]
        image = record.image
        detail = columns.pop("status_detail", None)
        image.update(columns)
        if detail:
            image["status_detail"] = "; ".join(filter(None, (image["status_detail"], detail)))
    index.put_many(records)
    for i, (score, _) in scores.items():
        if score is not None:
            image_id, study_id = records[i].image["orthanc_id"], records[i].study["orthanc_id"]
            try:
                lookup.publish(image_id, study_id, score)
            except Exception:  # Orthanc's copy of the flag is a convenience; the index has it
                log.exception("publishing the score of %s to Orthanc failed", image_id)
    return [record.image for record in records]


def ingest(index: idx.Index, settings: Settings, instance_id: str, data: bytes,
           lookup: OrthancLookup, models: ModelSlot | None = None) -> dict[str, Any]:
    """Render, score and index one instance; return its image columns."""
    return ingest_many(index, settings, [(instance_id, data)], lookup, models)[0]


def remove(index: idx.Index, png_directory: Path, table: str, orthanc_id: str) -> int:
    """Forget a resource Orthanc deleted: its rows, those under it, and their PNGs."""
    pngs = index.delete(table, orthanc_id)
    for name in pngs:
        (png_directory / name).unlink(missing_ok=True)
    return len(pngs)


def reconcile(index: idx.Index, png_directory: Path, in_orthanc: set[str],
              submit: Callable[[str], Any]) -> tuple[int, int]:
    """Make the index hold exactly Orthanc's instances: queue the missing ones, forget the
    deleted ones (stored or deleted while minipacs was not running, or dropped by a full
    queue). Returns (queued, removed)."""
    indexed = index.orthanc_instance_ids()
    missing, deleted = sorted(in_orthanc - indexed), sorted(indexed - in_orthanc)
    for instance_id in missing:
        submit(instance_id)
    for instance_id in deleted:
        remove(index, png_directory, "images", instance_id)
    if missing or deleted:
        log.warning("reconciled with Orthanc: %d instance(s) queued, %d forgotten",
                    len(missing), len(deleted))
    return len(missing), len(deleted)


class Worker:
    """Threads that run ``handle(instance_ids)`` on what is queued, counting outcomes.

    A thread takes up to ``batch`` IDs at once when they are waiting, so that a backlog is
    scored in batches; alone, an instance is handled at once. Decoding, deflate, SQLite and ONNX
    Runtime release the GIL, pydicom and the glue do not: two threads keep about 1.5 cores busy
    inside Orthanc (bench/ingest.py), a third adds nothing."""

    def __init__(self, handle: Callable[[list[str]], Any], queue_size: int, threads: int = 1,
                 batch: int = BATCH, defer: float = 0.0, burst: int = 3, burst_window: float = 0.03):
        self._handle = handle
        self._batch = batch
        self._queue: queue.Queue[str | None] = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"processed": 0, "failed": 0, "dropped": 0, "deferred_s": 0.0}
        self._threads = [threading.Thread(target=self._run, name=f"minipacs-ingest-{n}", daemon=True)
                         for n in range(threads)]
        # Storing first: while Orthanc stores a burst (``burst`` instances within
        # ``burst_window`` seconds), the threads wait, for at most ``defer`` seconds; past that
        # they catch up with the whole queue before waiting again.
        self._defer, self._burst_window = defer, burst_window
        self._arrivals: collections.deque[float] = collections.deque(maxlen=burst)
        self._catching_up = False

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, instance_id: str) -> bool:
        """Queue an instance without ever blocking the caller (Orthanc's change thread)."""
        try:
            self._queue.put_nowait(instance_id)
            return True
        except queue.Full:
            self._count("dropped")
            log.error("ingest queue full: instance %s is left for the next reconciliation",
                      instance_id)
            return False

    def stored(self, instance_id: str) -> bool:
        """Orthanc has just stored this instance: queue it, and note the arrival, so that the
        threads leave the CPU to Orthanc while a burst of instances is being stored."""
        self._arrivals.append(time.monotonic())
        return self.submit(instance_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the instances in hand, then stop; what is still queued waits for reconciliation."""
        self._stop.set()
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)  # wakes a thread waiting on an empty queue
            except queue.Full:
                break
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        # unfinished_tasks counts the instances in hand too, so "idle" means all caught up.
        pending = self._queue.unfinished_tasks
        return {**counts, "queued": pending, "idle": pending == 0,
                "deferring": bool(self._defer and self._storing_burst()) and not self._catching_up}

    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _take(self) -> list[str | None]:
        """The next ID, waiting for it, and up to ``batch - 1`` more that are already queued."""
        taken = [self._queue.get()]
        self._wait_for_storing()
        while len(taken) < self._batch and taken[-1] is not None:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _storing_burst(self) -> float:
        """Seconds until the current storing burst can end (0 when there is none)."""
        arrivals = self._arrivals
        if len(arrivals) < (arrivals.maxlen or 0):
            return 0.0
        left = arrivals[0] + self._burst_window - time.monotonic()
        return max(0.0, left)

    def _wait_for_storing(self) -> None:
        """Leave the CPU to Orthanc while it stores a burst, for at most ``defer`` seconds.

        Measured (bench/ingest.py): any CPU work beside a burst of uploads, even another
        process's at the lowest priority, slows storing by 15-30 % on a 2-core machine, while
        rendering after the burst costs the same CPU. Past ``defer`` the threads catch up with
        the whole queue, so the index never lags a long burst by more than about that."""
        if not self._defer or self._catching_up or not self._storing_burst():
            return
        start = time.monotonic()
        while (left := self._storing_burst()) and not self._stop.is_set():
            waited = time.monotonic() - start
            if waited >= self._defer:
                self._catching_up = True
                break
            time.sleep(min(left, self._defer - waited) + 0.001)
        self._count("deferred_s", time.monotonic() - start)

    def _run(self) -> None:
        # Orthanc's own threads (storing, answering) come first: the worker takes the CPU they
        # leave (Linux gives each thread its own nice value).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        while not self._stop.is_set():
            taken = self._take()
            try:
                self._process([i for i in taken if i is not None])
            finally:
                for _ in taken:
                    self._queue.task_done()
                if self._queue.unfinished_tasks == 0:
                    self._catching_up = False

    def _process(self, instance_ids: list[str]) -> None:
        if not instance_ids:
            return
        try:
            self._handle(instance_ids)
            self._count("processed", len(instance_ids))
        except Exception:
            if len(instance_ids) > 1:  # one bad instance must not cost the others: one by one
                for instance_id in instance_ids:
                    self._process([instance_id])
                return
            self._count("failed")
            log.exception("ingest of instance %s failed", instance_ids[0])
