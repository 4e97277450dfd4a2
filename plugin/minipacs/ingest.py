"""The ingest pipeline: one stored instance → PNG + index rows + status, off Orthanc's store path.

Orthanc's change notification of a new instance only queues its ID (an OnStoredInstance
callback would run in the storing thread, under the GIL); a :class:`Worker` thread fetches the
file and runs :func:`ingest`, after any burst that Orthanc is storing. Every outcome is recorded
as a status: the worker never raises into Orthanc.
"""

import collections
import contextlib
import heapq
import io
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from . import index as idx
from . import limits
from .orthanc_ids import OrthancIds, orthanc_ids
from .render import Decoder, NoPixelData, RenderError, encode_png, render
from .scoring import ModelSlot, Score, Scorer, score_columns

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


def hierarchy(source: Dataset | Tags, instance_id: str) -> idx.InstanceRecord:
    """The hierarchy rows of an instance, from a pydicom dataset or Orthanc's simplified tags,
    with the parents' Orthanc IDs computed from the identifiers (see :func:`place`)."""
    patient_id = _text(source, "PatientID") or ""
    study_uid = _text(source, "StudyInstanceUID") or ""
    series_uid = _text(source, "SeriesInstanceUID") or ""
    sop_uid = _text(source, "SOPInstanceUID") or ""
    ids = orthanc_ids(patient_id, study_uid, series_uid, sop_uid)
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
        computed_id=ids.instance,
    )


def place(record: idx.InstanceRecord, lookup: OrthancLookup) -> idx.InstanceRecord:
    """The record with Orthanc's own parent IDs: computed from the identifiers, unless Orthanc
    read them differently (odd padding in a malformed file, say); then Orthanc is asked."""
    instance_id = record.image["orthanc_id"]
    if record.computed_id == instance_id:
        return record
    ids = lookup.ids(instance_id)
    return idx.InstanceRecord({**record.patient, "orthanc_id": ids.patient},
                              {**record.study, "orthanc_id": ids.study},
                              {**record.series, "orthanc_id": ids.series}, record.image, instance_id)


def describe(source: Dataset | Tags, instance_id: str, lookup: OrthancLookup) -> idx.InstanceRecord:
    """The hierarchy rows of an instance, placed under Orthanc's own resources."""
    return place(hierarchy(source, instance_id), lookup)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def score_images(scorer: Scorer | None, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Score rendered pixels with a model, if any, as one batch (about half the cost per image
    of one call each); each image's index columns.

    A failing model costs the scores, never the images: the failure is logged and noted."""
    if scorer is None or not images:
        return [score_columns(None) for _ in images]
    try:
        scores = scorer.scores(images)
    except Exception as exc:
        log.exception("scoring %d image(s) failed", len(images))
        return [{**score_columns(None), "status_detail": f"scoring failed: {exc}"} for _ in images]
    scored_at = now()
    return [{**score_columns(score), "scored_at": scored_at} for score in scores]


def write_png(path: Path, data: bytes) -> None:
    """Write a PNG so that no reader sees half of it, and leave nothing behind when the disk
    refuses it. A new file is written in place: readers find PNGs through the index, whose row
    comes after; one that exists (a re-sent instance) is replaced through a temporary file, the
    rename costing a third more on this disk."""
    target = path
    try:
        with open(path, "xb") as new:
            new.write(data)
        return
    except FileExistsError:
        target = path.with_suffix(".png.part")
    except OSError:
        path.unlink(missing_ok=True)  # created, then the disk was full: no empty PNG
        raise
    try:
        target.write_bytes(data)
        os.replace(target, path)
    except OSError:
        target.unlink(missing_ok=True)
        raise


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
    columns = {"status": idx.RENDERED, "status_detail": shown.notes or None,
               "png": png_path.name, "frames": shown.frames,
               "rendered_frame": shown.frame, "photometric": shown.photometric,
               "rescale_slope": shown.rescale_slope, "rescale_intercept": shown.rescale_intercept,
               "window_center": shown.window_center, "window_width": shown.window_width,
               "window_source": shown.window_source, "voi_function": shown.voi_function,
               "inverted": shown.inverted, "decoder": shown.decoder}
    try:
        write_png(png_path, encode_png(shown.pixels, settings.png_compress_level))
    except OSError as exc:  # a full or read-only disk: the row says so, the PNG is retried
        columns.update(status=idx.WRITE_FAILED, png=None,
                       status_detail=f"cannot write the PNG: {os_error(exc)}")
    return columns, shown.pixels


def os_error(exc: OSError) -> str:
    """An OS error without its file name: the same cause reads the same for every instance."""
    return f"{type(exc).__name__}: {exc.strerror or exc}"


_EMPTY_RENDER = dict.fromkeys(("status_detail", "png", "frames", "rendered_frame", "photometric",
                               "rescale_slope", "rescale_intercept", "window_center",
                               "window_width", "window_source", "voi_function", "inverted",
                               "decoder", "transfer_syntax", "anomaly_score", "flagged",
                               "anomaly_reason", "model_version", "threshold", "scored_at"))


def read_dataset(data: bytes) -> Dataset:
    """Parse a stored file; ``force`` because Orthanc keeps files without a preamble as sent.
    A deflated file that would inflate past what its pixel data justify is refused first
    (:class:`RenderError`), as pydicom inflates it whole."""
    limits.check_deflated(data)
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "SOPInstanceUID" not in ds:
        raise InvalidDicomError("no SOP Instance UID where Orthanc found one")
    return ds


class _OrthancDecoder:
    """Orthanc's decoder as :func:`render`'s fallback. Only Orthanc's process has it: where it
    is not at hand (a sandbox), asking for it is noted, and the instance goes back to Orthanc's
    process for that frame (``decoded``)."""

    def __init__(self, decoded: np.ndarray | None):
        self.decoded, self.asked = decoded, False

    def __call__(self, frame: int) -> np.ndarray:
        if isinstance(sys.exc_info()[1], MemoryError):  # Orthanc's decoder would need as much
            raise RenderError("not tried: pydicom's decoder ran out of memory")
        if self.decoded is None:
            self.asked = True
            raise RenderError("Orthanc's decoder is needed")
        return self.decoded


class Stopping(Exception):
    """Orthanc is stopping: the batch in hand is left to the next start (its claims stay)."""


@dataclass
class Outcome:
    """What rendering one instance gave. ``record`` is None when pydicom could not read the
    file (its place in the hierarchy comes from Orthanc's tags); ``needs_decoder`` when only
    Orthanc's decoder can decode it; ``pixels`` are what was shown, for scoring."""

    instance_id: str
    image: dict[str, Any]
    record: idx.InstanceRecord | None
    needs_decoder: bool = False
    pixels: np.ndarray | None = None


def render_instance(settings: Settings, instance_id: str, data: bytes,
                    decoded: np.ndarray | None = None) -> Outcome:
    """Render one stored file: its PNG written, its image columns and hierarchy. Asks nothing
    of Orthanc, so that it can run where a decoder bomb cannot hurt Orthanc (minipacs.sandbox).
    ``decoded``: the first frame as Orthanc's decoder gave it, when pydicom's could not."""
    png_path = settings.png_directory / f"{instance_id}.png"
    try:
        ds = read_dataset(data)
    except (RenderError, MemoryError) as exc:  # a bomb: placed by Orthanc's tags, as below
        png_path.unlink(missing_ok=True)
        detail = str(exc) if isinstance(exc, RenderError) else f"reading the file: MemoryError: {exc}"
        return Outcome(instance_id, {**_EMPTY_RENDER, "status": idx.RENDER_FAILED,
                                     "status_detail": detail}, None)
    except Exception as exc:  # pydicom could not parse what DCMTK accepted
        png_path.unlink(missing_ok=True)  # a re-sent instance that no longer renders
        return Outcome(instance_id, {**_EMPTY_RENDER, "status": idx.UNREADABLE,
                                     "status_detail": f"pydicom cannot read the file: "
                                                      f"{type(exc).__name__}: {exc}"}, None)
    record = hierarchy(ds, instance_id)
    fallback = _OrthancDecoder(decoded)
    rendered, pixels = _render_columns(ds, png_path, settings, fallback)
    if pixels is None or rendered["status"] != idx.RENDERED:
        png_path.unlink(missing_ok=True)
    image = {**record.image, **_EMPTY_RENDER, "transfer_syntax": _text(ds.file_meta, "TransferSyntaxUID"),
             "frames": _int(ds, "NumberOfFrames"), **rendered}
    return Outcome(instance_id, image, record, fallback.asked and pixels is None, pixels)


def render_and_score(settings: Settings, items: Sequence[tuple[str, bytes, np.ndarray | None]],
                     scorer: Scorer | None) -> list[Outcome]:
    """Render instances given as (Orthanc ID, file, Orthanc's decoding or None) and score the
    rendered ones together, in one run of the model; their score columns join their image's."""
    outcomes = [render_instance(settings, *item) for item in items]
    shown = [o for o in outcomes if o.pixels is not None]
    add_scores(shown, score_images(scorer, [o.pixels for o in shown]))
    return outcomes


def add_scores(outcomes: Sequence[Outcome], scores: Sequence[dict[str, Any]]) -> None:
    """Join each score's columns to its image's; a scoring failure joins the status detail."""
    for outcome, columns in zip(outcomes, scores):
        columns = dict(columns)
        detail = columns.pop("status_detail", None)
        outcome.image.update(columns)
        if detail:
            outcome.image["status_detail"] = "; ".join(filter(None, (outcome.image["status_detail"], detail)))


#: Renders and scores a batch of (Orthanc ID, file, Orthanc's decoding or None): in this
#: process (:func:`render_and_score`), or in a sandbox (:class:`minipacs.sandbox.Sandbox`).
Renderer = Callable[[Sequence[tuple[str, bytes, np.ndarray | None]]], list[Outcome]]


class Deletions:
    """What Orthanc deleted while instances were being rendered, so that a late write never
    brings a deleted resource back into the index.

    Each fetch of a file and each deletion takes a number from one counter; a record is
    written only when no deletion of it or of one of its parents came after its file was
    fetched (its number). Deletions are forgotten once no fetch before them is in hand."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counter = 0
        self._deleted: dict[str, int] = {}
        self._in_hand: collections.Counter[int] = collections.Counter()

    def fetching(self) -> int:
        with self._lock:
            self._counter += 1
            self._in_hand[self._counter] += 1
            return self._counter

    def done(self, number: int) -> None:
        with self._lock:
            self._in_hand[number] -= 1
            if not self._in_hand[number]:
                del self._in_hand[number]
            oldest = min(self._in_hand, default=self._counter + 1)
            self._deleted = {k: v for k, v in self._deleted.items() if v > oldest}

    def deleted(self, orthanc_id: str) -> None:
        with self._lock:
            self._counter += 1
            if self._in_hand:
                self._deleted[orthanc_id] = self._counter

    def live(self, record: idx.InstanceRecord, fetched: int) -> bool:
        """No deletion of the record's resources since its file was fetched."""
        with self._lock:
            return all(self._deleted.get(part["orthanc_id"], 0) < fetched
                       for part in (record.patient, record.study, record.series, record.image))


def ingest_many(index: idx.Index, settings: Settings, items: list[tuple[str, bytes]],
                lookup: OrthancLookup, models: ModelSlot | None = None,
                renderer: Renderer | None = None, deletions: Deletions | None = None,
                fetched: int = 0) -> list[dict[str, Any]]:
    """Render, score and index instances given as (Orthanc ID, file); their image columns.

    Runs ``renderer`` (default: in this process), then does here what needs Orthanc: its
    decoder for files pydicom cannot decode, its tags for files pydicom cannot read, its IDs
    where they differ from the computed ones, and the score metadata. Rows of resources
    deleted since ``fetched`` (a :class:`Deletions` number) are not written; nor their PNGs."""
    if renderer is None:
        scorer = models.scorer if models else None
        renderer = lambda batch: render_and_score(settings, batch, scorer)  # noqa: E731
    files = dict(items)
    outcomes = renderer([(instance_id, data, None) for instance_id, data in items])
    for n, outcome in enumerate(outcomes):
        if outcome.needs_decoder:
            outcomes[n] = _with_orthanc_decoder(renderer, outcome, files[outcome.instance_id], lookup)
    records = []
    for outcome in outcomes:
        if outcome.record is None:  # unreadable, or its renderer died: Orthanc's tags place it
            record = describe(lookup.tags(outcome.instance_id), outcome.instance_id, lookup)
        else:
            record = place(outcome.record, lookup)
        records.append(idx.InstanceRecord(record.patient, record.study, record.series,
                                          {**record.image, **outcome.image}, record.computed_id))
    keep = None if deletions is None else (lambda record: deletions.live(record, fetched))
    written: list[idx.InstanceRecord] = []
    try:
        written = index.put_many(records, keep, done=list(files))
    finally:  # no row, no PNG: nothing is left that no row refers to
        kept = {id(record) for record in written}
        for record in records:
            if id(record) not in kept and record.image.get("png"):
                (settings.png_directory / record.image["png"]).unlink(missing_ok=True)
    for record in written:
        _publish(lookup, record)
    return [record.image for record in records]


def _with_orthanc_decoder(renderer: Renderer, outcome: Outcome, data: bytes,
                          lookup: OrthancLookup) -> Outcome:
    """Render again with the first frame decoded by Orthanc (DCMTK), which pydicom could not
    decode; the frame's size was checked against its header by then (render.check_codestream)."""
    try:
        decoded = lookup.decode(data, 0)
    except Exception as exc:
        outcome.image["status_detail"] = f"{outcome.image['status_detail']}; fallback decoder: " \
                                         f"{type(exc).__name__}: {exc}"
        outcome.needs_decoder = False
        return outcome
    return renderer([(outcome.instance_id, data, decoded)])[0]


def _publish(lookup: OrthancLookup, record: idx.InstanceRecord) -> None:
    image = record.image
    if image.get("anomaly_score") is None:
        return
    score = Score(anomaly_score=image["anomaly_score"], flagged=bool(image["flagged"]),
                  model_version=image["model_version"], threshold=image["threshold"],
                  reason=image.get("anomaly_reason"))
    try:
        lookup.publish(image["orthanc_id"], record.study["orthanc_id"], score)
    except Exception:  # Orthanc's copy of the flag is a convenience; the index has it
        log.exception("publishing the score of %s to Orthanc failed", image["orthanc_id"])


def ingest(index: idx.Index, settings: Settings, instance_id: str, data: bytes,
           lookup: OrthancLookup, models: ModelSlot | None = None) -> dict[str, Any]:
    """Render, score and index one instance; return its image columns."""
    return ingest_many(index, settings, [(instance_id, data)], lookup, models)[0]


def remove(index: idx.Index, png_directory: Path, table: str, orthanc_id: str,
           deletions: Deletions | None = None) -> int:
    """Forget a resource Orthanc deleted: its rows, those under it, and their PNGs; and, in
    ``deletions``, that it was deleted, for the instances being rendered meanwhile."""
    if deletions is not None:
        deletions.deleted(orthanc_id)
    pngs = index.delete(table, orthanc_id)
    for name in pngs:
        (png_directory / name).unlink(missing_ok=True)
    return len(pngs)


def give_up(index: idx.Index, instance_id: str, attempts: int, lookup: OrthancLookup) -> None:
    """Record an instance whose rendering never finished ``attempts`` times (Orthanc stopped or
    was killed meanwhile): a poison instance must not be queued at every start."""
    record = describe(lookup.tags(instance_id), instance_id, lookup)
    image = {**record.image, **_EMPTY_RENDER, "status": idx.RENDER_FAILED,
             "status_detail": f"given up after {attempts} attempts: its rendering never "
                              "finished (Orthanc stopped while rendering it)"}
    index.put_many([idx.InstanceRecord(record.patient, record.study, record.series, image)],
                   done=[instance_id])
    log.error("instance %s given up after %d attempts", instance_id, attempts)


def reconcile(index: idx.Index, png_directory: Path, in_orthanc: set[str],
              submit: Callable[[str], Any], lookup: OrthancLookup | None = None,
              attempts: int = 3) -> tuple[int, int]:
    """Make the index hold exactly Orthanc's instances: queue the missing ones, forget the
    deleted ones (stored or deleted while minipacs was not running, or dropped by a full
    queue). A missing instance claimed ``attempts`` times already is given up (with
    ``lookup``). Returns (queued, removed)."""
    indexed = index.orthanc_instance_ids()
    missing, deleted = sorted(in_orthanc - indexed), sorted(indexed - in_orthanc)
    claims = index.claims() if lookup is not None else {}
    queued = 0
    for instance_id in missing:
        if claims.get(instance_id, 0) >= attempts:
            give_up(index, instance_id, claims[instance_id], lookup)
        else:
            submit(instance_id)
            queued += 1
    for instance_id in deleted:
        remove(index, png_directory, "images", instance_id)
    if missing or deleted:
        log.warning("reconciled with Orthanc: %d instance(s) queued, %d forgotten",
                    queued, len(deleted))
    return queued, len(deleted)


def sweep(index: idx.Index, png_directory: Path, before: float) -> int:
    """Remove the files no row refers to, last written before ``before`` (a time): PNGs of rows
    never written or deleted while minipacs was not running, and temporary files a crash left.
    Newer files may be a worker's, whose row is on its way. Returns how many were removed."""
    known = index.png_names()
    removed = 0
    with os.scandir(png_directory) as entries:
        for entry in entries:
            orphan = entry.name.endswith(".png.part") or (entry.name.endswith(".png")
                                                           and entry.name not in known)
            if orphan and entry.stat().st_mtime < before:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.warning("removed %d file(s) without an index row from %s", removed, png_directory)
    return removed


class Trouble:
    """One log line per cause of failure, not one per instance: a full disk fails every
    instance the same way for as long as it lasts; the line after it says it works again."""

    def __init__(self):
        self._lock = threading.Lock()
        self._causes: dict[str, str] = {}

    def failed(self, where: str, cause: str) -> None:
        with self._lock:
            if self._causes.get(where) == cause:
                return
            self._causes[where] = cause
        log.error("%s: %s (instances are retried; said once per cause)", where, cause)

    def recovered(self, where: str) -> None:
        with self._lock:
            if self._causes.pop(where, None) is None:
                return
        log.warning("%s works again", where)


class Retries:
    """Instances to submit again later, each after a delay that doubles at each failure
    (``first`` up to ``longest`` seconds): a full disk is not hammered, and the index catches up
    once space returns."""

    def __init__(self, submit: Callable[[str], Any], first: float = 2.0, longest: float = 300.0):
        self._submit, self._first, self._longest = submit, first, longest
        self._due: list[tuple[float, str]] = []
        self._failures: dict[str, int] = {}
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="minipacs-retries", daemon=True).start()

    def later(self, instance_ids: Sequence[str]) -> None:
        with self._wake:
            for instance_id in instance_ids:
                n = self._failures.get(instance_id, 0)
                self._failures[instance_id] = n + 1
                delay = min(self._first * 2 ** n, self._longest)
                heapq.heappush(self._due, (time.monotonic() + delay, instance_id))
            self._wake.notify()

    def succeeded(self, instance_ids: Sequence[str]) -> None:
        with self._wake:
            for instance_id in instance_ids:
                self._failures.pop(instance_id, None)

    def pending(self) -> int:
        with self._wake:
            return len(self._due)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, instance_id = heapq.heappop(self._due)
            self._submit(instance_id)


class Pipeline:
    """What an ingest worker does with a batch of instance IDs, in Orthanc's process: claim
    them, fetch their files, have them rendered (in a sandbox), write the rows, and retry what
    a full disk refused. Nothing Orthanc stored is lost: an instance whose row or PNG could not
    be written is retried until it is."""

    def __init__(self, index: idx.Index, settings: Settings, lookup: OrthancLookup,
                 models: ModelSlot | None, fetch: Callable[[str], bytes],
                 submit: Callable[[str], Any], renderer: Renderer | None = None):
        self.index, self.settings, self.lookup, self.models = index, settings, lookup, models
        self.fetch, self.renderer, self.submit = fetch, renderer, submit
        self.deletions = Deletions()
        self.trouble = Trouble()
        self.retries = Retries(submit)

    def __call__(self, instance_ids: list[str]) -> None:
        """Ingest a batch. Instances claimed before (in hand when Orthanc died) are suspects:
        one is rendered alone, after the others, and the rest go back to the queue, where both
        workers take them one at a time; so one that kills its process takes nothing with it."""
        suspects = {}
        if len(instance_ids) > 1:
            try:
                suspects = self.index.claims(instance_ids)
            except sqlite3.Error as exc:
                self._failed("writing the index", str(exc), instance_ids)
                return
        if not suspects:
            self._ingest(instance_ids)
            return
        others = [i for i in instance_ids if i not in suspects]
        if others:
            self._ingest(others)
        first, *rest = sorted(suspects, key=suspects.get)
        for instance_id in rest:
            self.submit(instance_id)
        self._ingest([first])

    def _ingest(self, instance_ids: list[str]) -> None:
        try:
            self.index.claim(instance_ids)
        except sqlite3.Error as exc:
            self._failed("writing the index", str(exc), instance_ids)
            return
        number = self.deletions.fetching()
        try:
            items, gone = [], []
            for instance_id in instance_ids:
                try:
                    items.append((instance_id, self.fetch(instance_id)))
                except Exception:  # deleted from Orthanc since it was queued
                    gone.append(instance_id)
            if gone:
                self.index.release(gone)
            try:
                images = ingest_many(self.index, self.settings, items, self.lookup, self.models,
                                     self.renderer, self.deletions, number)
            except sqlite3.Error as exc:
                self._failed("writing the index", str(exc), [i for i, _ in items])
                return
            except Stopping:
                return
        finally:
            self.deletions.done(number)
        self.trouble.recovered("writing the index")
        unwritten = [image for image in images if image["status"] == idx.WRITE_FAILED]
        if unwritten:
            self._failed(f"writing PNGs in {self.settings.png_directory}",
                         unwritten[0]["status_detail"], [image["orthanc_id"] for image in unwritten])
        else:
            self.trouble.recovered(f"writing PNGs in {self.settings.png_directory}")
        self.retries.succeeded([image["orthanc_id"] for image in images
                                if image["status"] != idx.WRITE_FAILED])

    def _failed(self, where: str, cause: str, instance_ids: list[str]) -> None:
        self.trouble.failed(where, cause)
        self.retries.later(instance_ids)


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
