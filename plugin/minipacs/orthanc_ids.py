"""Orthanc's resource identifiers, computed from the DICOM identifiers.

Orthanc names each patient, study, series and instance by the SHA-1 of the DICOM identifiers
above it, joined by ``|`` (``DicomInstanceHasher`` in the Orthanc framework). Computing them here
lets the ingest worker place an instance in the hierarchy without asking Orthanc's REST API.
"""

import hashlib
from typing import NamedTuple


class OrthancIds(NamedTuple):
    patient: str
    study: str
    series: str
    instance: str


def _sha1(text: str) -> str:
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def orthanc_ids(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> OrthancIds:
    """The four Orthanc IDs of an instance, as Orthanc computes them."""
    return OrthancIds(
        patient=_sha1(patient_id),
        study=_sha1(f"{patient_id}|{study_uid}"),
        series=_sha1(f"{patient_id}|{study_uid}|{series_uid}"),
        instance=_sha1(f"{patient_id}|{study_uid}|{series_uid}|{sop_uid}"),
    )
