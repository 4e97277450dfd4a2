"""How an exported model judges real DICOM it never saw: every CT/MR/CR/DX image of the given
files, rendered with its own window by the plugin's renderer, scored through ONNX Runtime as the
plugin scores it (``minipacs.scoring.Scorer``: the checks by construction, the threshold and the
reasons included). These images are all valid, so the share classified valid is the number."""

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from minipacs import render
from minipacs.scoring import Scorer

MODALITIES = {"CT", "MR", "CR", "DX"}


def pydicom_corpus() -> list[Path]:
    """pydicom's test files and pydicom-data's, as tests/corpus.py lists them."""
    from tests.corpus import pydicom_data_files, pydicom_test_files

    return pydicom_test_files() + pydicom_data_files()


def demo(onnx_path: Path) -> dict:
    """The demo archive (``minipacs.demo``: synthetic patients, a deliberate anomaly in most)
    scored as the plugin scores it: which anomalies are flagged, with what reason, and which
    normal images are flagged (false alarms)."""
    from minipacs import demo as archive, synth

    scorer = Scorer(onnx_path)
    anomalies, false_alarms, images = [], [], 0
    for ds in synth.generate(archive.PATIENTS, archive.SEED, slices=archive.SLICES, anomalies=archive.ANOMALIES):
        images += 1
        score = scorer.score(render.render(ds).pixels)
        comment = str(ds.get("ImageComments", ""))
        entry = {"instance": f"{ds.PatientID}/{ds.Modality}/{ds.InstanceNumber}", "reason": score.reason,
                 "p_valid": round(1 - score.anomaly_score, 4)}
        if comment.startswith(synth.ANOMALY_COMMENT):
            anomalies.append({**entry, "anomaly": comment[len(synth.ANOMALY_COMMENT):], "flagged": score.flagged})
        elif score.flagged:
            false_alarms.append(entry)
    return {"images": images, "anomalies": anomalies, "flagged": sum(a["flagged"] for a in anomalies),
            "false_alarms": false_alarms}


def score(onnx_path: Path, files: list[Path]) -> dict:
    scorer = Scorer(onnx_path)
    results = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            if str(ds.get("Modality", "")) not in MODALITIES:
                continue
            pixels = render.render(ds).pixels
        except (render.NoPixelData, render.RenderError, InvalidDicomError, ValueError, OSError, AttributeError):
            continue
        score = scorer.score(pixels)
        results.append({"file": path.name, "modality": str(ds.Modality),
                        "p_valid": round(1 - score.anomaly_score, 4), "valid": not score.flagged,
                        "reason": score.reason})
    share = float(np.mean([r["valid"] for r in results])) if results else None
    return {"images": len(results), "share_valid": share, "threshold": scorer.info.threshold, "files": results}
