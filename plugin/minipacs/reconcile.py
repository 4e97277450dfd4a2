"""The index follows Orthanc: deletions, reconciliation of the instance sets, instances given
up after repeated crashes, and files that no row refers to."""

import logging
import os
from pathlib import Path
from typing import Any, Callable

from . import index as idx
from .ingest import EMPTY_RENDER, Deletions, OrthancLookup, describe

log = logging.getLogger("minipacs")


def remove(index: idx.Index, png_directory: Path, table: str, orthanc_id: str,
           deletions: Deletions | None = None) -> int:
    """Forget a resource Orthanc deleted: its rows, those under it, and their PNGs; and, in
    ``deletions``, that it was deleted, for the instances being rendered meanwhile. An
    instance's PNG goes even without a row (rendered by a node that died before writing it)."""
    if deletions is not None:
        deletions.deleted(orthanc_id)
    pngs = index.delete(table, orthanc_id)
    if table == "images":
        (png_directory / f"{orthanc_id}.png").unlink(missing_ok=True)
    for name in pngs:
        (png_directory / name).unlink(missing_ok=True)
    return len(pngs)


def give_up(index: idx.Index, instance_id: str, attempts: int, lookup: OrthancLookup) -> None:
    """Record an instance whose rendering never finished ``attempts`` times (Orthanc stopped or
    was killed meanwhile): a poison instance must not be queued at every start."""
    record = describe(lookup.tags(instance_id), instance_id, lookup)
    image = {**record.image, **EMPTY_RENDER, "status": idx.RENDER_FAILED,
             "status_detail": f"given up after {attempts} attempts: its rendering never "
                              "finished (Orthanc stopped while rendering it)"}
    index.put_many([idx.InstanceRecord(record.patient, record.study, record.series, image)],
                   done=[instance_id])
    log.error("instance %s given up after %d attempts", instance_id, attempts)


def reconcile(index: idx.Index, png_directory: Path, in_orthanc: Callable[[], set[str]],
              submit: Callable[[str], Any], lookup: OrthancLookup | None = None,
              attempts: int = 3) -> tuple[int, int]:
    """Make the index hold exactly Orthanc's instances, compared by identity: queue the missing
    ones, forget the deleted ones (stored or deleted while minipacs was not running, dropped by
    a full queue, or missed). The index is read before Orthanc is asked, so that an instance
    indexed meanwhile is not taken for a deleted one; queued instances are not missing. A
    missing instance claimed ``attempts`` times already is given up (with ``lookup``).
    Returns (queued, removed)."""
    indexed = index.orthanc_instance_ids()
    stored = in_orthanc()
    deleted = sorted(indexed - stored)
    missing = sorted(stored - index.orthanc_instance_ids() - index.queued())
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
    Newer files may be a worker's, whose row is on its way; so may, in a shared directory, the
    file of an instance another node holds (claimed: read first, the rows after, so that a row
    written between the two reads is seen). Returns how many were removed."""
    claimed = {f"{instance_id}.png" for instance_id in index.queued()}
    known = index.png_names()
    removed = 0
    with os.scandir(png_directory) as entries:
        for entry in entries:
            orphan = entry.name.endswith(".png.part") or (
                entry.name.endswith(".png") and entry.name not in known and entry.name not in claimed)
            if orphan and entry.stat().st_mtime < before:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.warning("removed %d file(s) without an index row from %s", removed, png_directory)
    return removed
