"""Group commit: the server's enqueues and `succeeded` callbacks from many request threads, one transaction per batch.

A concurrency utility of the HTTP server, not a lifecycle rule: what a batch does
to the jobs is `services.enqueue_many` and `services.succeed_many`; an item the
batch did not handle is done alone through the same services, which say why.
"""

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from . import services, store
from .errors import DatabaseUnavailable, JobrunnerError
from .models import SUCCEEDED, ArchivedJob, QueuedJob
from .store import Connection

log = logging.getLogger(__name__)


class GroupCommit:
    """Runs one function for the items of many threads at once: one transaction per batch.

    Under load the database then does one round trip and one commit per batch
    instead of one per item, which is what bounds the throughput of enqueues and
    callbacks. `submit` answers the function's result for its item, or None when
    the batch did not handle it (or the database refused the batch): the caller
    then does it alone, the slow way, which also says exactly why.
    """

    def __init__(self, pool: store.Pool, handle_batch: Callable[[Connection, list], list], name: str, max_batch: int = 200):
        self._pool = pool
        self._handle_batch = handle_batch
        self._max_batch = max_batch
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Any:
        request = _Request(item)
        self._requests.put(request)
        with request.done:  # released by the batch thread when the request is done
            pass
        if isinstance(request.error, DatabaseUnavailable):
            raise request.error
        return request.result

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            batch = [self._requests.get()]
            while len(batch) < self._max_batch and not self._requests.empty():
                batch.append(self._requests.get())
            stopping = None in batch
            batch = [request for request in batch if request is not None]
            if batch:
                self._handle(batch)
            if stopping:
                return

    def _handle(self, batch: list["_Request"]) -> None:
        try:
            # one transaction with the read-back: a row that cannot be decoded leaves the whole batch undone
            with self._pool.connection() as conn, store.transaction(conn):
                results = self._handle_batch(conn, [request.item for request in batch])
            for request, result in zip(batch, results):
                request.result = result
        except Exception as error:  # the callers go the slow way; none is left waiting
            if not isinstance(error, JobrunnerError):
                log.exception("%s: batch failed", self._thread.name)
            for request in batch:
                request.error = error
        finally:
            for request in batch:
                request.done.release()


def _acquired_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclasses.dataclass
class _Request:
    item: Any
    result: Any = None
    error: Exception | None = None
    # held until the request is done: a bare lock, because an Event's set() (a
    # Condition's notify in Python) was 15% of the server's CPU in a drain
    done: threading.Lock = dataclasses.field(default_factory=_acquired_lock)


class EnqueueBatcher:
    """`services.enqueue` for many threads at once, through a GroupCommit."""

    def __init__(self, pool: store.Pool):
        self._pool = pool
        self._group = GroupCommit(pool, services.enqueue_many, "enqueue-batcher")

    def enqueue(
        self,
        job_id: UUID,
        name: str,
        data: Any,
        run_after: datetime | None = None,
        expires_at: datetime | None = None,
        priority: int = 0,
    ) -> QueuedJob:
        services.validate_new_job(data, run_after, expires_at, priority)
        job = self._group.submit(store.NewJob(job_id, name, data, run_after, expires_at, priority))
        if job is not None:
            return job
        with self._pool.connection() as conn:
            return services.enqueue(conn, job_id, name, data, run_after, expires_at, priority=priority)

    def close(self) -> None:
        self._group.close()


class CallbackBatcher:
    """A downstream's callbacks for many threads at once: `succeeded` ones share a transaction.

    Each is checked against its type's callback token (`services.check_callback_token`),
    in the batch as alone: `callback_token` is the one the request presented, or None.
    """

    def __init__(self, pool: store.Pool):
        self._pool = pool
        self._group = GroupCommit(pool, services.succeed_many, "callback-batcher")

    def handle_status_callback(
        self, job_id: UUID, name: str, status: str, attempt: int, retryable: bool = True, callback_token: str | None = None
    ) -> QueuedJob | ArchivedJob:
        if status == SUCCEEDED:
            archived = self._group.submit((job_id, name, callback_token))
            if archived is not None:
                return archived
        with self._pool.connection() as conn:
            services.check_callback_token(conn, name, callback_token)
            return services.handle_status_callback(conn, job_id, name, status, attempt, retryable)

    def close(self) -> None:
        self._group.close()
