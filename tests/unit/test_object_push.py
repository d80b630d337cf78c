"""Pushed object notifications, end to end on real servers: MinIO, Ceph, AWS and SNS bodies posted to the api
role's webhooks, and MinIO/Ceph records read from Kafka by a ``format: s3`` trigger, each becoming one task of the
``echo`` function (whose Success record carries the decoded ObjectEvent) or a dead letter.

One ``gpufleet run`` serves every test that needs a fleet: each uses its own bucket, so their tasks never meet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.config import load_fleet
from gpufleet.errors import ConfigError
from tests.harness import FUNCTIONS

API_TOKEN = "yC2dL925bpehnjly-XLjT0nKFkzLNKuQTOGe1kQV7r8"

HOOK_TOKEN = "cRD8lA4ZNpKa8DyACLBGuA4f8ptqDtRmsVIMa9MpxKY"

SNS_TOKEN = "qK-PoI4W9Qqa1bIM4mdcAp2iv9CunUw7oIUo-TtUwbI"


def _config(tmp_path: Path, trigger: dict[str, Any], api_enabled: bool = True) -> Path:
    (tmp_path / "triggers").mkdir()
    (tmp_path / "triggers" / "hook.yaml").write_text(yaml.safe_dump(trigger))
    config = tmp_path / "fleet.yaml"
    api = {"enabled": True, "token": API_TOKEN} if api_enabled else {"enabled": False}
    config.write_text(yaml.safe_dump({"api": api, "functions": [str(FUNCTIONS)],
                                      "triggers": [str(tmp_path / "triggers")]}))  # fmt: skip
    return config


def test_a_webhook_without_a_secret_is_a_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path, {"source": "webhook:///minio", "function": "echo"})
    with pytest.raises(ConfigError) as err:
        load_fleet(config, env={})
    assert (
        Path(str(err.value.file)).resolve() == (tmp_path / "triggers" / "hook.yaml").resolve()
        and err.value.key == "token"
    )
    assert "hook.yaml" in str(err.value) and "hmac_secret" in str(err.value)


def test_token_env_names_a_variable_that_must_be_set(tmp_path: Path) -> None:
    config = _config(tmp_path, {"source": "webhook:///minio", "function": "echo", "token_env": "MINIO_HOOK_TOKEN"})
    with pytest.raises(ConfigError) as err:
        load_fleet(config, env={})
    assert (
        Path(str(err.value.file)).resolve() == (tmp_path / "triggers" / "hook.yaml").resolve()
        and err.value.key == "token_env"
    )
    assert "MINIO_HOOK_TOKEN" in str(err.value)
    with pytest.raises(ConfigError, match=r"token_env .* 5 characters long") as err:
        load_fleet(config, env={"MINIO_HOOK_TOKEN": "short"})
    assert "short" not in str(err.value).replace("5 characters", "")
    fleet = load_fleet(config, env={"MINIO_HOOK_TOKEN": HOOK_TOKEN})
    assert fleet.triggers["hook"].token == HOOK_TOKEN


def test_a_webhook_needs_the_api_role(tmp_path: Path) -> None:
    trigger = {"source": "webhook:///minio", "function": "echo", "token": HOOK_TOKEN}
    config = _config(tmp_path, trigger, api_enabled=False)
    with pytest.raises(ConfigError) as err:
        load_fleet(config, env={})
    assert err.value.file == str(config) and err.value.key == "api.enabled" and "hook" in str(err.value)
    assert load_fleet(config, env={"GPUFLEET_API__ENABLED": "true", "GPUFLEET_API__TOKEN": API_TOKEN}).triggers


def test_sns_confirm_hosts_are_host_patterns_not_regexes(tmp_path: Path) -> None:
    trigger = {"source": "webhook:///aws/sns", "function": "echo", "token": SNS_TOKEN,
               "sns_confirm_hosts": [r"^sns\.[a-z0-9-]+\.amazonaws\.com$"]}  # fmt: skip
    config = _config(tmp_path, trigger)
    with pytest.raises(ConfigError) as err:
        load_fleet(config, env={})
    assert err.value.key == "sns_confirm_hosts" and "hook.yaml" in str(err.value)
    assert "sns.*.amazonaws.com" in str(err.value) and "regular expressions are not accepted" in str(err.value)
    trigger["sns_confirm_hosts"] = ["SNS.*.amazonaws.com", "localhost"]
    (tmp_path / "triggers" / "hook.yaml").write_text(yaml.safe_dump(trigger))
    hook = load_fleet(config, env={}).triggers["hook"]
    assert hook.sns_confirm_hosts == ("sns.*.amazonaws.com", "localhost") and hook.sns_confirm_private is False
