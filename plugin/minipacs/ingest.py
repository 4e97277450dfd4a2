"""The ingest pipeline: stored instances → PNGs + index rows + statuses, off Orthanc's store path.

:func:`render_and_score` turns files into outcomes without asking Orthanc anything, so that it
can run in a sandbox (:mod:`minipacs.sandbox`); :func:`ingest_many` does the rest in Orthanc's
process (its decoder, tags and IDs where the file is not enough, the rows, the score metadata).
The threads that run it are :mod:`minipacs.worker`'s. Every outcome is recorded as a status.
"""

import collections
import io
import logging
import os
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

    def publish(self, instance_id: str, study_id: str, score: Score, was_flagged: bool) -> None:
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


EMPTY_RENDER = dict.fromkeys(("status_detail", "png", "frames", "rendered_frame", "photometric",
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
        return Outcome(instance_id, {**EMPTY_RENDER, "status": idx.RENDER_FAILED,
                                     "status_detail": detail}, None)
    except Exception as exc:  # pydicom could not parse what DCMTK accepted
        png_path.unlink(missing_ok=True)  # a re-sent instance that no longer renders
        return Outcome(instance_id, {**EMPTY_RENDER, "status": idx.UNREADABLE,
                                     "status_detail": f"pydicom cannot read the file: "
                                                      f"{type(exc).__name__}: {exc}"}, None)
    record = hierarchy(ds, instance_id)
    fallback = _OrthancDecoder(decoded)
    rendered, pixels = _render_columns(ds, png_path, settings, fallback)
    if pixels is None or rendered["status"] != idx.RENDERED:
        png_path.unlink(missing_ok=True)
    image = {**record.image, **EMPTY_RENDER, "transfer_syntax": _text(ds.file_meta, "TransferSyntaxUID"),
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
        lookup.publish(image["orthanc_id"], record.study["orthanc_id"], score, False)
    except Exception:  # Orthanc's copy of the flag is a convenience; the index has it
        log.exception("publishing the score of %s to Orthanc failed", image["orthanc_id"])


def ingest(index: idx.Index, settings: Settings, instance_id: str, data: bytes,
           lookup: OrthancLookup, models: ModelSlot | None = None) -> dict[str, Any]:
    """Render, score and index one instance; return its image columns."""
    return ingest_many(index, settings, [(instance_id, data)], lookup, models)[0]
