"""Rescoring the archive in the background, after a new model is swapped in.

The PNGs are the rendered pixels exactly (PNG is lossless), so scoring them gives what ingest
would have given: no DICOM is re-read or re-rendered. A model reloaded during a rescore restarts
it with the new model (``Restarts`` in the progress), so that none of its rows is left scored
by the old one.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .index import Index
from .scoring import ModelError, ModelSlot, Score, score_columns

log = logging.getLogger("minipacs")
BATCH = 32

#: Called for each new score: (instance Orthanc ID, study Orthanc ID, score).
#: Makes a score visible in Orthanc: (instance, study, score, whether the image was flagged before).
Publish = Callable[[str, str, Score, bool], None]


class Busy(Exception):
    """A rescore is already running."""


class Rescorer:
    def __init__(self, index: Index, png_directory: Path, models: ModelSlot,
                 publish: Publish | None = None):
        self.index, self.png_directory, self.models, self.publish = index, png_directory, models, publish
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._progress = {"State": "idle"}

    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    def start(self) -> dict:
        """Start rescoring every rendered image with the model now in use."""
        scorer = self.models.scorer
        if scorer is None:
            raise ModelError(self.models.error or "no model loaded")
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise Busy("a rescore is already running")
            total = self.index.status_counts().get("rendered", 0)
            self._progress = {"State": "running", "Total": total, "Done": 0, "Flagged": 0,
                              "Failed": 0, "ModelVersion": scorer.info.version, "Restarts": 0,
                              "StartedAt": _now(), "FinishedAt": None}
            self._thread = threading.Thread(target=self._run, args=(scorer,),
                                            name="minipacs-rescore", daemon=True)
            self._thread.start()
            return dict(self._progress)

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _set(self, **values) -> None:
        with self._lock:
            self._progress.update(values)

    def _add(self, **counts: int) -> None:
        with self._lock:
            for key, count in counts.items():
                self._progress[key] += count

    def _run(self, scorer) -> None:
        after = ""
        try:
            while True:
                current = self.models.scorer
                if current is not scorer:  # reloaded meanwhile: start again with the new model
                    scorer, after = current, ""
                    self._set(ModelVersion=scorer.info.version, Done=0, Flagged=0, Failed=0,
                              Total=self.index.status_counts().get("rendered", 0))
                    self._add(Restarts=1)
                rows = self.index.rendered_images(after, BATCH)
                if not rows:
                    break
                after = rows[-1][0]
                self._score_batch(scorer, rows)
            self._set(State="done", FinishedAt=_now())
        except Exception as exc:  # the index or the model broke: say so in the progress
            log.exception("rescore failed")
            self._set(State="failed", Error=f"{type(exc).__name__}: {exc}", FinishedAt=_now())

    def _score_batch(self, scorer, rows: list[tuple[str, str, str]]) -> None:
        images, kept = [], []
        for orthanc_id, png, study, was_flagged in rows:
            try:
                images.append(np.asarray(Image.open(self.png_directory / png)))
                kept.append((orthanc_id, study, bool(was_flagged)))
            except OSError:
                log.warning("rescore: PNG of %s is unreadable; skipped", orthanc_id)
                self._add(Failed=1)
        if not images:
            return
        scores = scorer.scores(images)
        self.index.set_scores([{"orthanc_id": orthanc_id, **score_columns(score)}
                               for (orthanc_id, _, _), score in zip(kept, scores)])
        refused = 0
        for (orthanc_id, study, was_flagged), score in zip(kept, scores):
            if self.publish is not None:
                try:
                    self.publish(orthanc_id, study, score, was_flagged)
                except Exception:  # Orthanc refused the write: the image is not done
                    log.exception("publishing the score of %s to Orthanc failed", orthanc_id)
                    refused += 1
        self._add(Done=len(kept) - refused, Failed=refused, Flagged=sum(s.flagged for s in scores))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
