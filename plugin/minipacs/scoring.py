"""The anomaly model: an ONNX file run by ONNX Runtime on the CPU, loaded once, swappable live.

The model outputs P(valid) for an image preprocessed by :mod:`minipacs.preprocess`; the model
file says which preprocessing, input size and threshold it was trained with (its metadata), and
a model made for another preprocessing is refused. An image is flagged when P(valid) is below
the threshold; its anomaly score is 1 − P(valid), so higher means more anomalous.
"""

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from . import preprocess


class ModelError(Exception):
    """The model file is missing, unreadable or made for something else; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    version: str
    input_size: int
    threshold: float
    preprocessing: str
    sha256: str
    loaded_at: str

    def as_json(self) -> dict:
        return {"Path": self.path, "Version": self.version, "InputSize": self.input_size,
                "Threshold": self.threshold, "Preprocessing": self.preprocessing,
                "Sha256": self.sha256, "LoadedAt": self.loaded_at}


@dataclass(frozen=True)
class Score:
    anomaly_score: float  # 1 - P(valid)
    flagged: bool
    model_version: str
    threshold: float


class Scorer:
    """One loaded model. ``score`` may be called from several threads at once."""

    def __init__(self, path: Path, threshold: float | None = None):
        path = Path(path)
        try:
            data = path.read_bytes()
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1  # one image at a time: threads cost more than they give
            self.session = onnxruntime.InferenceSession(data, options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(preprocess.METADATA_PREPROCESSING) != preprocess.PREPROCESSING:
            raise ModelError(f"model {path} was made for preprocessing "
                             f"{meta.get(preprocess.METADATA_PREPROCESSING)!r}, "
                             f"this plugin does {preprocess.PREPROCESSING!r}")
        if meta.get(preprocess.METADATA_POSITIVE, "valid") != "valid":
            raise ModelError(f"model {path} does not output P(valid)")
        try:
            size = int(meta[preprocess.METADATA_INPUT_SIZE])
            model_threshold = float(meta.get(preprocess.METADATA_THRESHOLD, 0.5))
        except (KeyError, ValueError) as exc:
            raise ModelError(f"model {path} lacks a valid {exc} in its metadata") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.info = ModelInfo(
            path=str(path), version=meta.get(preprocess.METADATA_VERSION, path.stem),
            input_size=size, threshold=model_threshold if threshold is None else threshold,
            preprocessing=preprocess.PREPROCESSING, sha256=hashlib.sha256(data).hexdigest(),
            loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def p_valid(self, images: list[np.ndarray]) -> np.ndarray:
        """P(valid) of each image (8-bit display pixels)."""
        inputs = preprocess.batch(images, self.info.input_size)
        outputs = self.session.run(None, {self.input_name: inputs})[0]
        return np.asarray(outputs, dtype=np.float64).reshape(len(images))

    def scores(self, images: list[np.ndarray]) -> list[Score]:
        """The scores of several images, run as one batch."""
        threshold, version = self.info.threshold, self.info.version
        return [Score(anomaly_score=1.0 - float(p), flagged=float(p) < threshold,
                      model_version=version, threshold=threshold) for p in self.p_valid(images)]

    def score(self, pixels: np.ndarray) -> Score:
        return self.scores([pixels])[0]


class ModelSlot:
    """The model in use, swapped atomically; a failed reload keeps the previous model."""

    def __init__(self, path: Path | None, threshold: float | None = None):
        self.path, self.threshold = path, threshold
        self._lock = threading.Lock()
        self._scorer: Scorer | None = None
        self.error: str | None = None

    def load(self, path: Path | None = None) -> Scorer:
        """Load ``path`` (default: the configured one) and put it in use."""
        path = Path(path) if path else self.path
        if path is None:
            raise ModelError("no model configured (MiniPacs.ModelPath)")
        scorer = Scorer(path, self.threshold)
        with self._lock:
            self._scorer, self.path, self.error = scorer, path, None
        return scorer

    def try_load(self) -> None:
        """Load at start-up; an unusable model leaves scoring off, with the reason kept."""
        try:
            self.load()
        except ModelError as exc:
            self.error = str(exc)

    @property
    def scorer(self) -> Scorer | None:
        with self._lock:
            return self._scorer

    def describe(self) -> dict:
        scorer = self.scorer
        if scorer is None:
            return {"Loaded": False, "Error": self.error}
        return {"Loaded": True, **scorer.info.as_json()}


def score_columns(score: Score | None) -> dict:
    """The index columns of a score (all empty when there is none)."""
    if score is None:
        return dict.fromkeys(("anomaly_score", "flagged", "model_version", "threshold"))
    return {"anomaly_score": score.anomaly_score, "flagged": score.flagged,
            "model_version": score.model_version, "threshold": score.threshold}


