"""The ``MiniPacs`` section of Orthanc's configuration, with defaults and validation."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

SECTION = "MiniPacs"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "minipacs-anomaly.onnx"
# Where ./minipacs.sh setup unpacks the npm package @ohif/app (the repository's .ohif/).
DEFAULT_OHIF = Path(__file__).resolve().parent.parent.parent / ".ohif" / "dist"


class ConfigError(ValueError):
    """A ``MiniPacs`` option has the wrong type or value; the message names it."""


@dataclass(frozen=True)
class Config:
    data_directory: Path
    png_directory: Path
    database: Path
    png_compress_level: int
    window_index: int
    queue_size: int
    workers: int
    defer_while_storing: int
    reconcile_on_start: bool
    reconcile_interval: int
    model_path: Path | None
    anomaly_threshold: float | None
    ohif_directory: Path
    sandbox: bool
    renderer_memory_mb: int
    renderer_seconds: int
    attempts: int
    publish: str
    automatic_key_objects: bool
    postgresql: str | None
    claim_lease: int


_DEFAULTS: dict[str, Any] = {
    "DataDirectory": None,  # ./minipacs-data
    "PngDirectory": None,  # DataDirectory/png
    "Database": None,  # DataDirectory/index.sqlite
    "PngCompressLevel": 1,
    "WindowIndex": 0,
    "QueueSize": 100000,
    "Workers": 2,
    "DeferWhileStoring": 10,
    "ReconcileOnStart": True,
    "ReconcileInterval": 60,
    "ModelPath": None,  # the shipped model; "" turns scoring off
    "AnomalyThreshold": None,  # the model's own
    "OhifDirectory": None,  # <repository>/.ohif/dist
    "Sandbox": True,  # render and score in child processes with the limits below
    "RendererMemoryLimit": 2048,  # MB of address space a renderer may add to what it maps at start
    "RendererTimeLimit": 60,  # seconds (wall and CPU) a renderer may spend on one instance
    "MaxAttempts": 3,  # renderings that never finished before an instance is given up
    "PublishToOrthanc": "none",  # which scores become Orthanc metadata: none, flagged, all
    "AutomaticKeyObjects": False,  # a KOS in every flagged study (else on request, then kept)
    # A PostgreSQL connection string: the index shared by several Orthanc nodes (docs/cluster.md)
    # instead of the SQLite file "Database".
    "PostgreSQL": None,
    "ClaimLease": 30,  # seconds before another node takes the work of a node that stopped answering
}
PUBLISH_MODES = ("none", "flagged", "all")
# The integer options' bounds: (lowest, highest or None, unit for the message).
_BOUNDS: dict[str, tuple[int, int | None, str]] = {
    "PngCompressLevel": (0, 3, ""),
    "WindowIndex": (0, None, ""),
    "QueueSize": (1, None, ""),
    "Workers": (1, 16, ""),
    "DeferWhileStoring": (0, 3600, " seconds"),
    "ReconcileInterval": (0, None, " (off)"),
    "RendererMemoryLimit": (64, 1 << 20, " MB"),
    "RendererTimeLimit": (1, 3600, " seconds"),
    "MaxAttempts": (1, 100, ""),
    "ClaimLease": (3, 3600, " seconds"),
}


def _typed(options: Mapping[str, Any], key: str, kind: type) -> Any:
    value = options.get(key, _DEFAULTS[key])
    if value is None:
        return None
    # bool is an int in Python: refuse true/false where a number is wanted.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{SECTION}.{key} must be of type {kind.__name__}, not {value!r}")
    return value


def _bounded(options: Mapping[str, Any], key: str) -> int:
    value = _typed(options, key, int)
    low, high, unit = _BOUNDS[key]
    if high is None and value < low:
        raise ConfigError(f"{SECTION}.{key} must be at least {low}{unit}, not {value}")
    if high is not None and not low <= value <= high:
        raise ConfigError(f"{SECTION}.{key} must be within {low}..{high}{unit}, not {value}")
    return value


def from_orthanc(configuration: Mapping[str, Any], base: Path | None = None) -> Config:
    """Build the plugin's configuration from Orthanc's whole configuration.

    Relative paths are resolved against ``base`` (the working directory of Orthanc, as Orthanc
    itself does for ``StorageDirectory``).
    """
    options = configuration.get(SECTION, {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"{SECTION} must be a JSON object")
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown {SECTION} option(s): {', '.join(unknown)}")
    base = base or Path.cwd()

    def path(key: str, default: Path | None) -> Path | None:
        value = _typed(options, key, str)
        return default if value is None else (base / value)

    data = path("DataDirectory", base / "minipacs-data")
    ints = {key: _bounded(options, key) for key in _BOUNDS}
    threshold = options.get("AnomalyThreshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise ConfigError(f"{SECTION}.AnomalyThreshold must be a number within [0, 1], not {threshold!r}")
    model = _typed(options, "ModelPath", str)
    if _typed(options, "OhifDirectory", str) == "":
        raise ConfigError(f"{SECTION}.OhifDirectory must not be empty")
    publish = _typed(options, "PublishToOrthanc", str)
    if publish not in PUBLISH_MODES:
        raise ConfigError(f"{SECTION}.PublishToOrthanc must be one of {', '.join(PUBLISH_MODES)}, "
                          f"not {publish!r}")
    postgresql = _typed(options, "PostgreSQL", str)
    if postgresql is not None and "Database" in options:
        raise ConfigError(f"{SECTION}.PostgreSQL and {SECTION}.Database name two indexes: keep one")
    if postgresql == "":
        raise ConfigError(f"{SECTION}.PostgreSQL must be a connection string, not empty")
    return Config(
        data_directory=data,
        png_directory=path("PngDirectory", data / "png"),
        database=path("Database", data / "index.sqlite"),
        png_compress_level=ints["PngCompressLevel"],
        window_index=ints["WindowIndex"],
        queue_size=ints["QueueSize"],
        workers=ints["Workers"],
        defer_while_storing=ints["DeferWhileStoring"],
        reconcile_on_start=_typed(options, "ReconcileOnStart", bool),
        reconcile_interval=ints["ReconcileInterval"],
        model_path=DEFAULT_MODEL if model is None else (base / model if model else None),
        anomaly_threshold=None if threshold is None else float(threshold),
        ohif_directory=path("OhifDirectory", DEFAULT_OHIF),
        sandbox=_typed(options, "Sandbox", bool),
        renderer_memory_mb=ints["RendererMemoryLimit"],
        renderer_seconds=ints["RendererTimeLimit"],
        attempts=ints["MaxAttempts"],
        publish=publish,
        automatic_key_objects=_typed(options, "AutomaticKeyObjects", bool),
        postgresql=postgresql,
        claim_lease=ints["ClaimLease"],
    )
