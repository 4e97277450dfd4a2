"""Child processes that render and score untrusted files, so that a hostile one costs an
instance, never Orthanc.

A file Orthanc accepted can still make a decoder allocate gigabytes, loop for minutes or crash:
inside Orthanc's process any of these would take Orthanc down. Each ingest worker thread hands
its batch to a child process of its own (``python -m minipacs.sandbox``, the interpreter Orthanc
embeds, at the worker's lower priority) that runs :func:`minipacs.ingest.render_and_score` under
hard limits: address space (``RLIMIT_AS``: an allocation past it fails, as a ``MemoryError``
or a crash), CPU time (``RLIMIT_CPU``) and wall time (the parent kills it). A child that dies
is replaced; the instance it was rendering is recorded as ``render_failed`` with the limit it
hit, and its batch-mates are rendered again by the new child.

Protocol, over the child's stdin and stdout: a request is a 4-byte length, a JSON header and
the files (and Orthanc's decodings) back to back; the child answers one JSON line per instance
as soon as it is rendered, then one line with the batch's scores. Only JSON comes back from a
child, never pickles, and the instance and file it names are checked. The limits guard against
exhausted memory or time and crashes; the child runs as Orthanc's user, so they are no barrier
against a decoder exploit that runs code.
"""

import json
import logging
import math
import os
import queue
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import index as idx
from .ingest import (EMPTY_RENDER, Outcome, Settings, Stopping, add_scores,
                     render_and_score, score_images)
from .scoring import Scorer, score_columns
from .worker import WORKER_NICENESS

log = logging.getLogger("minipacs")
STARTUP_SECONDS = 120  # imports on a busy 2-core machine
MiB = 1 << 20
OUT_OF_MEMORY = 3  # the child's exit status when a request itself does not fit its memory
RECYCLE_MB = 512  # a child holding more (freed memory is not handed back) is replaced


class SandboxError(Exception):
    """A child died or overran its time; the message says which limit."""


def interpreter() -> str:
    """The Python that Orthanc embeds, as a program (``sys.executable`` is Orthanc itself
    inside Orthanc): same version, so the plugin's venv fits it."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(Path(sys.base_exec_prefix) / "bin" / version)


class Child:
    """One sandboxed process and the pipe to it."""

    def __init__(self, memory_mb: int, seconds: float):
        self.memory_mb, self.seconds = memory_mb, seconds
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [interpreter(), "-m", "minipacs.sandbox", str(memory_mb), str(seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._buffer = b""
        ready = self._line(time.monotonic() + STARTUP_SECONDS)
        if ready.get("ready") != self.process.pid:
            raise SandboxError(f"the renderer process did not start: {ready}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def resident_mb(self) -> float:
        """The child's resident memory: what a large image left it holding."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            return int(status.split("VmRSS:")[1].split()[0]) / 1024
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()

    def _line(self, deadline: float) -> dict[str, Any]:
        """The next line the child writes, by ``deadline``; kills it past that."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.process.kill()
                self.process.wait()
                raise SandboxError(f"exceeded the time limit ({self.seconds:g} s)")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise SandboxError(self._death())
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _death(self) -> str:
        code = self.process.wait()
        if code == OUT_OF_MEMORY:
            return f"exceeded the memory limit ({self.memory_mb} MB)"
        if code == -signal.SIGXCPU:
            return f"exceeded the CPU time limit ({self.seconds:g} s)"
        if code < 0:
            name = signal.Signals(-code).name
            return (f"the renderer died ({name}), likely past its memory limit ({self.memory_mb} MB)"
                    if -code in (signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)
                    else f"the renderer died ({name})")
        return f"the renderer exited with status {code}"

    def run(self, settings: Settings, model: dict | None,
            items: Sequence[tuple[str, bytes, np.ndarray | None]]) -> list[Outcome]:
        """Outcomes of ``items``; on a death, :class:`Crash` holds the ones finished."""
        header = {"settings": {"png_directory": str(settings.png_directory),
                               "png_compress_level": settings.png_compress_level,
                               "window_index": settings.window_index},
                  "model": model,
                  "items": [{"id": i, "size": len(data), "decoded": None if decoded is None else
                             {"dtype": decoded.dtype.str, "shape": list(decoded.shape)}}
                            for i, data, decoded in items]}
        head = json.dumps(header).encode()
        finished: list[Outcome] = []
        shown: list[Outcome] = []
        try:
            self.process.stdin.write(struct.pack(">I", len(head)) + head)
            for _, data, decoded in items:
                self.process.stdin.write(data)
                if decoded is not None:
                    self.process.stdin.write(np.ascontiguousarray(decoded).tobytes())
            self.process.stdin.flush()
            for instance_id, _, _ in items:
                line = self._line(time.monotonic() + self.seconds)
                finished.append(_outcome(line, instance_id))
                if line["shown"]:
                    shown.append(finished[-1])
            scores = self._line(time.monotonic() + self.seconds)["scores"]
        except (BrokenPipeError, SandboxError) as exc:
            raise Crash(str(exc) if isinstance(exc, SandboxError) else self._death(), finished) from exc
        add_scores(shown, scores)
        return finished


class Crash(SandboxError):
    def __init__(self, why: str, finished: list[Outcome]):
        super().__init__(why)
        self.finished = finished


def _outcome(line: dict[str, Any], instance_id: str) -> Outcome:
    """An answer line, checked for what the parent acts on: the instance and its PNG's name."""
    png = line["image"].get("png")
    if line["id"] != instance_id or line["image"].get("orthanc_id") not in (None, instance_id) \
            or png not in (None, f"{instance_id}.png"):
        raise SandboxError(f"the renderer answered for another instance or file ({line['id']}, {png})")
    record = line["record"]
    return Outcome(instance_id, line["image"],
                   None if record is None else idx.InstanceRecord(**record),
                   line["needs_decoder"], None)


class Sandbox:
    """The children of the ingest workers: ``render(items)`` has :func:`render_and_score`'s
    contract (a :data:`minipacs.ingest.Renderer`), each call in a child of its own."""

    def __init__(self, settings: Settings, model: Callable[[], dict | None], memory_mb: int,
                 seconds: float, recycle_mb: float = RECYCLE_MB, size: int = 2):
        self.settings, self.model, self.size = settings, model, size
        self.memory_mb, self.seconds, self.recycle_mb = memory_mb, seconds, recycle_mb
        self._idle: queue.SimpleQueue[Child] = queue.SimpleQueue()
        self._children: set[Child] = set()
        self._starting = 0  # children being started, not yet in _children
        self._lock = threading.Lock()
        self.closed = False
        self.deaths = 0

    def _child(self) -> Child:
        """An idle child; a new one while there are fewer than ``size``; else wait for one."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        child = self._new_child()
        return child if child is not None else self._idle.get()

    def _new_child(self) -> Child | None:
        """A new child, unless ``size`` are alive or starting already."""
        with self._lock:
            if len(self._children) + self._starting >= self.size:
                return None
            self._starting += 1
        try:
            child = Child(self.memory_mb, self.seconds)
        finally:
            with self._lock:
                self._starting -= 1
        with self._lock:
            self._children.add(child)
        return child

    def _discard(self, child: Child) -> None:
        with self._lock:
            self._children.discard(child)
        child.close()

    def start(self) -> None:
        """Start the children now (``size``, one per worker), with the model loaded: the first
        batches need not wait for them, and an interpreter that cannot run them is found at
        start."""
        while (child := self._new_child()) is not None:
            child.run(self.settings, self.model(), [])  # loads the model: not on a first batch
            self._idle.put(child)

    def ready(self) -> int:
        """Children alive, rendering or waiting."""
        with self._lock:
            return sum(child.alive() for child in self._children)

    def render(self, items: Sequence[tuple[str, bytes, np.ndarray | None]]) -> list[Outcome]:
        by_id: dict[str, Outcome] = {}
        pending = list(items)
        while pending:
            if self.closed:
                raise Stopping("the renderers are closed")
            child = self._child()
            try:
                for outcome in child.run(self.settings, self.model(), pending):
                    by_id[outcome.instance_id] = outcome
                pending = []
                if child.resident_mb() > self.recycle_mb:
                    self._discard(child)
                else:
                    self._idle.put(child)
            except Crash as crash:
                self._discard(child)
                if self.closed:  # killed by close(): no verdict on the instance in hand
                    raise Stopping("the renderers are closed") from crash
                self.deaths += 1
                if len(crash.finished) == len(pending):  # died while scoring: keep the renders
                    for outcome in crash.finished:
                        outcome.image["status_detail"] = "; ".join(filter(None, (
                            outcome.image["status_detail"], f"scoring failed: {crash}")))
                        by_id[outcome.instance_id] = outcome
                    break
                poison = pending[len(crash.finished)][0]
                log.error("rendering instance %s: %s", poison, crash)
                by_id[poison] = died(poison, str(crash))
                # The others again, in a new child: the scores of those done went with this one.
                pending = [item for item in pending if item[0] != poison]
        return [by_id[item[0]] for item in items]

    def close(self) -> None:
        """Kill every child, those rendering too (Orthanc is stopping)."""
        self.closed = True
        with self._lock:
            children, self._children = self._children, set()
        for child in children:
            child.close()


def died(instance_id: str, why: str) -> Outcome:
    """The outcome of an instance that took its renderer down: placed by Orthanc's tags."""
    return Outcome(instance_id, {**EMPTY_RENDER, "status": idx.RENDER_FAILED,
                                 "status_detail": f"refused: {why}"}, None)


# The child ---------------------------------------------------------------------------------

def _limit(memory_mb: int) -> None:
    """Address space: what the interpreter and its libraries hold now, plus ``memory_mb``."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + memory_mb * MiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _plain(value: Any) -> Any:
    """numpy scalars (a rendering parameter, say) as JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _read(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError
    return data


def _cpu_deadline(seconds: float) -> None:
    """SIGXCPU (which ends the process) once this item has used ``seconds`` of CPU."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(spent + seconds), hard))


def serve(memory_mb: int, seconds: float) -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not break the protocol
    logging.basicConfig(stream=sys.stderr, format="minipacs sandbox %(process)d: %(message)s")
    os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICENESS)
    scorers: dict[tuple, Scorer] = {}

    def send(payload: dict) -> None:
        stdout.write(json.dumps(payload, default=_plain).encode() + b"\n")
        stdout.flush()

    send({"ready": os.getpid()})
    _limit(memory_mb)
    while True:
        try:
            (size,) = struct.unpack(">I", _read(stdin, 4))
        except EOFError:
            return
        header = json.loads(_read(stdin, size))
        items = []
        for item in header["items"]:
            data = _read(stdin, item["size"])
            decoded = item["decoded"]
            if decoded is not None:
                dtype = np.dtype(decoded["dtype"])
                count = math.prod(decoded["shape"])
                decoded = np.frombuffer(_read(stdin, count * dtype.itemsize), dtype).reshape(decoded["shape"])
            items.append((item["id"], data, decoded))
        scorer, failed = None, None
        if (model := header["model"]) is not None:
            key = (model["path"], model["sha256"], model["threshold"])
            try:
                if key not in scorers:
                    scorers.clear()
                    scorers[key] = Scorer(Path(model["path"]), model["threshold"])
                scorer = scorers[key]
            except Exception as exc:  # the images are still rendered and indexed
                failed = f"scoring failed: {exc}"
        settings = Settings(Path(header["settings"]["png_directory"]),
                            header["settings"]["png_compress_level"], header["settings"]["window_index"])
        outcomes = []
        for item in items:
            _cpu_deadline(seconds)
            outcome = render_and_score(settings, [item], None)[0]
            outcomes.append(outcome)
            send({"id": outcome.instance_id, "image": outcome.image,
                  "record": None if outcome.record is None else asdict(outcome.record),
                  "needs_decoder": outcome.needs_decoder, "shown": outcome.pixels is not None})
        _cpu_deadline(seconds)
        shown = [o.pixels for o in outcomes if o.pixels is not None]
        scores = ([{**score_columns(None), "status_detail": failed} for _ in shown] if failed
                  else score_images(scorer, shown))
        send({"scores": scores})


def main(memory_mb: int, seconds: float) -> None:
    try:
        serve(memory_mb, seconds)
    except MemoryError:  # reading a request (an instance's file and Orthanc's decoding of it)
        sys.exit(OUT_OF_MEMORY)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
