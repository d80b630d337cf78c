"""SQS trigger: S3 event notifications (the AWS path), delivered straight or through SNS.

URL: ``sqs:///queue-name`` on the fleet's ``s3.sqs_endpoint_url`` (AWS when unset); ``?account=123456789012``
for a queue another account owns. Options in the trigger file: ``wait_time_s`` (long poll, 20),
``visibility_timeout_s`` (60), the object filters (``events``, ``prefix``, ``suffix``) and ``output``.

Guarantees:
- A message is deleted only after its tasks are published (or it went to the dead-letter topic, or it asked for
  nothing: an ``s3:TestEvent``, keys the filters drop). A crash before the delete makes SQS deliver it again;
  the task ids are the objects' identities, so the re-delivery is suppressed as a duplicate.
- While a publish is slow (Redis down, retrying), the batch's visibility timeout is extended, so SQS does not
  hand the same messages to another trigger meanwhile.
- SQS unreachable, throttling, or a queue that does not exist (yet): logged, and tried again with backoff.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field

from gpufleet.aws import make_client, transient_errors
from gpufleet.triggers.base import BatchTrigger, Received
from gpufleet.triggers.ingest import Ingest, SourceMessage
from gpufleet.triggers.options import ObjectEvents, TriggerSettings
from gpufleet.urls import Options

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.trigger.sqs")
MAX_BATCH = 10  # SQS returns and deletes at most 10 messages per call
STOP_CHECK_S = 0.1  # how often a long poll looks at the stop flag


class SqsSettings(ObjectEvents, TriggerSettings):
    wait_time_s: int = Field(20, ge=0, le=20)  # long poll
    # How long a received message stays hidden (extended while a publish is slow).
    visibility_timeout_s: int = Field(60, ge=5, le=43_200)


class SqsOptions(Options):
    account: str | None = Field(None, pattern=r"^[0-9]{12}$")  # the account that owns the queue, if not ours


class SqsTrigger(BatchTrigger[SqsSettings]):
    Settings = SqsSettings
    OPTIONS = SqsOptions

    def __init__(self, fleet: Fleet, trigger: SqsSettings, ingest: Ingest | None = None) -> None:
        super().__init__(fleet, trigger, ingest)
        self.source_errors = transient_errors()  # unreachable, throttled, no such queue (yet): retried
        self.queue = self.endpoint.path
        self.account = self.endpoint.options.get("account")
        self._sqs: Any = None
        self._queue_url = ""

    def connect(self) -> None:
        if self._sqs is None:
            self._sqs = make_client("sqs", self.fleet.settings.s3)
        args = {"QueueName": self.queue, **({"QueueOwnerAWSAccountId": self.account} if self.account else {})}
        self._queue_url = self._sqs.get_queue_url(**args)["QueueUrl"]
        log.info("sqs trigger receiving", trigger=self.name, queue=self._queue_url)

    def receive(self, stop: threading.Event) -> Received | None:
        def poll() -> Any:
            return self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=MAX_BATCH,
                WaitTimeSeconds=self.trigger.wait_time_s,
                VisibilityTimeout=self.trigger.visibility_timeout_s,
                MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )

        reply = long_poll(poll, self._release, stop)
        if reply is None:
            return None
        messages = reply.get("Messages", [])
        if not messages:
            return None
        return Received(
            [
                SourceMessage(
                    value=m["Body"].encode(),
                    source_id=f"sqs:{self.queue}/{m['MessageId']}",
                    default_id=f"sqs-{m['MessageId']}",
                    timestamp=int(m.get("Attributes", {}).get("SentTimestamp", 0)) / 1000 or None,
                )
                for m in messages
            ],
            token=[m["ReceiptHandle"] for m in messages],
        )

    def _release(self, reply: Any) -> None:
        """Messages a poll abandoned at stop received: visible again at once, for the next consumer."""
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(reply.get("Messages", []))
        ]
        if entries:
            self._sqs.change_message_visibility_batch(QueueUrl=self._queue_url, Entries=entries)

    def lag(self) -> tuple[str, dict[str, int]] | None:
        names = ["ApproximateNumberOfMessages"]
        attrs = self._sqs.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=names)["Attributes"]
        return "depth", {"messages": int(attrs["ApproximateNumberOfMessages"])}

    def publishing(self, batch: Received) -> AbstractContextManager[object]:
        """While a publish is slow, SQS must not hand the messages to another consumer."""
        return _KeepInvisible(self._sqs, self._queue_url, batch.token, self.trigger.visibility_timeout_s)

    def ack(self, batch: Received) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(batch.token)]
        try:
            failed = self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries).get("Failed", [])
        except transient_errors() as exc:
            failed = [{"Id": e["Id"], "Message": str(exc)} for e in entries]
        if failed:
            # Harmless: SQS delivers them again and their tasks are suppressed as duplicates.
            log.warning(
                "some messages were not deleted; they will be re-delivered",
                count=len(failed),
                error=failed[0].get("Message"),
            )


class _KeepInvisible:
    """While a batch is being published, push its visibility timeout out every third of it."""

    def __init__(self, sqs: Any, queue_url: str, handles: list[str], timeout_s: int) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._entries = [
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": timeout_s} for i, h in enumerate(handles)
        ]
        self._every = timeout_s / 3
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpufleet-sqs-visibility", daemon=True)

    def __enter__(self) -> _KeepInvisible:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self._every):
            try:
                self._sqs.change_message_visibility_batch(QueueUrl=self._queue_url, Entries=self._entries)
                log.info("publish is slow; extended the messages' visibility", count=len(self._entries))
            except Exception as exc:  # noqa: BLE001 - best effort: at worst SQS re-delivers and we de-duplicate
                log.warning("cannot extend visibility", error=str(exc))


def long_poll(poll: Callable[[], Any], release: Callable[[Any], None], stop: threading.Event) -> Any:
    """``poll()``'s reply, or None once ``stop`` is set first.

    The long poll (up to 20 s) runs on a daemon thread, so that stopping never waits it out (Ctrl-C of an idle fleet
    took 15-19 s). A poll abandoned at stop hands what it received to ``release`` while the process lives; if the
    process exits first, those messages come back after their visibility timeout: late, never lost.
    """
    done = threading.Event()
    lock = threading.Lock()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            reply = poll()
        except BaseException as exc:  # noqa: BLE001 - handed to the trigger's thread, which raises it
            box["error"] = exc
        else:
            with lock:
                if box.get("abandoned"):
                    try:
                        release(reply)
                    except Exception as exc:  # noqa: BLE001 - best effort: the visibility timeout brings them back
                        log.info("cannot release the messages of an abandoned poll", error=str(exc))
                    return
                box["reply"] = reply
        done.set()

    threading.Thread(target=run, name="gpufleet-sqs-poll", daemon=True).start()
    while not done.wait(STOP_CHECK_S):
        if stop.is_set():
            with lock:
                if "reply" not in box and "error" not in box:
                    box["abandoned"] = True
                    return None
    if "error" in box:
        raise box["error"]
    return box["reply"]
