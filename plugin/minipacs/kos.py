"""Flags out as DICOM: a Key Object Selection document (KOS) in each study, listing its images
rejected for quality reasons, for the systems that never call /minipacs.

The document title is (113001, DCM, "Rejected for Quality Reasons"), the convention of IHE
IOCM (Imaging Object Change Management) that dcm4chee and other archives act on; the content
follows TID 2010 (Key Object Selection). A study has at most one minipacs KOS: a new one
(after a review, or on request) replaces it, and the old one is deleted from Orthanc.

Written with pydicom, which minipacs already uses: a KOS is one flat dataset of a few
sequences, and highdicom (which builds SR documents from its templates) would add a dependency
and its own dependencies for some 60 lines.
"""

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from . import __version__
from . import index as idx
from . import reviews

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
TITLE = ("113001", "DCM", "Rejected for Quality Reasons")
DESCRIPTION = ("113012", "DCM", "Key Object Description")
SERIES_NUMBER = 9901  # apart from the modality's series
MANUFACTURER = "minipacs"
SETTLE = 5.0  # seconds a study's flags must stay unchanged before its KOS is written
# Studies with a flagged image and no KOS (AutomaticKeyObjects turned on, or a stop before the
# pending ones were written).
_WITHOUT_KOS = """SELECT DISTINCT se.study FROM images i JOIN series se ON se.orthanc_id = i.series
                  WHERE i.flagged = 1 AND NOT EXISTS (SELECT 1 FROM key_objects k WHERE k.study = se.study)"""

log = logging.getLogger("minipacs")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _sop(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
    return item


def build(study: dict[str, Any], images: list[dict[str, Any]], when: datetime | None = None) -> Dataset:
    """The KOS of a study (Orthanc's ``/studies/{id}`` answer: ``MainDicomTags`` and
    ``PatientMainDicomTags``) listing ``images`` (``reviews.rejected``: SOP class and instance,
    series UIDs, status)."""
    when = when or datetime.now(timezone.utc)
    tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names as Orthanc gives them
    ds.SOPClassUID, ds.SOPInstanceUID = KOS_SOP_CLASS, generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, patient.get(keyword, ""))
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber"):
        setattr(ds, keyword, tags.get(keyword, ""))
    if tags.get("StudyDescription"):
        ds.StudyDescription = tags["StudyDescription"]
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "KO", generate_uid(), SERIES_NUMBER
    ds.SeriesDescription = "minipacs: rejected for quality reasons"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer, ds.SoftwareVersions = MANUFACTURER, __version__
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    by_series: dict[str, list[Dataset]] = {}
    for image in images:
        by_series.setdefault(image["SeriesInstanceUID"], []).append(
            _sop(image["SOPClassUID"], image["SOPInstanceUID"]))
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    evidence.ReferencedSeriesSequence = []
    for series_uid, items in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID, series.ReferencedSOPSequence = series_uid, items
        evidence.ReferencedSeriesSequence.append(series)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    # SR Document Content: a CONTAINER titled as IOCM says, holding one item per image (TID 2010).
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code(*TITLE)]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    description = Dataset()
    description.RelationshipType, description.ValueType = "CONTAINS", "TEXT"
    description.ConceptNameCodeSequence = [_code(*DESCRIPTION)]
    description.TextValue = (f"{len(images)} instance(s) flagged by the minipacs anomaly model or "
                             "found invalid by a reviewer")
    content = [description]
    for image in images:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "COMPOSITE" if image.get("Status") == idx.NO_PIXEL_DATA else "IMAGE"
        item.ReferencedSOPSequence = [_sop(image["SOPClassUID"], image["SOPInstanceUID"])]
        content.append(item)
    ds.ContentSequence = content
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = KOS_SOP_CLASS, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class KeyObjects:
    """Keeps each study's KOS: ``store`` (the Part 10 bytes → Orthanc ID), ``delete`` (an
    Orthanc instance ID, gone already or not) and ``study`` (an Orthanc study ID → Orthanc's
    ``/studies/{id}`` answer) are Orthanc's, called from a route or a worker thread, never
    from a store callback."""

    def __init__(self, index: idx.Index, store: Callable[[bytes], str], delete: Callable[[str], None],
                 study: Callable[[str], dict[str, Any]], automatic: bool = False, settle: float = SETTLE):
        self.index, self.store, self.delete, self.study = index, store, delete, study
        self.automatic, self.settle = automatic, settle
        self._lock = threading.Lock()  # one study's documents replaced one at a time
        self._pending: dict[str, float] = {}  # study → when its flags last changed
        self._changed = threading.Condition()

    def schedule(self, study_orthanc_id: str) -> None:
        """A flag of the study was set or cleared: write its KOS once its flags have settled,
        so that a study arriving with many flagged images gets one document, not one per image."""
        with self._changed:
            self._pending[study_orthanc_id] = time.monotonic()
            self._changed.notify()

    def pending(self) -> int:
        """Studies whose KOS is scheduled or being written."""
        with self._changed:
            return len(self._pending)

    def run(self, stopping: threading.Event) -> None:
        """AutomaticKeyObjects' thread: first the flagged studies without a KOS, then each study
        scheduled, ``settle`` seconds after its last change."""
        for study in [row[0] for row in self.index._connection().execute(_WITHOUT_KOS)]:
            self.schedule(study)
        while not stopping.is_set():
            with self._changed:
                now = time.monotonic()
                due = [(study, when) for study, when in self._pending.items() if now - when >= self.settle]
                if not due:
                    waits = [self.settle - (now - when) for when in self._pending.values()]
                    self._changed.wait(min(waits, default=1.0))
            for study, when in due:
                if stopping.is_set():
                    return
                try:
                    self.update(study)
                except Exception:  # the next change of the study, or the next start, retries
                    log.exception("writing the KOS of study %s failed", study)
                with self._changed:  # pending until written (unless it changed again meanwhile)
                    if self._pending.get(study) == when:
                        del self._pending[study]

    def current(self, study_orthanc_id: str) -> dict[str, Any] | None:
        row = self.index._connection().execute(
            "SELECT instance, sop_uid, created_at FROM key_objects WHERE study = ?",
            (study_orthanc_id,)).fetchone()
        return None if row is None else dict(zip(("OrthancID", "SOPInstanceUID", "CreatedAt"), row))

    def reviewed(self, study_orthanc_id: str) -> dict[str, Any] | None:
        """After a review: update the study's KOS where it has one (or always, ``automatic``)."""
        if self.automatic or self.current(study_orthanc_id) is not None:
            return self.update(study_orthanc_id)
        return None

    def update(self, study_orthanc_id: str) -> dict[str, Any]:
        """Write the study's KOS anew from the flags and reviews, replacing the previous one;
        with nothing to list, only delete the previous one."""
        with self._lock:
            previous = self.current(study_orthanc_id)
            images = [image for image in reviews.rejected(self.index, study_orthanc_id)
                      if image["SOPClassUID"] != KOS_SOP_CLASS]
            created = None
            if images:
                ds = build(self.study(study_orthanc_id), images)
                instance = self.store(encode(ds))
                created = {"OrthancID": instance, "SOPInstanceUID": str(ds.SOPInstanceUID),
                           "CreatedAt": reviews.now()}
            with self.index._writing() as db:
                # The document this replaces is the one in the row now, not the one read above:
                # another node of a cluster may have written one meanwhile.
                replaced = [row[0] for row in db.execute(
                    "DELETE FROM key_objects WHERE study = ? RETURNING instance", (study_orthanc_id,))]
                if created:
                    db.execute("INSERT INTO key_objects (study, instance, sop_uid, created_at) "
                               "VALUES (?, ?, ?, ?)", (study_orthanc_id, created["OrthancID"],
                                                       created["SOPInstanceUID"], created["CreatedAt"]))
            for instance in replaced:
                self.delete(instance)
            return {**(created or {"OrthancID": None, "SOPInstanceUID": None, "CreatedAt": None}),
                    "Instances": [image["SOPInstanceUID"] for image in images],
                    "Replaced": previous["SOPInstanceUID"] if previous else None}
