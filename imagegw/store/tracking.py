"""One running pull's record, as its stages see it: the stage it reached, a heartbeat, its failure, its image.

Every write is the run's claim's (``pull_id``): a run whose pull was taken over (its heartbeat missing for
``StalePullTimeout``, its host or database too slow or cut off while it lived) is refused with PullTakenOver
at its next write, and stops without touching the new run's record or publishing its image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from imagegw.access import Access
from imagegw.background import repeated
from imagegw.errors import ImagegwError, IndexUnavailable, PullTakenOver
from imagegw.store.records import ImageFacts, ImageStore, PullKey, Status

FAILURE_WRITE_PATIENCE = 30.0
"""Seconds a failed pull keeps trying to write its FAILURE while the database is away (the outage may be
what failed it): a record left at its last stage would say the pull still runs until StalePullTimeout."""
FAILURE_WRITE_PAUSE = 1.0

class PullTracker:
    """Writes a pull's progress to its record in the image store, as the run of the claim ``pull_id``."""

    def __init__(self, store: ImageStore, key: PullKey, pull_id: str) -> None:
        self._store = store
        self.key = key
        self.pull_id = pull_id
        self._writing = threading.Lock()
        self._failed = False

    def stage(self, status: Status, message: str) -> None:
        """Record the stage the pull has reached, with a message for whoever polls it.

        Once the failure is recorded, nothing is: a download thread of a cancelled pull may still
        report its progress, and must not turn the FAILURE back into PULLING.
        """
        with self._writing:
            if not self._failed:
                self._store.set_stage(self.key, self.pull_id, status, message)

    def publish(self, facts: ImageFacts, access: Access) -> dict[str, Any]:
        """Record the finished image as READY under the pull's tag and close the pull."""
        return self._store.publish(self.key, facts, access, pull_id=self.pull_id)

    @contextmanager
    def running(self) -> Iterator[PullTracker]:
        """While the block runs, beat the record's heartbeat (so a pull whose process died is seen
        as stale); whatever stops the block is written to the record as FAILURE, with its message."""
        try:
            with repeated(self._beat, self._store.heartbeat_interval, f"heartbeat {self.key.tag}"):
                yield self
        except GeneratorExit:
            raise
        except Exception as exc:
            self._fail(str(exc) or type(exc).__name__)
            raise
        except BaseException:
            # Not an error of the pull's own: a cancellation from the Prefect UI (its worker stops the
            # run's process), SIGTERM or Ctrl-C. Recorded now, not when the heartbeat goes stale.
            self._fail("cancelled by an operator, or its process was stopped, before it finished")
            raise

    def _fail(self, message: str) -> None:
        with self._writing:  # after a stage being written at this moment, never before it
            self._failed = True
            # Refused when the pull was taken over: the record is the new run's, and what stopped this
            # run is raised all the same.
            with suppress(PullTakenOver):
                self._write_failure(message)

    def _write_failure(self, message: str) -> None:
        deadline = time.monotonic() + FAILURE_WRITE_PATIENCE
        while True:
            try:
                self._store.fail_pull(self.key, self.pull_id, message)
                return
            except IndexUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(FAILURE_WRITE_PAUSE)

    def _beat(self) -> None:
        # A missed beat is made up by the next; a refused one (the pull taken over) stops the run at its
        # next stage, whose write is refused the same way.
        with suppress(ImagegwError):
            self._store.beat(self.key, self.pull_id)
