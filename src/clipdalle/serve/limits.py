"""What keeps one server process healthy under any input: request-size caps and the bounded generation queue.

A request body above its cap is refused with 413 before it is read (by its Content-Length) or as soon as its
streamed bytes pass the cap (chunked uploads). Image uploads are then decoded by `clipdalle.transforms.decode_image`,
whose pixel cap refuses decompression bombs.

Generation runs on one worker thread fed by a bounded queue: the DALL·E model, its dVAE and the reranking CLIP
are shared by every request, and sampling is already batched, so running two generations at once would only
split the CPU between them and double the memory. A request that finds the queue full gets 503 with a
Retry-After estimated from recent job times, instead of waiting without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, UploadFile

UPLOAD_CHUNK_BYTES = 1 << 16  # read uploads in 64 KiB pieces so an oversized one is refused early
JOB_TIME_SMOOTHING = 0.3  # weight of the newest job in the running mean job time behind Retry-After


class QueueFull(Exception):
    """The generation queue holds `capacity` jobs already; retry after `retry_after` seconds."""

    def __init__(self, capacity: int, retry_after: int):
        super().__init__(f"the generation queue is full ({capacity} requests); retry in about {retry_after} s")
        self.capacity = capacity
        self.retry_after = retry_after


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

    async def run(self, job: Callable[[], Any]) -> Any:
        """Awaits `job`'s result from the worker (QueueFull when full); a cancelled caller un-queues its job."""
        return await asyncio.wrap_future(self.submit(job))

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
    before reading, or mid-stream for chunked bodies (the route then sees the 413 as an HTTPException)."""

    def __init__(self, app: Any, max_bytes: int, error_body: Callable[[str, int, str], bytes]):
        self.app = app
        self.max_bytes = max_bytes  # whole request body, all parts of a multipart upload together
        self.error_body = error_body  # (path, status, message) -> JSON bytes in the route family's error shape

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
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: dict, send: Callable, message: str) -> None:
        body = self.error_body(scope.get("path", ""), 413, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
