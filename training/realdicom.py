"""How an exported model judges real DICOM it never saw: every CT/MR/CR/DX image of the given
files, rendered with its own window by the plugin's renderer, scored through ONNX Runtime as the
plugin scores it. These images are all valid, so the share classified valid is the number."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pydicom
from pydicom.errors import InvalidDicomError

from minipacs import preprocess, render

MODALITIES = {"CT", "MR", "CR", "DX"}


def pydicom_corpus() -> list[Path]:
    """pydicom's test files and pydicom-data's, as tests/corpus.py lists them."""
    from tests.corpus import pydicom_data_files, pydicom_test_files

    return pydicom_test_files() + pydicom_data_files()


def score(onnx_path: Path, files: list[Path]) -> dict:
    model = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    size, threshold = int(meta[preprocess.METADATA_INPUT_SIZE]), float(meta[preprocess.METADATA_THRESHOLD])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    results = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            if str(ds.get("Modality", "")) not in MODALITIES:
                continue
            pixels = render.render(ds).pixels
        except (render.NoPixelData, render.RenderError, InvalidDicomError, ValueError, OSError, AttributeError):
            continue
        p = float(session.run(["p_valid"], {"image": preprocess.batch([pixels], size)})[0][0, 0])
        results.append({"file": path.name, "modality": str(ds.Modality), "p_valid": round(p, 4),
                        "valid": p >= threshold})
    share = float(np.mean([r["valid"] for r in results])) if results else None
    return {"images": len(results), "share_valid": share, "threshold": threshold, "files": results}
