"""Several Orthanc nodes on one PostgreSQL (``MiniPacs.PostgreSQL``): what each node runs so that
every instance stored through any node is indexed once.

* :class:`ChangeFollower` reads Orthanc's change log (``/changes``, which Orthanc keeps in its
  own database, so every node sees every node's new instances) from the position recorded in
  the index, queues the new instances and moves the position, in one transaction that one node
  at a time holds. A restart resumes where the log was left. Deletions are not in the log
  (Orthanc 1.10 and 1.12 log none, and drop the changes of what they delete): the node that
  deletes hears of it (its ``Deleted`` change callback, one per resource, instances included)
  and removes the rows from the shared index, where every node sees it at once.
* :class:`Feeder` takes this node's share of the queue (claims with a lease, see
  :mod:`minipacs.index_pg`) into the local workers as they have room, renews the leases of
  what it holds, and gives up instances whose renderings never finished ``attempts`` times.
"""

import logging
import threading
import time
from typing import Callable

from .index_pg import PostgresIndex
from .ingest import OrthancLookup
from .reconcile import give_up

log = logging.getLogger("minipacs")
GAP_WAIT = 2.0  #: seconds a missing sequence number is waited for (a transaction still open)


class ChangeFollower:
    """Orthanc's change log into the shared index. ``changes(since)`` is Orthanc's
    ``/changes?since=<since>`` (``since`` None: ``/changes?last``); ``queued`` is told when
    instances were queued."""

    def __init__(self, index: PostgresIndex, changes: Callable[[int | None], dict],
                 queued: Callable[[], None]):
        self.index, self.changes, self.queued = index, changes, queued
        self.wakeup = threading.Event()
        self._missing: dict[int, float] = {}  # sequence numbers awaited, since when
        self.followed = 0  #: changes applied by this node

    def run(self, stopping: threading.Event, interval: float = 1.0, least: float = 0.25) -> None:
        """Follow the log when woken (a ``NewInstance`` here) or every ``interval`` seconds (the
        other nodes'), at most every ``least`` seconds: while Orthanc stores a burst, one round
        queues many instances, and Orthanc's own work comes first."""
        while not stopping.is_set():
            self.wakeup.wait(interval)
            try:
                self.wakeup.clear()
                while self.step() and not stopping.is_set():
                    pass
            except Exception:  # Orthanc or PostgreSQL unavailable a moment: the next round retries
                log.exception("following Orthanc's change log failed")
            stopping.wait(least)

    def step(self) -> bool:
        """Apply the next page of the change log; True when more is waiting."""
        queued = False
        with self.index.following() as held:
            if held is None:  # another node is applying it
                return False
            db, position = held
            if position < 0:  # never followed: from now on (reconciliation covers the past)
                self.index.moved(db, self.changes(None)["Last"])
                return False
            answer = self.changes(position)
            now, expected = time.monotonic(), position + 1
            for change in answer["Changes"]:  # when each missing number was first missed
                for seq in range(expected, change["Seq"]):
                    self._missing.setdefault(seq, now)
                expected = change["Seq"] + 1
            moved, blocked = position, False
            for change in answer["Changes"]:
                seq = change["Seq"]
                # A missing number may be a transaction still open (Orthanc's nodes write at
                # once): the position waits for it, GAP_WAIT at most (a rolled-back one, or the
                # change of a resource deleted since, never comes). The new instances past it
                # are queued already: queueing one twice is nothing.
                blocked = blocked or any(now - self._missing[n] < GAP_WAIT for n in range(moved + 1, seq))
                if change["ChangeType"] == "NewInstance":
                    self.index.enqueue([change["ID"]], db)
                    queued = True
                if not blocked:
                    moved = seq
            more = not blocked and not answer.get("Done", True)
            self._missing = {n: t for n, t in self._missing.items() if n > moved}
            self.index.moved(db, moved)
            self.followed += moved - position
        if queued:
            self.queued()
        return more


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
