"""The dataset builder: valid images, their augmentations and the invalid class, split by
patient (or study), written as PNG folders with one manifest.

Layout under the output folder (as the predecessor's tree, one subfolder per kind)::

    valid/original, valid/window, valid/blur, valid/flip_rotate, valid/zoom
    invalid/pictures, invalid/textures, invalid/charts, invalid/screens,
    invalid/photos, invalid/artwork, invalid/screenshots      (real pictures, training.realinvalid)
    invalid/message_box, invalid/dialog, invalid/broken, invalid/byte_order, invalid/row_stride,
    invalid/custom, invalid/archive_anomaly
    valid/reviewed, invalid/reviewed      (the plugin's index: images reviewers judged)
    test_valid/custom                      (only ever in the test split)
    manifest.csv                           one row per file: label, split, patient, parameters

The PNGs hold 8-bit display pixels; training applies ``preprocess.model_input`` when it loads
them, exactly as the plugin does on its renders. The classes are balanced per split: derived
invalid images (message boxes, broken renders) come from the split's own valid images, and
generated ones fill up to the split's valid count (capped by ``max_invalid``).

Every row also names its class for the model's reason head (``reason``: ``valid`` or one of
``minipacs.reasons.REASONS``), derived from its kind and parameters by :func:`reason_of`.
"""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from minipacs import preprocess, reasons, render
from training import invalid, realinvalid
from training.augment import AUGMENTATIONS, AugmentConfig
from training.sources import Candidate, Valid, load_any, picture_pixels

SPLITS = ("train", "validate", "test")
MANIFEST = "manifest.csv"
COLUMNS = ("file", "label", "class", "kind", "split", "patient", "study", "source", "reason", "params")

# Kinds of invalid image and the reason each stands for (broken renders: by their sub-kind).
KIND_REASONS = {**dict.fromkeys(("pictures", "textures", "charts", "screens", "custom", "photos", "artwork",
                                 "screenshots"), reasons.PICTURE),
                **dict.fromkeys(("message_box", "dialog"), reasons.OVERLAY)}
ANOMALY_REASONS = {"burned_in_dialog": reasons.OVERLAY, "photograph": reasons.PICTURE,
                   "saturated_window": f"{reasons.BROKEN}:clipped_window",
                   "corrupted_rows": f"{reasons.BROKEN}:corrupted_rows"}


def reason_of(label: int, kind: str, params: dict) -> str:
    """The model class of a dataset image: ``valid``, or why it is invalid."""
    if label:
        return "valid"
    if kind == "reviewed":
        return params["reason"]
    if kind == "archive_anomaly":
        return ANOMALY_REASONS[params["anomaly"]]
    if "broken" in params:
        return f"{reasons.BROKEN}:{realinvalid.BROKEN_SUBKINDS[params['broken']]}"
    return KIND_REASONS[kind]


@dataclass(frozen=True)
class RealInvalid:
    """Real invalid material (training.realinvalid): pictures, captured dialogs and windows.
    Each file is one group of the split, so none is seen in two splits."""

    pictures: tuple = ()  # realinvalid.Picture of photos, artwork and packaged screenshots
    dialogs: tuple = ()  # paths of dialog screenshots
    windows: tuple = ()  # realinvalid.Picture of captured application windows


@dataclass(frozen=True)
class DatasetConfig:
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_by: str = "patient"  # or "study"
    augmentations: int = 2  # augmented copies per valid image, cycling through AUGMENTATIONS
    derived_share: float = 0.5  # share of the invalid class made from valid images
    max_valid: int | None = None  # cap on original valid images (spread over the source)
    max_invalid: int | None = None
    seed: int = 0
    review_weight: int = 5  # copies of each reviewed image in the training split
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def assign_splits(groups: list[str], ratios, rng) -> dict[str, str]:
    """Shuffle the groups and cut them by ``ratios``; with 3+ groups every split gets one."""
    groups = sorted(set(groups))
    rng.shuffle(groups)
    n = len(groups)
    n_val = max(1, round(n * ratios[1])) if n >= 3 else 0
    n_test = max(1, round(n * ratios[2])) if n >= 3 else 0
    cut = n - n_val - n_test
    return {g: "train" if i < cut else "validate" if i < cut + n_val else "test" for i, g in enumerate(groups)}


def stratum(group: str) -> str:
    """The source a split group belongs to: ``registry:package[:source]`` of a real volume or
    series (its group minus the last field), "" for the synthetic studies and other folders."""
    return group.rsplit(":", 1)[0] if ":" in group else ""


def stratified_splits(groups: list[str], ratios, rng) -> dict[str, str]:
    """:func:`assign_splits` within each source, so that every source of 3+ volumes or
    patients (real packages, not only the synthetic studies) has one in the test split."""
    by_source: dict[str, list[str]] = {}
    for g in sorted(set(groups)):
        by_source.setdefault(stratum(g), []).append(g)
    return {g: split for members in by_source.values() for g, split in assign_splits(members, ratios, rng).items()}


class Writer:
    """Writes PNGs into their subfolder and their rows into the manifest, counting per split."""

    def __init__(self, out: Path):
        self.out, self.count = out, 0
        self.labels = {(s, label): 0 for s in SPLITS for label in (0, 1)}
        self.file = open(out / MANIFEST, "w", newline="")
        self.csv = csv.DictWriter(self.file, COLUMNS)
        self.csv.writeheader()

    def __call__(self, pixels: np.ndarray, label: int, klass: str, kind: str, split: str,
                 patient: str = "", study: str = "", source: str = "", params: dict | None = None):
        relative = Path(klass) / kind / f"{self.count:07d}.png"
        (self.out / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.out / relative).write_bytes(render.encode_png(np.ascontiguousarray(pixels, np.uint8)))
        self.csv.writerow(dict(file=str(relative), label=label, **{"class": klass}, kind=kind, split=split,
                               patient=patient, study=study, source=source,
                               reason=reason_of(label, kind, params or {}), params=json.dumps(params or {})))
        self.count += 1
        if klass != "test_valid":
            self.labels[split, label] += 1

    def close(self):
        self.file.close()


def build(out: Path, candidates: list[Candidate], load: Callable[[str], Valid | None], cfg: DatasetConfig,
          custom_invalid: Path | None = None, test_valid: Path | None = None,
          real: RealInvalid = RealInvalid()) -> dict:
    """Build the dataset in ``out``; returns the counts per split and class."""
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.max_valid and len(candidates) > cfg.max_valid:
        keep = np.linspace(0, len(candidates) - 1, cfg.max_valid).round().astype(int)
        candidates = [candidates[i] for i in keep]
    group = (lambda c: c.patient) if cfg.split_by == "patient" else (lambda c: c.study)
    split_of = stratified_splits([group(c) for c in candidates], cfg.ratios, rng)
    write = Writer(out)
    split_real = {name: assign_splits([g(x) for x in files], cfg.ratios, rng) for name, files, g in (
        ("pictures", real.pictures, lambda p: p.group), ("dialogs", real.dialogs, lambda p: p.name),
        ("windows", real.windows, lambda p: p.group))}
    real_in = {split: (tuple(p for p in real.pictures if split_real["pictures"][p.group] == split),
                       tuple(p for p in real.dialogs if split_real["dialogs"][p.name] == split),
                       tuple(p for p in real.windows if split_real["windows"][p.group] == split))
               for split in SPLITS}
    try:
        valid_images(write, candidates, load, split_of, group, cfg, rng, real_in)
        if custom_invalid:
            for path in tqdm(pictures_in(custom_invalid), desc="custom invalid", unit="img"):
                write(picture_pixels(path), 0, "invalid", "custom", str(rng.choice(SPLITS, p=cfg.ratios)),
                      source=str(path))
        generated_invalid(write, cfg, rng, real_in)
        if test_valid:
            for path in tqdm(sorted(p for p in test_valid.rglob("*") if p.is_file()), desc="test valid", unit="img"):
                image = load_any(str(path))
                if image is not None:
                    write(image.pixels, 1, "test_valid", "custom", "test", source=str(path))
    finally:
        write.close()
    return {f"{split}/{'valid' if label else 'invalid'}": n for (split, label), n in write.labels.items()}


def derived_kinds(dialogs: tuple) -> dict[str, Callable]:
    """Invalid images made from a valid one: Pillow-drawn boxes, broken renders, and where
    there are captured dialogs, real dialogs burned in, wrong byte order and row stride."""
    kinds = dict(invalid.DERIVED)
    kinds.update(byte_order=realinvalid.byte_order, row_stride=realinvalid.row_stride)
    if dialogs:
        kinds["dialog"] = lambda image, rng: realinvalid.overlay_dialog(image, rng, dialogs)
    return kinds


def valid_images(write: Writer, candidates, load, split_of, group, cfg: DatasetConfig, rng,
                 real_in: dict) -> None:
    """Originals, their augmentations, and the invalid images derived from them."""
    kinds = list(AUGMENTATIONS)
    made = {split: derived_kinds(real_in[split][1]) for split in SPLITS}
    owed, turn = 0.0, 0
    for c in tqdm(candidates, desc="valid images", unit="img"):
        image = load(c.key)
        if image is None:
            continue
        where = dict(split=split_of[group(c)], patient=c.patient, study=c.study, source=c.key)
        if image.anomaly:  # a synthetic study's deliberate anomaly
            write(image.pixels, 0, "invalid", "archive_anomaly", params={"anomaly": image.anomaly}, **where)
            continue
        if image.review:
            reviewed(write, image, where, cfg.review_weight)
            continue
        write(image.pixels, 1, "valid", "original", **where)
        for _ in range(cfg.augmentations):
            kind = kinds[turn % len(kinds)]
            turn += 1
            pixels, params = AUGMENTATIONS[kind](image, rng, cfg.augment)
            write(pixels, 1, "valid", kind, params=params, **where)
        owed += (1 + cfg.augmentations) * cfg.derived_share
        derived = made[where["split"]]
        while owed >= 1:
            kind = list(derived)[int(rng.integers(len(derived)))]
            try:
                pixels, params = derived[kind](image, rng)
            except realinvalid.NotApplicable:  # e.g. no byte order to swap in a colour image
                continue
            write(pixels, 0, "invalid", kind, params=params, **where)
            owed -= 1


def reviewed(write: Writer, image: Valid, where: dict, weight: int) -> None:
    """An image a reviewer judged, with the reviewer's label (a dismissed flag is valid, a
    confirmed flag or a reported miss invalid, for its reason): ``weight`` copies in the
    training split, so that the team's corrections count beside the many generated images;
    one elsewhere (``copy`` 0 is the one the report compares models on)."""
    review = image.review
    valid = review["verdict"] == "valid"
    params = {**review, "outcome": ("dismissed" if review["model_flagged"] else "agreed") if valid
              else ("confirmed" if review["model_flagged"] else "missed")}
    for copy in range(weight if where["split"] == "train" else 1):
        write(image.pixels, int(valid), "valid" if valid else "invalid", "reviewed",
              params={**params, "copy": copy}, **where)


def generated_invalid(write: Writer, cfg: DatasetConfig, rng, real_in: dict) -> None:
    """Fill each split's invalid class up to its valid count (or ``max_invalid`` overall) with
    pictures, textures, charts and screens, and the split's own real pictures and captured
    windows. Packaged pictures are split by file, so no picture is cropped into two splits."""
    valid = {s: write.labels[s, 1] for s in SPLITS}
    target = dict(valid)
    if cfg.max_invalid and sum(valid.values()) > cfg.max_invalid:
        target = {s: int(n * cfg.max_invalid / sum(valid.values())) for s, n in valid.items()}
    files = invalid.package_pictures()
    picture_split = assign_splits([p.name for p in files], cfg.ratios, rng)
    total = sum(max(0, target[s] - write.labels[s, 0]) for s in SPLITS)
    with tqdm(total=total, desc="generated invalid", unit="img") as bar:
        for split in SPLITS:
            pictures, _, windows = real_in[split]
            makers = {"pictures": lambda r: invalid.picture(r, [p for p in files if picture_split[p.name] == split]),
                      **{k: v for k, v in invalid.GENERATED.items() if k != "pictures"}}
            photos = [p for p in pictures if p.kind in ("photo", "mixed")]
            art = [p for p in pictures if p.kind in ("artwork", "mixed")]
            shots = list(windows) + [p for p in pictures if p.kind == "screenshot"]
            for name, choices, maker in (("photos", photos, realinvalid.photos), ("artwork", art, realinvalid.artwork),
                                         ("screenshots", shots, realinvalid.screenshots)):
                if choices:
                    makers[name] = lambda r, c=choices, m=maker: m(r, c)
            # Real pictures are what an archive receives by mistake: they come twice per cycle.
            kinds = list(makers) + [k for k in ("photos", "artwork", "screenshots") if k in makers]
            for i in range(max(0, target[split] - write.labels[split, 0])):
                kind = kinds[i % len(kinds)]
                pixels, params = makers[kind](rng)
                write(pixels, 0, "invalid", kind, split, params=params)
                bar.update()


def pictures_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in invalid.PICTURE_SUFFIXES)


def read_manifest(data: Path) -> list[dict]:
    with open(data / MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


def load_split(data: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The model input of one split: ``preprocess.batch`` of the PNGs, class indices into
    ``reasons.CLASSES`` (0 = valid), manifest rows; each row's ``proven`` is what
    ``reasons.checks`` says of the full-size PNG, as the plugin checks it before the
    network (None or a reason)."""
    rows = [r for r in read_manifest(data) if r["split"] == split]
    images = [picture_pixels(data / r["file"]) for r in tqdm(rows, desc=f"loading {split}", unit="img")]
    for row, pixels in zip(rows, images):
        row["proven"] = reasons.checks(pixels)
    x = preprocess.batch(images, size) if images else np.zeros((0, size, size, 1), np.float32)
    return x, np.array([reasons.CLASSES.index(r["reason"]) for r in rows], np.int64), rows
