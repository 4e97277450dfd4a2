"""The ingest pipeline: one stored instance → PNG + index rows + status, off Orthanc's store path.

Orthanc calls OnStoredInstance synchronously in the thread that stores the file, under the GIL,
so the callback only queues the instance ID; a :class:`Worker` thread fetches the file and runs
:func:`ingest`. Every outcome is recorded as a status: the worker never raises into Orthanc.
"""

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

from . import index as idx
from .orthanc_ids import OrthancIds, orthanc_ids
from .render import Decoder, NoPixelData, RenderError, encode_png, render
from .scoring import ModelSlot, Score, score_columns

log = logging.getLogger("minipacs")
WORKER_NICENESS = 10

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
    value = source.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
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


def score_image(models: ModelSlot | None, pixels: np.ndarray, name: str) -> tuple[Score | None, dict]:
    """Score rendered pixels with the model in use, if any; the score and its index columns.

    A failing model costs the score, never the image: the failure is logged and noted."""
    scorer = models.scorer if models else None
    if scorer is None:
        return None, score_columns(None)
    try:
        score = scorer.score(pixels)
    except Exception as exc:
        log.exception("scoring %s failed", name)
        return None, {**score_columns(None), "status_detail": f"scoring failed: {exc}"}
    return score, {**score_columns(score), "scored_at": now()}


def _render_columns(ds: Dataset, png_path: Path, settings: Settings, fallback: Decoder,
                    models: ModelSlot | None) -> tuple[dict[str, Any], Score | None]:
    """Render the first frame to ``png_path`` and score it; the image columns that describe
    the outcome, and the score."""
    try:
        shown = render(ds, 0, settings.window_index, fallback)
    except NoPixelData as exc:
        return {"status": idx.NO_PIXEL_DATA, "status_detail": str(exc)}, None
    except RenderError as exc:
        return {"status": idx.RENDER_FAILED, "status_detail": str(exc)}, None
    except Exception as exc:  # a decoder bug must cost one image, not the worker
        log.exception("rendering %s failed unexpectedly", png_path.stem)
        return {"status": idx.RENDER_FAILED, "status_detail": f"{type(exc).__name__}: {exc}"}, None
    partial = png_path.with_suffix(".png.part")
    partial.write_bytes(encode_png(shown.pixels, settings.png_compress_level))
    os.replace(partial, png_path)  # readers never see half a PNG
    score, score_cols = score_image(models, shown.pixels, png_path.stem)
    return {"status": idx.RENDERED, "status_detail": shown.notes or None,
            "png": png_path.name, "frames": shown.frames,
            "rendered_frame": shown.frame, "photometric": shown.photometric,
            "rescale_slope": shown.rescale_slope, "rescale_intercept": shown.rescale_intercept,
            "window_center": shown.window_center, "window_width": shown.window_width,
            "window_source": shown.window_source, "voi_function": shown.voi_function,
            "inverted": shown.inverted, "decoder": shown.decoder, **score_cols}, score


_EMPTY_RENDER = dict.fromkeys(("status_detail", "png", "frames", "rendered_frame", "photometric",
                               "rescale_slope", "rescale_intercept", "window_center",
                               "window_width", "window_source", "voi_function", "inverted",
                               "decoder", "transfer_syntax", "anomaly_score", "flagged",
                               "model_version", "threshold", "scored_at"))


def read_dataset(data: bytes) -> Dataset:
    """Parse a stored file; ``force`` because Orthanc keeps files without a preamble as sent."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "SOPInstanceUID" not in ds:
        raise InvalidDicomError("no SOP Instance UID where Orthanc found one")
    return ds


def ingest(index: idx.Index, settings: Settings, instance_id: str, data: bytes,
           lookup: OrthancLookup, models: ModelSlot | None = None) -> dict[str, Any]:
    """Render, score and index one instance; return its image columns.

    Orthanc's tags are asked for only when pydicom cannot read the file, so that even an
    unreadable instance that Orthanc accepted gets its place in the hierarchy and a status;
    Orthanc's decoder only when pydicom's decoders fail.
    """
    png_path = settings.png_directory / f"{instance_id}.png"
    score = None
    try:
        ds = read_dataset(data)
    except Exception as exc:  # pydicom could not parse what DCMTK accepted
        record = describe(lookup.tags(instance_id), instance_id, lookup)
        columns = {**_EMPTY_RENDER, "status": idx.UNREADABLE,
                   "status_detail": f"pydicom cannot read the file: {type(exc).__name__}: {exc}"}
    else:
        record = describe(ds, instance_id, lookup)
        rendered, score = _render_columns(ds, png_path, settings,
                                          lambda f: lookup.decode(data, f), models)
        columns = {**_EMPTY_RENDER, "transfer_syntax": _text(ds.file_meta, "TransferSyntaxUID"),
                   "frames": _int(ds, "NumberOfFrames"), **rendered}
    if columns["status"] != idx.RENDERED:
        png_path.unlink(missing_ok=True)  # a re-sent instance that no longer renders
    image = {**record.image, **columns}
    index.put(idx.InstanceRecord(record.patient, record.study, record.series, image))
    if score is not None:
        try:
            lookup.publish(instance_id, record.study["orthanc_id"], score)
        except Exception:  # Orthanc's copy of the flag is a convenience; the index has it
            log.exception("publishing the score of %s to Orthanc failed", instance_id)
    return image


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
    """Threads that run ``handle(instance_id)`` for each queued ID, counting outcomes.

    Decoding, zlib and ONNX Runtime release the GIL, so two threads use two cores well."""

    def __init__(self, handle: Callable[[str], Any], queue_size: int, threads: int = 1):
        self._handle = handle
        self._queue: queue.Queue[str | None] = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"processed": 0, "failed": 0, "dropped": 0}
        self._threads = [threading.Thread(target=self._run, name=f"minipacs-ingest-{n}", daemon=True)
                         for n in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, instance_id: str) -> bool:
        """Queue an instance without ever blocking the caller (Orthanc's store thread)."""
        try:
            self._queue.put_nowait(instance_id)
            return True
        except queue.Full:
            self._count("dropped")
            log.error("ingest queue full: instance %s is left for the next reconciliation",
                      instance_id)
            return False

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
        # unfinished_tasks counts the instance in hand too, so "idle" means all caught up.
        pending = self._queue.unfinished_tasks
        return {**counts, "queued": pending, "idle": pending == 0}

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _run(self) -> None:
        # Orthanc's own threads (storing, answering) come first: the worker takes the CPU they
        # leave (Linux gives each thread its own nice value).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        while not self._stop.is_set():
            instance_id = self._queue.get()
            try:
                if instance_id is not None:
                    self._handle(instance_id)
                    self._count("processed")
            except Exception:
                self._count("failed")
                log.exception("ingest of instance %s failed", instance_id)
            finally:
                self._queue.task_done()
