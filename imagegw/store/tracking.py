"""One running pull's record, as its stages see it: the stage it reached, a heartbeat, its failure."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from imagegw.background import repeated
from imagegw.errors import ImagegwError
from imagegw.store.records import ImageStore, PullKey, Status


class PullTracker:
    """Writes a pull's progress to its record in the image store."""

    def __init__(self, store: ImageStore, key: PullKey) -> None:
        self._store = store
        self.key = key
        self._writing = threading.Lock()
        self._failed = False

    def stage(self, status: Status, message: str) -> None:
        """Record the stage the pull has reached, with a message for whoever polls it.

        Once the failure is recorded, nothing is: a download thread of a cancelled pull may still
        report its progress, and must not turn the FAILURE back into PULLING.
        """
        with self._writing:
            if not self._failed:
                self._store.set_stage(self.key, status, message)

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
            self._store.fail_pull(self.key, message)

    def _beat(self) -> None:
        with suppress(ImagegwError):  # a missed beat is made up by the next
            self._store.beat(self.key)
