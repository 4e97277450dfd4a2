"""The ingest workers in Orthanc's process: threads that take queued instance IDs (after any
burst Orthanc is storing), and the :class:`Pipeline` they run on each batch (claim, fetch,
render, write, retry what a full disk refused)."""

import collections
import contextlib
import heapq
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Sequence

from . import index as idx
from .ingest import Deletions, OrthancLookup, Renderer, Settings, Stopping, ingest_many
from .scoring import ModelSlot

log = logging.getLogger("minipacs")
WORKER_NICENESS = 10
BATCH = 16  #: instances a worker thread takes at once from a backlog


class Trouble:
    """One log line per cause of failure, not one per instance: a full disk fails every
    instance the same way for as long as it lasts; the line after it says it works again."""

    def __init__(self):
        self._lock = threading.Lock()
        self._causes: dict[str, str] = {}

    def failed(self, where: str, cause: str) -> None:
        with self._lock:
            if self._causes.get(where) == cause:
                return
            self._causes[where] = cause
        log.error("%s: %s (instances are retried; said once per cause)", where, cause)

    def recovered(self, where: str) -> None:
        with self._lock:
            if self._causes.pop(where, None) is None:
                return
        log.warning("%s works again", where)


class Retries:
    """Instances to submit again later, each after a delay that doubles at each failure
    (``first`` up to ``longest`` seconds): a full disk is not hammered, and the index catches up
    once space returns."""

    def __init__(self, submit: Callable[[str], Any], first: float = 2.0, longest: float = 300.0):
        self._submit, self._first, self._longest = submit, first, longest
        self._due: list[tuple[float, str]] = []
        self._failures: dict[str, int] = {}
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="minipacs-retries", daemon=True).start()

    def later(self, instance_ids: Sequence[str]) -> None:
        with self._wake:
            for instance_id in instance_ids:
                n = self._failures.get(instance_id, 0)
                self._failures[instance_id] = n + 1
                delay = min(self._first * 2 ** n, self._longest)
                heapq.heappush(self._due, (time.monotonic() + delay, instance_id))
            self._wake.notify()

    def succeeded(self, instance_ids: Sequence[str]) -> None:
        with self._wake:
            for instance_id in instance_ids:
                self._failures.pop(instance_id, None)

    def pending(self) -> int:
        with self._wake:
            return len(self._due)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, instance_id = heapq.heappop(self._due)
            self._submit(instance_id)


class Pipeline:
    """What an ingest worker does with a batch of instance IDs, in Orthanc's process: claim
    them, fetch their files, have them rendered (in a sandbox), write the rows, and retry what
    a full disk refused. Nothing Orthanc stored is lost: an instance whose row or PNG could not
    be written is retried until it is."""

    def __init__(self, index: idx.Index, settings: Settings, lookup: OrthancLookup,
                 models: ModelSlot | None, fetch: Callable[[str], bytes],
                 submit: Callable[[str], Any], renderer: Renderer | None = None):
        self.index, self.settings, self.lookup, self.models = index, settings, lookup, models
        self.fetch, self.renderer, self.submit = fetch, renderer, submit
        self.deletions = Deletions()
        self.gone = 0  # instances deleted from Orthanc before a worker fetched them
        self.trouble = Trouble()
        self.retries = Retries(submit)

    def __call__(self, instance_ids: list[str]) -> None:
        """Ingest a batch. Instances claimed before (in hand when Orthanc died) are suspects:
        one is rendered alone, after the others, and the rest go back to the queue, where both
        workers take them one at a time; so one that kills its process takes nothing with it."""
        suspects = {}
        if len(instance_ids) > 1:
            try:
                suspects = self.index.claims(instance_ids)
            except self.index.errors as exc:
                self._failed("writing the index", str(exc), instance_ids)
                return
        if not suspects:
            self._ingest(instance_ids)
            return
        others = [i for i in instance_ids if i not in suspects]
        if others:
            self._ingest(others)
        first, *rest = sorted(suspects, key=suspects.get)
        for instance_id in rest:
            self.submit(instance_id)
        self._ingest([first])

    def _ingest(self, instance_ids: list[str]) -> None:
        try:
            self.index.claim(instance_ids)
        except self.index.errors as exc:
            self._failed("writing the index", str(exc), instance_ids)
            return
        number = self.deletions.fetching()
        try:
            items, gone = [], []
            for instance_id in instance_ids:
                try:
                    items.append((instance_id, self.fetch(instance_id)))
                except Exception:  # deleted from Orthanc since it was queued
                    gone.append(instance_id)
            if gone:  # counted, not logged: deleting what was just stored is ordinary
                self.index.release(gone)
                self.gone += len(gone)
            try:
                images = ingest_many(self.index, self.settings, items, self.lookup, self.models,
                                     self.renderer, self.deletions, number)
            except self.index.errors as exc:
                self._failed("writing the index", str(exc), [i for i, _ in items])
                return
            except Stopping:
                return
        finally:
            self.deletions.done(number)
        self.trouble.recovered("writing the index")
        unwritten = [image for image in images if image["status"] == idx.WRITE_FAILED]
        if unwritten:
            self._failed(f"writing PNGs in {self.settings.png_directory}",
                         unwritten[0]["status_detail"], [image["orthanc_id"] for image in unwritten])
        else:
            self.trouble.recovered(f"writing PNGs in {self.settings.png_directory}")
        self.retries.succeeded([image["orthanc_id"] for image in images
                                if image["status"] != idx.WRITE_FAILED])

    def _failed(self, where: str, cause: str, instance_ids: list[str]) -> None:
        self.trouble.failed(where, cause)
        self.retries.later(instance_ids)


class Worker:
    """Threads that run ``handle(instance_ids)`` on what is queued, counting outcomes.

    A thread takes up to ``batch`` IDs at once when they are waiting, so that a backlog is
    scored in batches; alone, an instance is handled at once. Decoding, deflate, SQLite and ONNX
    Runtime release the GIL, pydicom and the glue do not: two threads keep about 1.5 cores busy
    inside Orthanc (bench/ingest.py), a third adds nothing."""

    def __init__(self, handle: Callable[[list[str]], Any], queue_size: int, threads: int = 1,
                 batch: int = BATCH, defer: float = 0.0, burst: int = 3, burst_window: float = 0.03):
        self._handle = handle
        self._batch = batch
        self._queue: queue.Queue[str | None] = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"processed": 0, "failed": 0, "dropped": 0, "deferred_s": 0.0}
        self._threads = [threading.Thread(target=self._run, name=f"minipacs-ingest-{n}", daemon=True)
                         for n in range(threads)]
        # Storing first: while Orthanc stores a burst (``burst`` instances within
        # ``burst_window`` seconds), the threads wait, for at most ``defer`` seconds; past that
        # they catch up with the whole queue before waiting again.
        self._defer, self._burst_window = defer, burst_window
        self._arrivals: collections.deque[float] = collections.deque(maxlen=burst)
        self._catching_up = False

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, instance_id: str) -> bool:
        """Queue an instance without ever blocking the caller (Orthanc's change thread)."""
        try:
            self._queue.put_nowait(instance_id)
            return True
        except queue.Full:
            self._count("dropped")
            log.error("ingest queue full: instance %s is left for the next reconciliation",
                      instance_id)
            return False

    def stored(self, instance_id: str) -> bool:
        """Orthanc has just stored this instance: queue it, and note the arrival."""
        self.arrived()
        return self.submit(instance_id)

    def arrived(self) -> None:
        """Note that Orthanc stored an instance, so that the threads leave the CPU to Orthanc
        while a burst of instances is being stored."""
        self._arrivals.append(time.monotonic())

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the instances in hand, then stop; what is still queued waits for reconciliation."""
        self._stop.set()
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)  # wakes a thread waiting on an empty queue
            except queue.Full:
                break
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        # unfinished_tasks counts the instances in hand too, so "idle" means all caught up.
        pending = self._queue.unfinished_tasks
        return {**counts, "queued": pending, "idle": pending == 0,
                "deferring": bool(self._defer and self._storing_burst()) and not self._catching_up}

    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _take(self) -> list[str | None]:
        """The next ID, waiting for it, and up to ``batch - 1`` more that are already queued."""
        taken = [self._queue.get()]
        self._wait_for_storing()
        while len(taken) < self._batch and taken[-1] is not None:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _storing_burst(self) -> float:
        """Seconds until the current storing burst can end (0 when there is none)."""
        arrivals = self._arrivals
        if len(arrivals) < (arrivals.maxlen or 0):
            return 0.0
        left = arrivals[0] + self._burst_window - time.monotonic()
        return max(0.0, left)

    def _wait_for_storing(self) -> None:
        """Leave the CPU to Orthanc while it stores a burst, for at most ``defer`` seconds.

        Measured (bench/ingest.py): any CPU work beside a burst of uploads, even another
        process's at the lowest priority, slows storing by 15-30 % on a 2-core machine, while
        rendering after the burst costs the same CPU. Past ``defer`` the threads catch up with
        the whole queue, so the index never lags a long burst by more than about that."""
        if not self._defer or self._catching_up or not self._storing_burst():
            return
        start = time.monotonic()
        while (left := self._storing_burst()) and not self._stop.is_set():
            waited = time.monotonic() - start
            if waited >= self._defer:
                self._catching_up = True
                break
            time.sleep(min(left, self._defer - waited) + 0.001)
        self._count("deferred_s", time.monotonic() - start)

    def _run(self) -> None:
        # Orthanc's own threads (storing, answering) come first: the worker takes the CPU they
        # leave (Linux gives each thread its own nice value).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        while not self._stop.is_set():
            taken = self._take()
            try:
                self._process([i for i in taken if i is not None])
            finally:
                for _ in taken:
                    self._queue.task_done()
                if self._queue.unfinished_tasks == 0:
                    self._catching_up = False

    def _process(self, instance_ids: list[str]) -> None:
        if not instance_ids:
            return
        try:
            self._handle(instance_ids)
            self._count("processed", len(instance_ids))
        except Exception:
            if len(instance_ids) > 1:  # one bad instance must not cost the others: one by one
                for instance_id in instance_ids:
                    self._process([instance_id])
                return
            self._count("failed")
            log.exception("ingest of instance %s failed", instance_ids[0])
