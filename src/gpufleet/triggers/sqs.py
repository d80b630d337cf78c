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
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from gpufleet.objects import make_client
from gpufleet.settings import Fleet, TriggerSettings
from gpufleet.triggers import parse_source
from gpufleet.triggers.base import Ingest, SourceMessage

log = structlog.get_logger("gpufleet.trigger.sqs")
MAX_BATCH = 10  # SQS returns and deletes at most 10 messages per call


class SqsTrigger:
    KEYS = frozenset({"wait_time_s", "visibility_timeout_s"})

    def __init__(self, fleet: Fleet, trigger: TriggerSettings, ingest: Ingest | None = None) -> None:
        self.name = trigger.name
        self.fleet = fleet
        self.trigger = trigger
        endpoint = parse_source(trigger.source)
        self.queue = endpoint.path
        self.account = endpoint.options.get("account")
        self.ingest = ingest or Ingest(fleet, trigger)
        self.stats = self.ingest.stats

    def run(self, stop: threading.Event) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        sqs = make_client("sqs", self.fleet.settings.s3)
        queue_url = self._queue_url(sqs, stop)
        log.info("sqs trigger started", trigger=self.name, queue=queue_url)
        backoff = 0.5
        try:
            while queue_url and not stop.is_set():
                try:
                    reply = sqs.receive_message(
                        QueueUrl=queue_url,
                        MaxNumberOfMessages=MAX_BATCH,
                        WaitTimeSeconds=self.trigger.wait_time_s,
                        VisibilityTimeout=self.trigger.visibility_timeout_s,
                        MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
                    )
                except (BotoCoreError, ClientError) as exc:
                    log.warning("receive failed; retrying", error=str(exc), retry_in_s=backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 0.5
                messages = reply.get("Messages", [])
                if messages and not self._handle(sqs, queue_url, messages, stop):
                    return  # stopping with work not durable: the messages reappear after their visibility timeout
        finally:
            self.ingest.close()
            log.info("sqs trigger stopped", trigger=self.name, **self.stats)

    def _queue_url(self, sqs: Any, stop: threading.Event) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        args = {"QueueName": self.queue, **({"QueueOwnerAWSAccountId": self.account} if self.account else {})}
        delay = 0.5
        while not stop.is_set():
            try:
                url: str = sqs.get_queue_url(**args)["QueueUrl"]
                return url
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("AWS.SimpleQueueService.NonExistentQueue",
                                                                 "QueueDoesNotExist"):  # fmt: skip
                    raise  # a configuration error: the process exits and says so
                log.warning("cannot look up the queue; retrying", queue=self.queue, error=str(exc))
            except BotoCoreError as exc:
                log.warning("cannot reach SQS; retrying", queue=self.queue, error=str(exc))
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
        return None

    def _handle(self, sqs: Any, queue_url: str, messages: list[dict[str, Any]], stop: threading.Event) -> bool:
        batch = self.ingest.prepare([
            SourceMessage(
                value=m["Body"].encode(),
                source_id=f"sqs:{self.queue}/{m['MessageId']}",
                default_id=f"sqs-{m['MessageId']}",
                timestamp=int(m.get("Attributes", {}).get("SentTimestamp", 0)) / 1000 or None,
            )
            for m in messages
        ])  # fmt: skip
        handles = [m["ReceiptHandle"] for m in messages]
        with _KeepInvisible(sqs, queue_url, handles, self.trigger.visibility_timeout_s):
            result = self.ingest.publish(batch, stop)
        if result is None:
            return False
        self._delete(sqs, queue_url, handles)
        return True

    def _delete(self, sqs: Any, queue_url: str, handles: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles)]
        try:
            failed = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed", [])
        except (BotoCoreError, ClientError) as exc:
            failed = [{"Id": e["Id"], "Message": str(exc)} for e in entries]
        if failed:
            # Harmless: SQS delivers them again and their tasks are suppressed as duplicates.
            log.warning("some messages were not deleted; they will be re-delivered", count=len(failed),
                        error=failed[0].get("Message"))  # fmt: skip


class _KeepInvisible:
    """While a batch is being published, push its visibility timeout out every third of it."""

    def __init__(self, sqs: Any, queue_url: str, handles: list[str], timeout_s: int) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._entries = [{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": timeout_s}
                         for i, h in enumerate(handles)]  # fmt: skip
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
