"""Dialogs too small for the network: how many the scorer flags, with and without the window
check and the window head.

    .venv/bin/python bench/windows.py [--model PATH] [--per-size N] [--json PATH]

Real dialogs captured on Xvfb (``training.realinvalid``'s, cached under var/realinvalid; Xvfb
and zenity needed the first time) are burned into the real CT, MR and CR images of pydicom's
corpus (at least 256 pixels wide, and accepted by the model as they are) at 5-60 % of the
image's width, at random places, with a random resampling. For each size: the share the
network alone flags, the share it flags with ``reasons.checks``, and the share the scorer flags
(with the window head's look at crops around candidate boxes, when the model has one). Also:
the check's cost on each host image, the candidates and the window head's verdicts on every
CT/MR/CR/DX frame of the corpus.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT), str(ROOT / "bench")]

from minipacs import reasons, render, windows  # noqa: E402
from minipacs.config import DEFAULT_MODEL  # noqa: E402
from minipacs.scoring import Scorer  # noqa: E402
from common import context, per_call_ms, write_results  # noqa: E402
from tests.corpus import find, scan_frames  # noqa: E402
from training import realinvalid  # noqa: E402

HOSTS = ("693_UNCI.dcm", "J2K_pixelrep_mismatch.dcm", "examples_overlay.dcm",
         "MR-SIEMENS-DICOM-WithOverlays.dcm", "RG1_UNCI.dcm", "RG3_UNCI.dcm", "eCT_Supplemental.dcm",
         "explicit_VR-UN.dcm", "MR2_UNCI.dcm", "bad_sequence.dcm")
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
RESAMPLING = (Image.Resampling.LANCZOS, Image.Resampling.BILINEAR, Image.Resampling.NEAREST)


def corpus_finds(scorer: Scorer) -> dict:
    """Frames of the corpus' CT/MR/CR/DX images checked; those the check takes for a window; those
    with a candidate box; those the window head flags."""
    frames = list(scan_frames())
    seen = scorer.window_seen([pixels for _, _, pixels in frames])
    threshold = scorer.info.window_threshold
    return {"frames": len(frames),
            "taken_for_a_window": [f"{name}[{frame}]" for name, frame, pixels in frames
                                   if windows.window_box(pixels) is not None],
            "with_candidates": [f"{name}[{frame}]" for name, frame, pixels in frames if windows.candidates(pixels)],
            "window_head_flags": [f"{name}[{frame}]" for (name, frame, _), p in zip(frames, seen)
                                  if threshold is not None and p >= threshold]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dialogs", type=Path, default=ROOT / "var" / "realinvalid")
    parser.add_argument("--per-size", type=int, default=15, help="dialogs per host image and size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    realinvalid.capture_dialogs(args.dialogs)  # a no-op once they are there
    dialogs = [np.asarray(Image.open(f).convert("L")) for f in realinvalid.dialog_files(args.dialogs)]
    scorer = Scorer(args.model)
    hosts = {name: render.render(pydicom.dcmread(find(name))).pixels for name in HOSTS}
    accepted = {name: px for name, px in hosts.items() if not scorer.score(px).flagged}
    rng = np.random.default_rng(0)
    sizes = {}
    for fraction in FRACTIONS:
        network = checked = flagged = tried = 0
        for pixels in accepted.values():
            h, w = pixels.shape
            for _ in range(args.per_size):
                dialog = dialogs[int(rng.integers(len(dialogs)))]
                bw = int(fraction * w)
                bh = max(4, round(dialog.shape[0] * bw / dialog.shape[1]))
                if bh > 0.9 * h:
                    continue
                patch = np.asarray(Image.fromarray(dialog).resize((bw, bh), RESAMPLING[int(rng.integers(3))]))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                out = pixels.copy()
                out[y:y + bh, x:x + bw] = patch
                p_valid, _ = scorer.predict([out])
                network += bool(p_valid[0] < scorer.info.threshold)
                checked += bool(p_valid[0] < scorer.info.threshold) or reasons.checks(out) is not None
                flagged += scorer.score(out).flagged
                tried += 1
        sizes[str(fraction)] = {"tried": tried, "network": network / tried, "with_checks": checked / tried,
                                "with_window_head": flagged / tried}
    cost = {name: {"shape": list(px.shape), "ms": per_call_ms(lambda: windows.window_box(px), 20),
                   "candidates": len(windows.candidates(px)),
                   "candidates_ms": per_call_ms(lambda: windows.candidates(px), 20)}
            for name, px in hosts.items()}
    corpus = corpus_finds(scorer)
    results = {**context(), "model": scorer.info.version, "window_threshold": scorer.info.window_threshold,
               "hosts": sorted(accepted), "dialogs": len(dialogs), "by_fraction_of_width": sizes,
               "window_box_ms": cost, "corpus_frames_checked": corpus["frames"],
               "corpus_frames_taken_for_a_window": corpus["taken_for_a_window"],
               "corpus_frames_with_candidates": corpus["with_candidates"],
               "corpus_frames_window_head_flags": corpus["window_head_flags"]}
    print(f"dialogs burned into {len(accepted)} real images the model accepts ({scorer.info.version}):")
    for fraction, r in sizes.items():
        print(f"  {float(fraction):4.0%} of the width: network {r['network']:.2f}, with the checks "
              f"{r['with_checks']:.2f}, with the window head {r['with_window_head']:.2f} of {r['tried']}")
    for name, c in cost.items():
        print(f"  window_box on {name} {c['shape']}: {c['ms']:.2f} ms; {c['candidates']} candidates "
              f"in {c['candidates_ms']:.2f} ms")
    print(f"  corpus CT/MR/CR/DX frames: {corpus['frames']}; taken for a window "
          f"{len(corpus['taken_for_a_window'])}, with candidates {len(corpus['with_candidates'])}, "
          f"flagged by the window head {len(corpus['window_head_flags'])}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
