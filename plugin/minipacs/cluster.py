"""Several Orthanc nodes on one PostgreSQL (``MiniPacs.PostgreSQL``): what each node runs so that
every instance stored through any node is indexed once, and every deletion made through any
node reaches the index.

* :class:`ChangeFollower` reads Orthanc's change log (``/changes``, which Orthanc keeps in its
  own database, so every node sees every node's changes) from the position recorded in the
  index, queues new instances and applies deletions, and moves the position, all in one
  transaction that one node at a time holds. A restart resumes where the log was left.
* :class:`Feeder` takes this node's share of the queue (claims with a lease, see
  :mod:`minipacs.index_pg`) into the local workers as they have room, renews the leases of
  what it holds, and gives up instances whose renderings never finished ``attempts`` times.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .index_pg import PostgresIndex
from .ingest import Deletions, OrthancLookup
from .reconcile import give_up

log = logging.getLogger("minipacs")
LEVELS = {"Patient": "patients", "Study": "studies", "Series": "series", "Instance": "images"}
GAP_WAIT = 2.0  #: seconds a missing sequence number is waited for (a transaction still open)


class ChangeFollower:
    """Orthanc's change log into the shared index. ``changes(since)`` is Orthanc's
    ``/changes?since=<since>`` (``since`` None: ``/changes?last``); ``queued`` is told when
    instances were queued."""

    def __init__(self, index: PostgresIndex, changes: Callable[[int | None], dict],
                 png_directory: Path, deletions: Deletions, queued: Callable[[], None]):
        self.index, self.changes, self.png_directory = index, changes, png_directory
        self.deletions, self.queued = deletions, queued
        self.wakeup = threading.Event()
        self._gap: tuple[int, float] | None = None  # (sequence number awaited, since when)
        self.followed = 0  #: changes applied by this node

    def run(self, stopping: threading.Event, interval: float = 1.0) -> None:
        while not stopping.is_set():
            self.wakeup.wait(interval)
            self.wakeup.clear()
            try:
                while self.step() and not stopping.is_set():
                    pass
            except Exception:  # Orthanc or PostgreSQL unavailable a moment: the next round retries
                log.exception("following Orthanc's change log failed")

    def step(self) -> bool:
        """Apply the next page of the change log; True when more is waiting."""
        pngs, more, queued = [], False, False
        with self.index.following() as held:
            if held is None:  # another node is applying it
                return False
            db, position = held
            if position < 0:  # never followed: from now on (reconciliation covers the past)
                self.index.moved(db, self.changes(None)["Last"])
                return False
            answer = self.changes(position)
            moved = position
            for change in answer["Changes"]:
                seq = change["Seq"]
                if seq != moved + 1 and not self._gap_waited(moved + 1):
                    break  # a change committed later than a newer one: wait for it a moment
                kind, level = change["ChangeType"], LEVELS.get(change["ResourceType"])
                if kind == "NewInstance":
                    self.index.enqueue([change["ID"]], db)
                    queued = True
                elif kind == "Deleted" and level:
                    self.deletions.deleted(change["ID"])
                    pngs += self.index.delete_in(db, level, change["ID"])
                moved = seq
            else:
                more = not answer.get("Done", True)
            self.index.moved(db, moved)
            self.followed += moved - position
        for name in pngs:  # once the rows are gone: a row never outlives its PNG
            (self.png_directory / name).unlink(missing_ok=True)
        if queued:
            self.queued()
        return more

    def _gap_waited(self, seq: int) -> bool:
        now = time.monotonic()
        if self._gap is None or self._gap[0] != seq:
            self._gap = (seq, now)
        return now - self._gap[1] >= GAP_WAIT


class Feeder:
    """This node's share of the cluster's queue into its workers."""

    def __init__(self, index: PostgresIndex, submit: Callable[[str], bool], in_hand: Callable[[], int],
                 lookup: OrthancLookup, attempts: int, room: int = 64):
        self.index, self.submit, self.in_hand = index, submit, in_hand
        self.lookup, self.attempts, self.room = lookup, attempts, room
        self.wakeup = threading.Event()

    def run(self, stopping: threading.Event, interval: float = 0.5) -> None:
        renewed = time.monotonic()
        while not stopping.is_set():
            self.wakeup.wait(interval)
            self.wakeup.clear()
            try:
                if time.monotonic() - renewed > self.index.lease / 3:
                    self.index.renew()
                    renewed = time.monotonic()
                self.feed()
            except Exception:
                log.exception("taking work from the cluster's queue failed")

    def feed(self) -> int:
        """Take what the workers have room for; returns how many were taken."""
        room = self.room - self.in_hand()
        if room <= 0:
            return 0
        taken = self.index.take(room)
        for instance_id, attempts in taken:
            if attempts >= self.attempts:
                give_up(self.index, instance_id, attempts, self.lookup)
            elif not self.submit(instance_id):
                self.index.release([instance_id])  # reconciliation queues it again
        return len(taken)
