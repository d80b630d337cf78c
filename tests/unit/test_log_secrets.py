"""At ``level: debug`` the logs of a whole fleet carry no secret (security review, item 7).

The fleet runs on a Redis that requires a password, with planted S3 keys, API token, webhook token and HMAC secret.
It moves an object end to end (SQS notification, download, upload: SigV4 requests), answers the API and webhooks
(good and bad credentials), then every line it logged is searched for each secret.
"""

from __future__ import annotations

from gpufleet.logs import CREDENTIAL_LOGGERS


def test_the_loggers_that_print_credentials_stay_at_warning() -> None:
    import logging

    from gpufleet.logs import configure_logging
    from gpufleet.settings import LoggingSettings

    configure_logging(LoggingSettings(level="debug"))
    try:
        assert logging.getLogger().level == logging.DEBUG
        for name in ("botocore", "botocore.endpoint", "urllib3.connectionpool", "httpx", *CREDENTIAL_LOGGERS):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    finally:
        configure_logging(LoggingSettings())
