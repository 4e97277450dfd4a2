"""The window head: P(a crop shows a GUI window), the plugin's closer look at an image the
network would pass (``scoring.Scorer.window_seen``).

A dialog a tenth of a 512-pixel image wide is 13 pixels in the network's 128-pixel view, but
``minipacs.windows.candidates`` still finds its frame at full resolution, among the boxes anatomy
draws too (one valid render in nine has one). Cropped around the box (``windows.crop``, the
same crop the plugin makes), the dialog fills the view and its text and buttons show. The head
is one logistic unit on the frozen MobileNetV2 features the classes' heads read, so the ONNX
model computes it with them, and a crop costs one inference.

Examples come from the dataset's own splits: crops around the candidate boxes of the dialog
and message-box composites (a box over the burned-in one, ``params["box"]`` = x, y, w, h, is a
window; one beside it is not), of the valid renders (none is), and one valid render in seven
cropped at a random box of a dialog's shape (none is).
"""

import json
from pathlib import Path

import keras
import numpy as np
from keras import layers

from minipacs import windows
from training.sources import picture_pixels

#: Composites whose burned-in box is a window.
WINDOW_KINDS = ("dialog", "message_box")
#: Share of valid renders also cropped at a random box.
RANDOM_SHARE = 1 / 7


def over(box: tuple[int, int, int, int], drawn: list[int]) -> bool:
    """Whether at least half of a found ``box`` (x0, y0, x1, y1) lies on the ``drawn`` one (x, y, w, h)."""
    x, y, w, h = drawn
    across = min(box[2], x + w - 1) - max(box[0], x) + 1
    down = min(box[3], y + h - 1) - max(box[1], y) + 1
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    return across > 0 and down > 0 and across * down >= 0.5 * area


def random_box(shape: tuple[int, int], rng) -> tuple[int, int, int, int] | None:
    """A box of a dialog's shape (5-50 % of the width, 20-80 % as tall) somewhere in the image."""
    h, w = shape
    bw = int(w * rng.uniform(0.05, 0.5))
    bh = max(6, int(bw * rng.uniform(0.2, 0.8)))
    if bw < 8 or bh >= h:
        return None
    x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    return x, y, x + bw - 1, y + bh - 1


def examples(data: Path, rows: list[dict], rng) -> tuple[list[np.ndarray], np.ndarray]:
    """Crops and labels (1 = a window) from the grey images of ``rows``."""
    crops, labels = [], []
    for row in rows:
        if row["kind"] not in WINDOW_KINDS and row["class"] != "valid":
            continue
        pixels = picture_pixels(data / row["file"])
        if pixels.ndim != 2:
            continue
        drawn = json.loads(row["params"] or "{}").get("box") if row["kind"] in WINDOW_KINDS else None
        boxes = [(box, drawn is not None and over(box, drawn)) for box in windows.candidates(pixels)]
        if row["class"] == "valid" and rng.random() < RANDOM_SHARE and (box := random_box(pixels.shape, rng)):
            boxes.append((box, False))
        for box, label in boxes:
            crops.append(windows.crop(pixels, box))
            labels.append(int(label))
    return crops, np.array(labels, np.float32)


def head(features: np.ndarray) -> keras.Model:
    """Features → P(window): standardised by the training features' statistics, one sigmoid unit."""
    inputs = keras.Input(shape=features.shape[1:], name="features")
    x = layers.Normalization(mean=features.mean(axis=0), variance=features.var(axis=0) + 1e-6)(inputs)
    outputs = layers.Dense(1, activation="sigmoid", kernel_regularizer=keras.regularizers.l2(1e-3))(x)
    return keras.Model(inputs, outputs, name="window")


def train(features: keras.Model, train_examples, validate_examples, seed: int, epochs: int = 30,
          batch_size: int = 64, patience: int = 4, learning_rate: float = 1e-3) -> tuple[keras.Model, dict]:
    """The head trained on the crops' features (binary cross-entropy, early stopping on the
    validation crops' loss); returns it and its history, with ``threshold``: the p_window a crop
    must reach, calibrated on the validation crops as the classes' threshold is (best F1,
    ``training.evaluate.calibrate``). A crop it flags is an image flagged: precision counts."""
    from minipacs import preprocess
    from training.evaluate import calibrate

    size = int(features.input_shape[1])
    (train_x, train_y), (validate_x, validate_y) = (
        (features.predict(preprocess.batch(crops, size), batch_size=64, verbose=0), y)
        for crops, y in (train_examples, validate_examples))
    keras.utils.set_random_seed(seed)
    model = head(train_x)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    history = model.fit(train_x, train_y, validation_data=(validate_x, validate_y), epochs=epochs,
                        batch_size=batch_size, shuffle=True, callbacks=[stop], verbose=0)
    threshold = calibrate(validate_y, model.predict(validate_x, batch_size=256, verbose=0)[:, 0])
    return model, {"threshold": threshold, **{k: [float(v) for v in values] for k, values in history.history.items()}}


def save(run: Path, model: keras.Model | None, threshold: float | None) -> None:
    """``RUN/window.keras`` and its threshold in ``RUN/window.json``; none for no head."""
    for name in ("window.keras", "window.json"):
        (run / name).unlink(missing_ok=True)
    if model is not None:
        model.save(run / "window.keras")
        (run / "window.json").write_text(json.dumps({"threshold": threshold}))


def load(run: Path) -> tuple[keras.Model | None, float | None]:
    """The head :func:`save` wrote, and its threshold; (None, None) without one."""
    if not (run / "window.keras").exists():
        return None, None
    return keras.models.load_model(run / "window.keras"), json.loads((run / "window.json").read_text())["threshold"]


def seen(features: keras.Model, window: keras.Model, data: Path, rows: list[dict]) -> np.ndarray:
    """For each row, the highest p_window of the crops around its candidate boxes (0 without),
    as ``Scorer.window_seen`` computes it."""
    from minipacs import preprocess

    size = int(features.input_shape[1])
    crops, owners = windows.crops(picture_pixels(data / row["file"]) for row in rows)
    out = np.zeros(len(rows))
    if crops:
        p = window.predict(features.predict(preprocess.batch(crops, size), batch_size=64, verbose=0),
                           batch_size=256, verbose=0)[:, 0]
        np.maximum.at(out, np.array(owners), p)
    return out
