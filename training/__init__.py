"""Offline training of minipacs's anomaly model: dataset → Keras CNN → evaluation → ONNX.

Runs in its own venv (.venv-training: TensorFlow needs numpy < 2) with ``PYTHONPATH=plugin`` so
that images are rendered and preprocessed by the plugin's own modules, never a copy of them.
"""

import os

# As the plugin's scoring module does: ONNX Runtime's telemetry off unless the user sets it
# (read when onnxruntime is imported, which export.py does before importing minipacs).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
