"""Training benchmark: images per second, epoch by epoch, of the default network.

It is trained as ``python -m training train`` trains it: that command's defaults for
architecture, input size, batch size and learning rate, and ``training.model.train`` itself
(optimiser, callbacks, validation after each epoch). For ``mobilenet`` (frozen features, then
linear heads) that is one pass of the frozen network over the images, reported apart, then the
epochs of one head on their features.

    .venv-training/bin/python bench/training.py [--images 4096] [--epochs 3] [--json PATH]

The images are random grey (size, size, 1) float32 in [0, 1], the shape and type that
``load_split`` feeds the network: a convolutional network does the same arithmetic whatever the
pixels show, and random arrays spare building a dataset. A validation split in the default
dataset ratio is evaluated after each epoch, as in training. The first epoch also traces the
graph, so it is reported apart from the steady epochs.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT), str(ROOT / "bench")]  # ROOT first: its training/

import keras  # noqa: E402
import numpy as np  # noqa: E402

from common import context, write_results  # noqa: E402
from training.cli import parser as training_parser  # noqa: E402
from training.model import ARCHITECTURES, linear_head, mobilenet_features, train  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch, validation included."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run = context()  # before the run adds its own load
    defaults = training_parser().parse_args(["train", "--data", "-", "--run", "-"])
    ratios = training_parser().parse_args(["dataset", "--out", "-"]).ratios
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (rng.random((n, defaults.size, defaults.size, 1), np.float32),
                rng.integers(0, 2, n).astype(np.float32))

    validate = max(1, round(args.images * ratios[1] / ratios[0]))
    train_data, validate_data, features_per_s = split(args.images), split(validate), None
    if defaults.architecture == "mobilenet":
        # Random weights: the frozen network's arithmetic is the same, and the bench needs no download.
        features = mobilenet_features(defaults.size, None)
        features.predict(train_data[0][:64], verbose=0)  # traced before timing
        started = time.perf_counter()
        train_data, validate_data = ((features.predict(x, batch_size=64, verbose=0), y)
                                     for x, y in (train_data, validate_data))
        features_per_s = (args.images + validate) / (time.perf_counter() - started)
        model = linear_head(train_data[0])
    else:
        model = ARCHITECTURES[defaults.architecture](defaults.size)
    timer = EpochTimer()
    fit = model.fit  # train() takes no callbacks: its fit call gets the timer added
    model.fit = lambda *a, callbacks, **k: fit(*a, callbacks=[*callbacks, timer], **k)
    # patience = epochs: early stopping cannot cut the measured epochs short.
    train(model, train_data, validate_data, args.epochs, defaults.batch_size, args.epochs, defaults.learning_rate)
    per_s = [args.images / s for s in timer.seconds]
    steady = args.images * (len(per_s) - 1) / sum(timer.seconds[1:]) if len(per_s) > 1 else None
    results = {**run, "architecture": defaults.architecture, "input_size": defaults.size,
               "batch_size": defaults.batch_size, "train_images": args.images,
               "validate_images": validate, "epoch_seconds": timer.seconds,
               "images_per_s_by_epoch": per_s, "images_per_s_first_epoch": per_s[0],
               "images_per_s_after_first": steady, "frozen_features_images_per_s": features_per_s}
    print(f"training benchmark: {defaults.architecture} at {defaults.size}px, batch {defaults.batch_size}, "
          f"{args.images} training + {validate} validation images")
    if features_per_s:
        print(f"  frozen features, one pass: {features_per_s:7.1f} images/s")
    for epoch, (seconds, rate) in enumerate(zip(timer.seconds, per_s), 1):
        note = "  (with tracing)" if epoch == 1 else ""
        print(f"  epoch {epoch}: {seconds:6.1f} s  {rate:7.1f} images/s{note}")
    if steady:
        print(f"  after the first epoch: {steady:.1f} images/s")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
