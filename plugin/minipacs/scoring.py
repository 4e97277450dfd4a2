"""The anomaly model: an ONNX file run by ONNX Runtime on the CPU, loaded once, swappable live.

The model outputs P(valid) for an image preprocessed by :mod:`minipacs.preprocess`; the model
file says which preprocessing, input size and threshold it was trained with (its metadata), and
a model made for another preprocessing is refused. An image is flagged when P(valid) is below
the threshold; its anomaly score is 1 − P(valid), so higher means more anomalous.

A model that also outputs ``p_class`` (one probability per class of its ``minipacs.classes``
metadata) gives each flag its reason: the likeliest class other than valid. The checks of
:func:`reasons.checks` run first: what they find is flagged with score 1 whatever the
network says.

A model that also outputs ``p_window`` (P that an image is a GUI window, read on a crop) looks
closer at an image it would pass: each box :func:`windows.candidates` finds is cropped
(:func:`windows.crop`) and run through the model; a crop whose ``p_window`` reaches the
model's window threshold flags the image ``overlay``. A dialog a tenth of the side wide is a
smudge at 128 pixels but fills the crop. Most scans have no such box (one render in nine of
the training data has), so this costs one more inference on those only.

A model is checked before it is put in use (:func:`check_signature`, the metadata ranges and a
test inference): a reload of a model made for something else answers why, and the model in use
stays.
"""

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ONNX Runtime >= 1.32 sends usage telemetry from Linux too, and writes a device ID under $HOME
# (a warning in a read-only container). A hospital archive should not call out: off unless the
# operator sets the variable. Set before the import, which reads it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime  # noqa: E402

from . import preprocess, reasons, windows


class ModelError(Exception):
    """The model file is missing, unreadable or made for something else; the message says why."""


INPUT_SIZES = range(16, 1025)  # the metadata input_size a model may declare
WINDOW_OUTPUT = "p_window"
#: Key of the ONNX metadata holding the p_window a crop must reach to flag its image.
METADATA_WINDOW_THRESHOLD = "minipacs.window_threshold"


def _shape(shape: list) -> str:
    return "(" + ", ".join("N" if not isinstance(d, int) else str(d) for d in shape) + ")"


def _check_output(outputs: dict, name: str, width: int) -> None:
    """A float output of shape (N, width); a dimension left symbolic is accepted."""
    output = outputs.get(name)
    if output is None:
        raise ModelError(f"has no output {name!r} (it has {', '.join(outputs) or 'none'})")
    shape = output.shape
    if output.type != "tensor(float)" or len(shape) != 2 or (
            isinstance(shape[1], int) and shape[1] != width):
        raise ModelError(f"output {name!r} is {output.type} {_shape(shape)}, not float (N, {width})")


def check_signature(session: onnxruntime.InferenceSession, size: int,
                    classes: tuple[str, ...] | None) -> int | None:
    """Refuse a model whose input is not one float (N, size, size, 1) image batch (NHWC, as
    :func:`preprocess.batch` makes it), or whose outputs are not p_valid (N, 1) and, when it
    names classes, p_class (N, classes), and p_window (N, 1) when it has one. Returns its fixed
    batch size, None when dynamic."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"has {len(inputs)} inputs, not one image batch")
    image = inputs[0]
    shape = image.shape
    if image.type != "tensor(float)" or len(shape) != 4 or any(
            isinstance(d, int) and d != e for d, e in zip(shape[1:], (size, size, 1))):
        raise ModelError(f"input {image.name!r} is {image.type} {_shape(shape)}, not float "
                         f"(N, {size}, {size}, 1) as its metadata input_size {size} says")
    outputs = {output.name: output for output in session.get_outputs()}
    _check_output(outputs, "p_valid", 1)
    if classes:
        _check_output(outputs, "p_class", len(classes))
    if WINDOW_OUTPUT in outputs:
        _check_output(outputs, WINDOW_OUTPUT, 1)
    batch = shape[0]
    if isinstance(batch, int) and batch < 1:
        raise ModelError(f"input {image.name!r} has a batch of {batch}")
    return batch if isinstance(batch, int) else None


def test_images(size: int) -> list[np.ndarray]:
    """A blank image and one of noise: what a test inference runs on."""
    return [np.zeros((size, size), np.uint8),
            np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)]


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
    window_threshold: float | None = None  # None: the model has no p_window output

    def as_json(self) -> dict:
        return {"Path": self.path, "Version": self.version, "InputSize": self.input_size,
                "Threshold": self.threshold, "Preprocessing": self.preprocessing,
                "Sha256": self.sha256, "LoadedAt": self.loaded_at,
                "Reasons": list(self.classes[1:]) if self.classes else [reasons.UNSPECIFIED],
                "WindowThreshold": self.window_threshold}


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
            window_threshold = float(meta.get(METADATA_WINDOW_THRESHOLD, 0.5))
        except (KeyError, ValueError) as exc:
            raise ModelError(f"model {path} lacks a valid {exc} in its metadata") from exc
        if size not in INPUT_SIZES:
            raise ModelError(f"model {path} declares input_size {size}, outside "
                             f"{INPUT_SIZES.start}..{INPUT_SIZES.stop - 1}")
        for name, value in (("threshold", model_threshold), ("window threshold", window_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ModelError(f"model {path} declares {name} {value}, outside [0, 1]")
        self.outputs = ["p_valid"]
        classes = None
        if meta.get(reasons.METADATA_CLASSES):
            classes = tuple(meta[reasons.METADATA_CLASSES].split(","))
            if classes[0] != "valid" or "p_class" not in {o.name for o in self.session.get_outputs()}:
                raise ModelError(f"model {path} names classes {classes} but has no p_class output "
                                 "with 'valid' first")
            self.outputs.append("p_class")
        windowed = WINDOW_OUTPUT in {o.name for o in self.session.get_outputs()}
        if windowed:
            self.outputs.append(WINDOW_OUTPUT)
        try:
            self.batch = check_signature(self.session, size, classes)
        except ModelError as exc:
            raise ModelError(f"model {path} {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.info = ModelInfo(
            path=str(path), version=meta.get(preprocess.METADATA_VERSION, path.stem),
            input_size=size, threshold=model_threshold if threshold is None else threshold,
            preprocessing=preprocess.PREPROCESSING, sha256=hashlib.sha256(data).hexdigest(),
            loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), classes=classes,
            window_threshold=window_threshold if windowed else None)
        self._test_inference(path)

    def _test_inference(self, path: Path) -> None:
        """Run the model once on :func:`test_images`: it must give each a probability, finite
        and within [0, 1] (p_class and p_window too), or it would fail, or mislead, on every image."""
        try:
            outputs = self._run(preprocess.batch(test_images(self.info.input_size), self.info.input_size))
        except Exception as exc:
            raise ModelError(f"model {path} failed a test inference: {type(exc).__name__}: {exc}") from exc
        widths = {"p_valid": 1, "p_class": len(self.info.classes or ()), WINDOW_OUTPUT: 1}
        for name, values in outputs.items():
            width = widths[name]
            if values.shape != (2, width) or not (np.isfinite(values).all() and
                                                  ((values >= 0) & (values <= 1)).all()):
                raise ModelError(f"model {path} gave {name} {values.tolist()} on a blank and a "
                                 f"noise image: not {width} probabilit(ies) in [0, 1] each")

    def _run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs by name for a batch of model inputs; a model with a fixed batch size
        runs on slices of that size, the last padded with blank images."""
        step = self.batch or len(inputs)
        parts = []
        for start in range(0, len(inputs), step):
            chunk = inputs[start:start + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outputs = self.session.run(self.outputs, {self.input_name: padded})
            parts.append([np.asarray(o, dtype=np.float64)[:len(chunk)] for o in outputs])
        return {name: np.concatenate(values) for name, values in zip(self.outputs, zip(*parts))}

    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """P(valid) of each image (8-bit display pixels), and the reason it would be flagged
        for: the likeliest class other than valid."""
        outputs = self._run(preprocess.batch(images, self.info.input_size))
        p_valid = outputs["p_valid"].reshape(len(images))
        if self.info.classes is None:
            return p_valid, [reasons.UNSPECIFIED] * len(images)
        likeliest = np.argmax(outputs["p_class"][:, 1:], axis=1) + 1
        return p_valid, [self.info.classes[k] for k in likeliest]

    def window_seen(self, images: list[np.ndarray]) -> list[float]:
        """For each image, the highest ``p_window`` of the crops around its candidate boxes
        (0 when it has none, or the model no p_window): all crops run as one batch."""
        if self.info.window_threshold is None:
            return [0.0] * len(images)
        crops, owners = windows.crops(images)
        seen = [0.0] * len(images)
        if crops:
            p_window = self._run(preprocess.batch(crops, self.info.input_size))[WINDOW_OUTPUT][:, 0]
            for n, p in zip(owners, p_window):
                seen[n] = max(seen[n], float(p))
        return seen

    def scores(self, images: list[np.ndarray]) -> list[Score]:
        """The scores of several images, run as one batch."""
        threshold, version = self.info.threshold, self.info.version
        p_valid, why = self.predict(images)
        found = [reasons.checks(pixels) for pixels in images]
        if self.info.window_threshold is not None:  # a closer look at what would pass
            passed = [n for n, (f, p) in enumerate(zip(found, p_valid)) if f is None and p >= threshold]
            for n, seen in zip(passed, self.window_seen([images[n] for n in passed])):
                if seen >= self.info.window_threshold:
                    found[n] = reasons.OVERLAY
        scores = []
        for f, p, reason in zip(found, p_valid, why):
            flagged = f is not None or float(p) < threshold
            scores.append(Score(anomaly_score=1.0 if f else 1.0 - float(p), flagged=flagged,
                                model_version=version, threshold=threshold,
                                reason=(f or reason) if flagged else None))
        return scores

    def score(self, pixels: np.ndarray) -> Score:
        return self.scores([pixels])[0]


class ModelSlot:
    """The model in use, swapped atomically; a failed reload keeps the previous model.
    ``path`` is the configured file: what a reload without a path loads, whatever was loaded
    since."""

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
            self._scorer, self.error = scorer, None
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


