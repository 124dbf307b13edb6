"""What keeps one server process healthy under any input: request-size caps, bounded image work and the bounded
generation queue.

A request body above its cap is refused with 413 before it is read (by its Content-Length) or as soon as its
streamed bytes pass the cap (chunked uploads); a body that stalls gets 408. Image uploads are then decoded by
`clipdalle.transforms.decode_image`, whose pixel cap (counted in what decoding costs) refuses decompression bombs.

Decoding, encoding and CLIP work run on the thread pool through a `WorkLimiter`: a few jobs at once (one per core),
a bounded number waiting, and 503 with Retry-After beyond, so a burst of uploads cannot start dozens of decoders.

Generation runs on one worker thread fed by a bounded queue: the DALL·E model, its dVAE and the reranking CLIP
are shared by every request, and sampling is already batched, so running two generations at once would only
split the CPU between them and double the memory. A request that finds the queue full gets 503 with a
Retry-After estimated from recent job times, instead of waiting without bound. A request whose client went away
is cancelled: dropped from the queue, or stopped at the sampler's next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool

UPLOAD_CHUNK_BYTES = 1 << 16  # read uploads in 64 KiB pieces so an oversized one is refused early
JOB_TIME_SMOOTHING = 0.3  # weight of the newest job in the running mean job time behind Retry-After
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting generation request checks that its client is still there


class Busy(Exception):
    """The server is at a limit; retry after `retry_after` seconds (a 503 with Retry-After)."""

    code = "busy"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Busy):
    """The generation queue holds `capacity` jobs already; retry after `retry_after` seconds."""

    code = "queue_full"

    def __init__(self, capacity: int, retry_after: int):
        super().__init__(
            f"the generation queue is full ({capacity} requests); retry in about {retry_after} s", retry_after
        )
        self.capacity = capacity


class ClientGone(Exception):
    """The client closed its connection while its request waited or ran; nobody reads the answer."""


class WorkLimiter:
    """CPU-heavy request work (decoding, encoding, CLIP) on the thread pool, `slots` jobs at once; up to `waiting`
    more wait for a slot, and beyond that `run` raises Busy at once instead of queueing without bound."""

    def __init__(self, slots: int, waiting: int):
        if slots < 1 or waiting < 0:
            raise ValueError(f"WorkLimiter needs at least 1 slot and 0 or more waiting, got {slots} and {waiting}")
        self.slots = slots
        self.waiting = waiting
        self.semaphore = threading.BoundedSemaphore(slots)  # threads, not asyncio: one app may serve several loops
        self.admitted = 0  # jobs running or waiting
        self.mean_job_seconds = 0.1
        self.lock = threading.Lock()

    async def run(self, job: Callable[[], Any]) -> Any:
        with self.lock:
            if self.admitted >= self.slots + self.waiting:
                retry_after = max(1, math.ceil(self.mean_job_seconds * self.admitted / self.slots))
                raise Busy(
                    f"the server is busy ({self.admitted} image jobs running or waiting); retry in about "
                    f"{retry_after} s", retry_after
                )  # fmt: skip
            self.admitted += 1
        try:
            return await run_in_threadpool(self._run, job)
        finally:
            with self.lock:
                self.admitted -= 1

    def _run(self, job: Callable[[], Any]) -> Any:
        with self.semaphore:
            started = time.perf_counter()
            try:
                return job()
            finally:
                elapsed = time.perf_counter() - started
                with self.lock:
                    self.mean_job_seconds += JOB_TIME_SMOOTHING * (elapsed - self.mean_job_seconds)


class GenerationQueue:
    """Runs submitted jobs one at a time, in order, on a single daemon thread; at most `capacity` jobs are admitted
    at once (the running one included), more raise QueueFull. A job whose caller went away before it started
    is skipped."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the generation queue needs a capacity of at least 1 request, got {capacity}")
        self.capacity = capacity
        self.jobs: queue.Queue = queue.Queue()
        self.admitted = 0  # jobs submitted and not finished (waiting or running)
        self.mean_job_seconds = 5.0  # running mean; the first Retry-After assumes a few seconds per job
        self.lock = threading.Lock()
        self.worker: threading.Thread | None = None

    def _ensure_worker(self) -> None:
        if self.worker is None or not self.worker.is_alive():
            self.worker = threading.Thread(target=self._work, name="clipdalle-generation", daemon=True)
            self.worker.start()

    def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future:
        """Queues `job` and returns a Future of its result; raises QueueFull when `capacity` jobs are admitted."""
        with self.lock:
            if self.admitted >= self.capacity:
                retry_after = max(1, math.ceil(self.mean_job_seconds * self.admitted))
                raise QueueFull(self.capacity, retry_after)
            self.admitted += 1
            self._ensure_worker()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((job, future))
        return future

    async def run(
        self,
        job: Callable[[], Any],
        client_gone: Callable[[], Awaitable[bool]] | None = None,
        stop: threading.Event | None = None,
    ) -> Any:
        """Awaits `job`'s result from the worker (QueueFull when full); a cancelled caller un-queues its job.

        With `client_gone` (e.g. `request.is_disconnected`), polled while the job waits or runs: once it says the
        client left, a job not started yet is dropped, `stop` is set for a running one (the job checks it, as
        `sampling.generate(should_stop=stop.is_set)` does between steps), and ClientGone is raised."""
        waiting = asyncio.wrap_future(self.submit(job))
        if client_gone is None:
            return await waiting
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return waiting.result()
            if await client_gone():
                if stop is not None:
                    stop.set()
                waiting.cancel()  # also cancels the job itself when it has not started
                raise ClientGone()

    def _work(self) -> None:
        while True:
            job, future = self.jobs.get()
            if job is None:
                return
            started, ran = time.perf_counter(), False
            try:
                if future.set_running_or_notify_cancel():
                    ran = True
                    try:
                        future.set_result(job())
                    except BaseException as error:  # handed to the waiting request, which turns it into a response
                        future.set_exception(error)
            finally:
                with self.lock:
                    self.admitted -= 1
                    if ran:
                        elapsed = time.perf_counter() - started
                        self.mean_job_seconds += JOB_TIME_SMOOTHING * (elapsed - self.mean_job_seconds)

    def close(self) -> None:
        """Lets the worker finish the queued jobs and stop."""
        if self.worker is not None and self.worker.is_alive():
            self.jobs.put((None, None))


async def read_upload(upload: UploadFile, max_bytes: int, field: str) -> bytes:
    """The bytes of an uploaded file; 413 when it is larger than `max_bytes`, 400 when it is empty."""
    parts, size = [], 0
    while chunk := await upload.read(UPLOAD_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(
                413, f"{field}: the upload is larger than the server's limit of {max_bytes} bytes; send a smaller file"
            )
        parts.append(chunk)
    if size == 0:
        raise HTTPException(400, f"{field}: the uploaded file is empty; expected an image (PNG, JPEG, WebP, ...)")
    return b"".join(parts)


class BodySizeLimit:
    """ASGI middleware: refuses HTTP requests whose body is larger than `max_bytes` with 413, by Content-Length
    before reading, or mid-stream for chunked bodies (the route then sees the 413 as an HTTPException); a body
    whose next piece does not come within `timeout` seconds gets 408."""

    def __init__(
        self, app: Any, max_bytes: int, error_body: Callable[[str, int, str], bytes], timeout: float | None = None
    ):
        self.app = app
        self.max_bytes = max_bytes  # whole request body, all parts of a multipart upload together
        self.error_body = error_body  # (path, status, message) -> JSON bytes in the route family's error shape
        self.timeout = timeout  # seconds between pieces of a body; None waits as long as the server does

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the server rejects a malformed Content-Length itself
                if declared > self.max_bytes:
                    await self._refuse(scope, send, message)
                    return
        received, complete = 0, False

        async def limited_receive() -> dict:
            nonlocal received, complete
            if complete or self.timeout is None:  # after the body, receive() waits for a disconnect: no timeout
                event = await receive()
            else:
                try:
                    event = await asyncio.wait_for(receive(), self.timeout)
                except asyncio.TimeoutError:
                    raise HTTPException(
                        408, f"the request body stalled for {self.timeout:g} s; send it at once"
                    ) from None
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                complete = not event.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: dict, send: Callable, message: str) -> None:
        body = self.error_body(scope.get("path", ""), 413, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
