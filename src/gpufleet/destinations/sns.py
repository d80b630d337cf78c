"""SNS destination: each record is published to a topic.

URL: ``sns:///arn:aws:sns:us-east-1:123456789012:results``: the topic's ARN (an ARN needs no ``sns:ListTopics``
or ``sns:CreateTopic`` permission), on the fleet's ``s3.sqs_endpoint_url`` (AWS when unset). No options.

The message is the record; message attributes ``task_id``, ``condition`` and ``function`` carry its key and
headers, so subscriptions can filter on them. On a FIFO topic (``.fifo``) the group is the task id and the
de-duplication id a hash of the record. Batches of up to 10 and 256 KiB, as for SQS; a record larger than 256 KiB
is parked, and so is an entry SNS refuses as the sender's fault. Anything else is retried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpufleet.destinations.sqs import BatchPublisher
from gpufleet.urls import Endpoint, Options

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings


class SnsDestination(BatchPublisher):
    OPTIONS = Options
    service, body_field = "sns", "Message"

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        super().__init__(settings)
        self.topic_arn = endpoint.path
        self.fifo = self.topic_arn.endswith(".fifo")

    def where(self) -> str:
        return f"sns:///{self.topic_arn}"

    def send(self, client: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
        reply: dict[str, Any] = client.publish_batch(TopicArn=self.topic_arn, PublishBatchRequestEntries=entries)
        return reply
