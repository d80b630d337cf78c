"""The ``ctx`` a handler receives: progress, cancel, and the object helpers (scratch, download, upload)."""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from gpufleet.aws import CONTROL_CHARS, MAX_KEY_BYTES, ObjectEvent, ObjectStore, key_parts, parse_s3_uri
from gpufleet.errors import PermanentTaskError, TaskError
from gpufleet.functions import validation_problem
from gpufleet.worker.scratch import ScratchDir

if TYPE_CHECKING:
    from gpufleet.functions import Function
    from gpufleet.worker.bundle import ProcessBundle
    from gpufleet.worker.gpus import GpuMemory

log = structlog.get_logger("gpufleet.worker")
MAX_READ_BYTES = 256 * 2**20  # what ctx.read may hold in memory; ctx.download streams to disk instead


class TaskContext:
    """What a handler gets besides its event. One per attempt; its scratch directory is removed afterwards."""

    def __init__(
        self,
        bundle: ProcessBundle,
        task_id: str,
        function: str,
        attempt: int,
        state: Any,
        meta: Mapping[str, Any] | None = None,
        event: ObjectEvent | None = None,
        token: str = "",
    ) -> None:
        self.task_id = task_id
        self._token = token  # the attempt's: only the task's owner saves a checkpoint
        self.function = function
        self.attempt = attempt
        self.worker = bundle.worker_name
        self.gpu = bundle.gpu
        self.state = state
        self.log = log.bind(task_id=task_id, function=function, attempt=attempt)
        self.outputs: list[str] = []  # s3:// URIs written by upload(); they appear in the success record
        self._bundle = bundle
        self._meta = meta or {}
        self._event = event
        self._scratch: ScratchDir | None = None

    @property
    def traceparent(self) -> str | None:
        """The task's W3C ``traceparent``: send it with any call the handler makes, to keep one trace."""
        value = self._meta.get("traceparent")
        return value if isinstance(value, str) else None

    def progress(self, fraction: float, message: str = "") -> None:
        self._bundle.registry.set_progress(self.task_id, min(max(float(fraction), 0.0), 1.0), message)

    @property
    def cancelled(self) -> bool:
        return self._bundle.lease.cancelled(self.task_id)

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (any JSON value) durably: if this attempt ends before the task does (its worker killed, its
        GPU reclaimed), the next one reads it as :attr:`resume_from`. Each call replaces the last."""
        size = self._bundle.checkpoints.save(self.task_id, self._token, state)
        self.log.debug("checkpoint saved", bytes=size)

    @functools.cached_property
    def resume_from(self) -> Any:
        """The state an earlier attempt of this task last saved with :meth:`checkpoint`; None for none."""
        return self._bundle.checkpoints.load(self.task_id)

    @property
    def gpu_memory(self) -> GpuMemory | None:
        """This GPU's memory now (at most half a second old), from NVML; None on a virtual GPU."""
        return self._bundle.device.memory()

    @property
    def scratch(self) -> Path:
        """This attempt's own empty directory (mode 0700); removed, with everything in it, when the attempt ends."""
        return self._scratch_dir().path

    def _scratch_dir(self) -> ScratchDir:
        if self._scratch is None:
            self._scratch = ScratchDir(self._bundle.scratch_root, self.worker, f"{self.task_id}-{self.attempt}")
        return self._scratch

    def download(self, obj: ObjectEvent | str | None = None) -> Path:
        """Stream an object to the scratch directory and return its path (``scratch/in/<key>``).

        ``obj`` is an object event, an ``s3://bucket/key`` URI, or None for the object this task is about. The
        key decides the file name, but never the directory: ``..``, absolute paths and control characters cannot
        leave the scratch directory, and a symlink inside it is never followed. The file is mode 0600.
        """
        if obj is None:
            if self._event is None:
                raise TaskError("this task is not about an object: pass an s3://bucket/key or an ObjectEvent")
            obj = self._event
        if isinstance(obj, str):
            bucket, key = parse_s3_uri(obj)
            version = None
        else:
            bucket, key, version = obj.bucket, obj.key, obj.version_id
        parts = ("in", *key_parts(key))
        scratch = self._scratch_dir()
        self._bundle.objects.download(bucket, key, lambda: scratch.create(parts), version)
        return scratch.path.joinpath(*parts)

    def read(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes of the object at ``s3://bucket/key``, or of its byte range ``[start, end)``, in memory: a
        shard's part of a large object, or a header. At most :data:`MAX_READ_BYTES`: for a large object,
        :meth:`download` it instead.

        Raises:
            PermanentTaskError: ``InvalidRange`` (each bound a whole number >= 0, and ``start < end``), or
                ``ReadTooLarge``.
        """
        bucket, key = parse_s3_uri(uri)
        bad = [name for name, v in (("start", start), ("end", end)) if v is not None and (type(v) is not int or v < 0)]
        if bad or (start is not None and end is not None and start >= end):
            raise PermanentTaskError(
                "InvalidRange",
                f"ctx.read({uri!r:.200}, start={start!r:.30}, end={end!r:.30}): use whole numbers, 0 <= start < end",
            )
        return self._bundle.objects.read(bucket, key, start, end, limit=MAX_READ_BYTES)

    def upload(
        self, path: str | Path, name: str | None = None, content_type: str | None = None, to: str | None = None
    ) -> str:
        """Upload a file as ``<prefix>/<task id>/<name>`` under the trigger's ``output`` location, or under ``to``
        (``s3://bucket/prefix``: an invocation names its own); returns its URI.

        Raises:
            PermanentTaskError: ``name`` (by default the file's name) is not a relative object key: see
                :func:`output_key`.
        """
        output = to or self._meta.get("output")
        if not output:
            raise TaskError("no output location: set `output: s3://bucket/prefix` in the trigger file, or pass to=")
        bucket, prefix = parse_s3_uri(output)
        fn = self._bundle.fleet.functions.get(self.function)
        allowed = None if fn is None else fn.output_buckets
        if allowed is not None and bucket not in allowed:
            raise PermanentTaskError(
                "OutputNotAllowed",
                f"ctx.upload(to={output!r:.200}): function {self.function!r} may write to {list(allowed)} only",
            )
        name = name or Path(path).name
        key = output_key(prefix, self.task_id, name)
        content_type = content_type or mimetypes.guess_type(name)[0]
        uri = self._bundle.objects.upload(Path(path), bucket, key, content_type)
        self.outputs.append(uri)
        return uri

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.remove()
            self._scratch = None


def output_key(prefix: str, task_id: str, name: str) -> str:
    """``<prefix>/<task id>/<name>``, once ``name`` is known to stay below ``<prefix>/<task id>/``.

    ``name`` is a relative key such as ``sub/dir/file.txt``: no control characters (NUL included), no ``.``, ``..``
    or empty segments (so no leading or doubled ``/``), and the whole key at most S3's 1024 bytes of UTF-8. Some
    servers resolve ``..`` in keys, and a key with a NUL or over the limit fails only at upload, so they are refused
    here, the same at every attempt: the task fails at once.

    Raises:
        PermanentTaskError: ``name`` breaks one of these rules (``errorType`` ``InvalidOutputName``).
    """
    problem = None
    prefix = prefix.strip("/")
    if CONTROL_CHARS.search(prefix) or any(segment in ("", ".", "..") for segment in prefix.split("/") if prefix):
        raise PermanentTaskError(
            "InvalidOutputName",
            f"ctx.upload(to=...{prefix!r:.200}): the prefix has a control character, or an empty, '.' or '..' segment",
        )
    if CONTROL_CHARS.search(name):
        problem = "it holds a control character"
    elif any(segment in ("", ".", "..") for segment in name.split("/")):
        problem = "it has an empty, '.' or '..' segment (or starts or ends with '/')"
    key = "/".join(p for p in (prefix, task_id, name) if p)
    try:
        size = len(key.encode())
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a file name that is not UTF-8
        problem = problem or "it is not valid UTF-8"
    else:
        if size > MAX_KEY_BYTES and not problem:
            problem = f"the key {key[:80]!r}... would be {size} bytes, more than S3's limit of {MAX_KEY_BYTES}"
    if problem:
        raise PermanentTaskError(
            "InvalidOutputName",
            f"ctx.upload(name={name!r:.200}): {problem}; an output name is a relative key such as 'sub/dir/file.txt'",
        )
    return key


def handler_payload(
    store: ObjectStore, fn: Function, event: Any, meta: Mapping[str, Any]
) -> tuple[Any, ObjectEvent | None]:
    """What the handler gets: the event, completed (an object event) and validated (a payload model)."""
    obj = None
    if meta.get("kind") == "object":
        obj = complete_event(store, ObjectEvent.model_validate(event))
        event = obj.model_dump(mode="json")
    if fn.payload is None:
        return event, obj
    try:
        return fn.payload.model_validate(event), obj
    except ValidationError as exc:
        raise PermanentTaskError(
            "InvalidPayload", f"function {fn.name!r}: the event does not match {validation_problem(exc)}"
        ) from None


def complete_event(store: ObjectStore, event: ObjectEvent) -> ObjectEvent:
    """Fill in what the record lacked (AWS and moto records carry no content type) with a HEAD, which also
    checks that the object is there: Ceph announces a multipart upload before it completes."""
    if event.family != "ObjectCreated" or event.content_type is not None:
        return event
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head = store.head(event.bucket, event.key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise TaskError(f"{event.uri} does not exist (deleted, or its upload is not complete yet)") from None
        raise TaskError(f"HEAD {event.uri} (for its content type) failed: {exc}") from exc
    except BotoCoreError as exc:  # no credentials, endpoint unreachable: say which object and why
        raise TaskError(f"HEAD {event.uri} (for its content type) failed: {exc}") from exc
    return event.model_copy(
        update={
            "content_type": head.get("ContentType"),
            "size": event.size if event.size is not None else head.get("ContentLength"),
            "etag": event.etag or str(head.get("ETag", "")).strip('"') or None,
        }
    )
