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
    postgresql: str | None = None
    claim_lease: int = 30


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
    # A PostgreSQL connection string: the index shared by several Orthanc nodes (docs/cluster.md)
    # instead of the SQLite file "Database".
    "PostgreSQL": None,
    "ClaimLease": 30,  # seconds before another node takes the work of a node that stopped answering
}
PUBLISH_MODES = ("none", "flagged", "all")


def _typed(options: Mapping[str, Any], key: str, kind: type) -> Any:
    value = options.get(key, _DEFAULTS[key])
    if value is None:
        return None
    # bool is an int in Python: refuse true/false where a number is wanted.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{SECTION}.{key} must be of type {kind.__name__}, not {value!r}")
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
    level = _typed(options, "PngCompressLevel", int)
    if not 0 <= level <= 3:
        raise ConfigError(f"{SECTION}.PngCompressLevel must be within 0..3, not {level}")
    window_index = _typed(options, "WindowIndex", int)
    if window_index < 0:
        raise ConfigError(f"{SECTION}.WindowIndex must be at least 0, not {window_index}")
    threshold = options.get("AnomalyThreshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise ConfigError(f"{SECTION}.AnomalyThreshold must be a number within [0, 1], not {threshold!r}")
    model = _typed(options, "ModelPath", str)
    if _typed(options, "OhifDirectory", str) == "":
        raise ConfigError(f"{SECTION}.OhifDirectory must not be empty")
    interval = _typed(options, "ReconcileInterval", int)
    if interval < 0:
        raise ConfigError(f"{SECTION}.ReconcileInterval must be at least 0 (off), not {interval}")
    workers = _typed(options, "Workers", int)
    if not 1 <= workers <= 16:
        raise ConfigError(f"{SECTION}.Workers must be within 1..16, not {workers}")
    defer = _typed(options, "DeferWhileStoring", int)
    if not 0 <= defer <= 3600:
        raise ConfigError(f"{SECTION}.DeferWhileStoring must be within 0..3600 seconds, not {defer}")
    memory = _typed(options, "RendererMemoryLimit", int)
    if not 64 <= memory <= 1 << 20:
        raise ConfigError(f"{SECTION}.RendererMemoryLimit must be within 64..1048576 MB, not {memory}")
    seconds = _typed(options, "RendererTimeLimit", int)
    if not 1 <= seconds <= 3600:
        raise ConfigError(f"{SECTION}.RendererTimeLimit must be within 1..3600 seconds, not {seconds}")
    attempts = _typed(options, "MaxAttempts", int)
    if not 1 <= attempts <= 100:
        raise ConfigError(f"{SECTION}.MaxAttempts must be within 1..100, not {attempts}")
    publish = _typed(options, "PublishToOrthanc", str)
    if publish not in PUBLISH_MODES:
        raise ConfigError(f"{SECTION}.PublishToOrthanc must be one of {', '.join(PUBLISH_MODES)}, "
                          f"not {publish!r}")
    postgresql = _typed(options, "PostgreSQL", str)
    if postgresql is not None and "Database" in options:
        raise ConfigError(f"{SECTION}.PostgreSQL and {SECTION}.Database name two indexes: keep one")
    if postgresql == "":
        raise ConfigError(f"{SECTION}.PostgreSQL must be a connection string, not empty")
    lease = _typed(options, "ClaimLease", int)
    if not 3 <= lease <= 3600:
        raise ConfigError(f"{SECTION}.ClaimLease must be within 3..3600 seconds, not {lease}")
    queue_size = _typed(options, "QueueSize", int)
    if queue_size < 1:
        raise ConfigError(f"{SECTION}.QueueSize must be at least 1, not {queue_size}")
    return Config(
        data_directory=data,
        png_directory=path("PngDirectory", data / "png"),
        database=path("Database", data / "index.sqlite"),
        png_compress_level=level,
        window_index=window_index,
        queue_size=queue_size,
        workers=workers,
        defer_while_storing=defer,
        reconcile_on_start=_typed(options, "ReconcileOnStart", bool),
        reconcile_interval=interval,
        model_path=DEFAULT_MODEL if model is None else (base / model if model else None),
        anomaly_threshold=None if threshold is None else float(threshold),
        ohif_directory=path("OhifDirectory", DEFAULT_OHIF),
        sandbox=_typed(options, "Sandbox", bool),
        renderer_memory_mb=memory,
        renderer_seconds=seconds,
        attempts=attempts,
        publish=publish,
        postgresql=postgresql,
        claim_lease=lease,
    )
