"""The anomaly model: an ONNX file run by ONNX Runtime on the CPU, loaded once, swappable live.

The model outputs P(valid) for an image preprocessed by :mod:`minipacs.preprocess`; the model
file says which preprocessing, input size and threshold it was trained with (its metadata), and
a model made for another preprocessing is refused. An image is flagged when P(valid) is below
the threshold; its anomaly score is 1 − P(valid), so higher means more anomalous.

A model that also outputs ``p_class`` (one probability per class of its ``minipacs.classes``
metadata) gives each flag its reason: the likeliest class other than valid. The checks of
:func:`reasons.by_construction` run first: what they prove is flagged with score 1 whatever the
network says.
"""

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from . import preprocess, reasons


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
    classes: tuple[str, ...] | None  # None: the model says only valid or not

    def as_json(self) -> dict:
        return {"Path": self.path, "Version": self.version, "InputSize": self.input_size,
                "Threshold": self.threshold, "Preprocessing": self.preprocessing,
                "Sha256": self.sha256, "LoadedAt": self.loaded_at,
                "Reasons": list(self.classes[1:]) if self.classes else [reasons.UNSPECIFIED]}


@dataclass(frozen=True)
class Score:
    anomaly_score: float  # 1 - P(valid)
    flagged: bool
    model_version: str
    threshold: float
    reason: str | None = None  # why it is flagged (minipacs.reasons); None when not flagged


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
        self.outputs = ["p_valid"]
        classes = None
        if meta.get(reasons.METADATA_CLASSES):
            classes = tuple(meta[reasons.METADATA_CLASSES].split(","))
            if classes[0] != "valid" or "p_class" not in {o.name for o in self.session.get_outputs()}:
                raise ModelError(f"model {path} names classes {classes} but has no p_class output "
                                 "with 'valid' first")
            self.outputs.append("p_class")
        self.info = ModelInfo(
            path=str(path), version=meta.get(preprocess.METADATA_VERSION, path.stem),
            input_size=size, threshold=model_threshold if threshold is None else threshold,
            preprocessing=preprocess.PREPROCESSING, sha256=hashlib.sha256(data).hexdigest(),
            loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), classes=classes)

    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """P(valid) of each image (8-bit display pixels), and the reason it would be flagged
        for: the likeliest class other than valid."""
        inputs = preprocess.batch(images, self.info.input_size)
        outputs = self.session.run(self.outputs, {self.input_name: inputs})
        p_valid = np.asarray(outputs[0], dtype=np.float64).reshape(len(images))
        if self.info.classes is None:
            return p_valid, [reasons.UNSPECIFIED] * len(images)
        likeliest = np.argmax(np.asarray(outputs[1])[:, 1:], axis=1) + 1
        return p_valid, [self.info.classes[k] for k in likeliest]

    def scores(self, images: list[np.ndarray]) -> list[Score]:
        """The scores of several images, run as one batch."""
        threshold, version = self.info.threshold, self.info.version
        scores = []
        for pixels, p, reason in zip(images, *self.predict(images)):
            proven = reasons.by_construction(pixels)
            flagged = proven is not None or float(p) < threshold
            scores.append(Score(anomaly_score=1.0 if proven else 1.0 - float(p), flagged=flagged,
                                model_version=version, threshold=threshold,
                                reason=(proven or reason) if flagged else None))
        return scores

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
        return dict.fromkeys(("anomaly_score", "flagged", "anomaly_reason", "model_version", "threshold"))
    return {"anomaly_score": score.anomaly_score, "flagged": score.flagged,
            "anomaly_reason": score.reason, "model_version": score.model_version,
            "threshold": score.threshold}


