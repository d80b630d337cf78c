"""SQS destination: each record is a message.

URL: ``sqs:///queue-name`` on the fleet's ``s3.sqs_endpoint_url`` (AWS when unset); option ``account`` for a
queue another account owns: ``sqs:///results?account=123456789012``.

The body is the record; message attributes ``task_id``, ``condition`` and ``function`` carry its key and headers.
On a FIFO queue (``.fifo``) the group is the task id and the de-duplication id a hash of the record, so a record
sent twice within SQS's five minutes is kept once. Records go in batches of up to 10 messages and 256 KiB; a
record larger than SQS's 256 KiB is parked (``max_record_bytes`` is 512 KiB by default: lower it for SQS). An
entry SQS refuses as the sender's fault is parked with its reason; anything else is retried.

Read back by peeking (:class:`SqsReader`): what waits in the queue, left there for its consumers.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from gpufleet.aws import AwsClient, permanent, transient_errors
from gpufleet.destinations.base import Landed, OutRecord, Refusal
from gpufleet.errors import ConfigError, DeliveryError
from gpufleet.urls import Endpoint, Options

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings

MAX_BATCH = 10
MAX_BYTES = 262_144  # per message and per batch


class SqsOptions(Options):
    account: str | None = None


def attributes(record: OutRecord) -> dict[str, Any]:
    values = {"task_id": record.key, **record.headers}
    return {k: {"DataType": "String", "StringValue": v} for k, v in values.items() if v}


def batches(records: list[OutRecord]) -> tuple[list[list[int]], list[Refusal]]:
    """Indexes of the records in batches SQS and SNS accept (10 entries, 256 KiB), and the records too large for
    any batch."""
    out: list[list[int]] = []
    too_large: list[Refusal] = []
    size = 0
    for i, r in enumerate(records):
        n = len(r.value) + sum(len(k) + len(v) + 16 for k, v in attributes(r).items())
        if n > MAX_BYTES:
            too_large.append(Refusal(i, f"{n} bytes with attributes, more than the 256 KiB a message may hold"))
            continue
        if not out or len(out[-1]) == MAX_BATCH or size + n > MAX_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out, too_large


# What SQS and SNS take as a FIFO message group id: up to 128 of these characters.
GROUP_ID_RE = re.compile(r"[A-Za-z0-9!-/:-@\[-`{-~]{1,128}")


def group_id(key: str) -> str:
    """The task id, or a digest of it where SQS would refuse it (longer than 128 characters, or other characters): a
    task's records keep one group, so their order, and no batch is refused for one of them."""
    return key if GROUP_ID_RE.fullmatch(key) else "sha256-" + hashlib.sha256(key.encode()).hexdigest()


class BatchPublisher:
    """SQS and SNS: records in batches (:func:`batches`), each entry a message with :func:`attributes`; on a FIFO
    queue or topic the group is the task id and the de-duplication id a hash of the record."""

    service = ""
    body_field = ""
    fifo = False

    def __init__(self, settings: FleetSettings) -> None:
        self._aws = AwsClient(self.service, settings)

    def send(self, client: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        client = self._aws.get()
        groups, refused = batches(records)
        try:
            for group in groups:
                refused += failed_entries(self.send(client, [self._entry(i, records[i]) for i in group]), self.where())
        except transient_errors() as exc:
            if not permanent(exc):
                raise DeliveryError(f"{self.where()}: {exc}") from exc
            return [Refusal(i, str(exc)) for i in range(len(records))]  # no such queue or topic, not authorized
        return refused

    def _entry(self, index: int, record: OutRecord) -> dict[str, Any]:
        entry = {"Id": str(index), self.body_field: record.value.decode(), "MessageAttributes": attributes(record)}
        if self.fifo:
            entry["MessageGroupId"] = group_id(record.key)
            entry["MessageDeduplicationId"] = hashlib.sha256(record.value).hexdigest()
        return entry

    def close(self) -> None:
        self._aws.close()


class SqsDestination(BatchPublisher):
    OPTIONS = SqsOptions
    service, body_field = "sqs", "MessageBody"

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        super().__init__(settings)
        self.queue = endpoint.path
        self.account = SqsOptions.model_validate(endpoint.options).account
        self.fifo = self.queue.endswith(".fifo")
        self._url: str | None = None

    def where(self) -> str:
        return f"sqs:///{self.queue}"

    def send(self, client: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self._url is None:
            owner = {"QueueOwnerAWSAccountId": self.account} if self.account else {}
            self._url = client.get_queue_url(QueueName=self.queue, **owner)["QueueUrl"]
        reply: dict[str, Any] = client.send_message_batch(QueueUrl=self._url, Entries=entries)
        return reply


def failed_entries(reply: dict[str, Any], where: str) -> list[Refusal]:
    """The entries of a batch reply refused as the sender's fault; raises DeliveryError if any failed otherwise
    (the whole batch is sent again)."""
    refused: list[Refusal] = []
    for failure in reply.get("Failed", []):
        if not failure.get("SenderFault"):
            raise DeliveryError(f"{where}: {failure.get('Code')}: {failure.get('Message')}")
        refused.append(Refusal(int(failure["Id"]), f"{failure.get('Code')}: {failure.get('Message')}"))
    return refused


class SqsReader:
    """Peeks at the queue: each receive asks for a visibility timeout of 0, so a message stays visible to the
    queue's consumers, and is shown once (by its id). What it shows is what waits in the queue: a message its
    consumers take first is never seen, and SQS hands out at most 10 messages a receive, so a long queue shows late.

    Every receive counts toward a message's ``maxReceiveCount``: a queue with a redrive policy is not read (it would
    send its messages to its dead-letter queue), and says so."""

    system = "SQS"
    history = True
    POLL_S = 1.0
    SEEN_MAX = 100_000

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self._dest = SqsDestination(endpoint, settings)
        self.where = self._dest.where()
        self._seen: dict[str, None] = {}  # message ids shown, oldest first
        self._since: float | None = None  # messages sent before this (ms) are not shown, unless from_beginning

    def follow(self, stop: threading.Event, from_beginning: bool, on_ready: Callable[[], None]) -> Iterator[Landed]:
        client = self._dest._aws.get()
        owner = {"QueueOwnerAWSAccountId": self._dest.account} if self._dest.account else {}
        url = client.get_queue_url(QueueName=self._dest.queue, **owner)["QueueUrl"]
        attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
        if "RedrivePolicy" in attributes.get("Attributes", {}):
            raise ConfigError(
                f"{self.where} has a redrive policy: reading it back would count toward each "
                "message's maxReceiveCount and move it to the dead-letter queue, so it is not read",
                fix="tail the queue's consumers, or send the records to Kafka or S3 too",
            )
        if self._since is None:
            self._since = 0.0 if from_beginning else time.time() * 1000
            on_ready()
        while not stop.is_set():
            got = client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=0,
                WaitTimeSeconds=1,
                AttributeNames=["SentTimestamp"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            new = [m for m in got if m["MessageId"] not in self._seen]
            for m in sorted(new, key=lambda m: int(m["Attributes"]["SentTimestamp"])):
                self._seen[m["MessageId"]] = None
                if len(self._seen) > self.SEEN_MAX:
                    del self._seen[next(iter(self._seen))]
                sent = int(m["Attributes"]["SentTimestamp"])
                if sent < self._since:
                    continue
                headers = {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()}
                key = headers.pop("task_id", "")
                yield Landed(self.where, m["MessageId"], sent / 1000, key, headers, m["Body"].encode())
            if not new:
                stop.wait(self.POLL_S)

    def close(self) -> None:
        self._dest.close()
