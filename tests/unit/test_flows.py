"""Each destination has its own flow (issue 25): one that is down, slow or refusing holds only its own records.

Against real servers: Redis, the Kafka-protocol broker, HTTP receivers (one refusing connections, one answering 503
slowly) and moto's SQS; the dispatcher runs as it does in ``gpufleet dispatcher``, in a thread of this process.
"""

from __future__ import annotations

import pytest

from gpufleet.destinations import parse_destination
from gpufleet.errors import ConfigError


@pytest.mark.parametrize("url", ["sqs://AKIA:{s}@127.0.0.1:9/q", "sns://u:{s}@127.0.0.1:9/arn:aws:sns:us-east-1:1:t",
                                 "s3://u:{s}@bucket/prefix", "kafka://u:{s}@127.0.0.1:9/topic"])  # fmt: skip
def test_a_secret_in_a_url_of_a_kind_that_cannot_use_it_is_refused_without_being_shown(url: str) -> None:
    """S3, SQS, SNS and Kafka destinations take their credentials from the fleet's settings: a password in their
    URL could only leak (boto's errors quote the endpoint URL), so it is refused when the config loads."""
    planted = "pl4nted-s3cret"
    with pytest.raises(ConfigError, match="carries a user or password") as refused:
        parse_destination(url.format(s=planted), where="fleet.yaml", key="defaults.on_success")
    assert planted not in str(refused.value) and ":***@" in str(refused.value)
