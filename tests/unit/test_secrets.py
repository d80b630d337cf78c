"""No default or weak secret is accepted, and no message ever shows a secret (issue: security review, items 2, 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.config import load_fleet
from gpufleet.credentials import redact_url, secret_problem
from gpufleet.errors import ConfigError
from tests.unit.test_config import write

REPO = Path(__file__).parents[2]
STRONG = "Xq7vR2mN9kLp4sT8wZ1bC6dF3gH0jY5u"
HOOK = {"source": "webhook:///minio", "function": "echo"}


def config_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_fleet(path, env=env or {})
    return str(err.value)


# -- no default token, no weak token -----------------------------------------------------------------------------


def test_the_shipped_config_and_image_carry_no_token() -> None:
    assert "token:" not in [line.split("#")[0].strip() for line in (REPO / "config" / "fleet.yaml").read_text()
                            .splitlines()]  # fmt: skip
    api = load_fleet(REPO / "config" / "fleet.yaml", env={}).settings.api
    assert api.enabled and api.token is None
    with pytest.raises(ConfigError, match=r"api.token: is required to serve the API .*gpufleet token"):
        api.require_token("config/fleet.yaml")
    # The image copies that file: it starts only with a token from its environment.
    assert "COPY config ./config" in (REPO / "Dockerfile").read_text()
    assert load_fleet(REPO / "config" / "fleet.yaml", env={"GPUFLEET_API__TOKEN": STRONG}).settings.api.token


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("local-dev-token-change-me", "25 characters long"),  # the token the repository used to ship
        ("a" * 40, "entropy"),
        ("ab" * 20, "entropy"),
        ("abcdefghijklmnopqrstuvwxyz0123456789ABCD", "consecutive"),
        ("please-CHANGE-me-" + STRONG, "placeholder"),
        ("é" * 40, "header cannot carry"),  # never equal to what a client can send
        (STRONG[:16] + " " + STRONG[16:], "header cannot carry"),
    ],
)
def test_a_weak_api_token_is_refused_without_being_shown(tmp_path: Path, token: str, why: str) -> None:
    for where, env in (({"token": token}, {}), ({}, {"GPUFLEET_API__TOKEN": token})):
        message = config_error(write(tmp_path, {"api": {"enabled": True, **where}}), env)
        assert why in message and "gpufleet token" in message, message
        assert token not in message and token[:8] not in message.replace("characters", "")
        if env:
            assert "GPUFLEET_API__TOKEN" in message


def test_a_monitoring_token_is_as_strong_as_the_api_token_and_not_the_same(tmp_path: Path) -> None:
    api = {"enabled": True, "token": STRONG}
    message = config_error(write(tmp_path, {"api": {**api, "monitoring_token": "a" * 40}}))
    assert "api.monitoring_token cannot be used" in message and "entropy" in message and "a" * 8 not in message
    message = config_error(write(tmp_path, {"api": {**api, "monitoring_token": STRONG}}))
    assert "give monitoring a token of its own" in message
    fleet = load_fleet(write(tmp_path, {"api": {**api, "monitoring_token": STRONG[::-1]}}), env={})
    assert fleet.settings.api.monitoring_token == STRONG[::-1]


def test_dev_mode_allows_a_weak_token_only_on_loopback(tmp_path: Path) -> None:
    loopback = {"api": {"enabled": True, "dev": True, "host": "127.0.0.1", "token": "dev"}}
    assert load_fleet(write(tmp_path, loopback), env={}).settings.api.token == "dev"
    hook = {**HOOK, "token": "hook-dev"}
    assert load_fleet(write(tmp_path, loopback, {"hook": hook}), env={}).triggers["hook"].token == "hook-dev"
    for host in ("0.0.0.0", "10.0.0.5", "gpu-box.internal"):
        message = config_error(write(tmp_path, {"api": {**loopback["api"], "host": host}}))
        assert "api.dev is only for a loopback host" in message
    # Even in dev mode a token no Authorization header can carry is refused: it could never match.
    message = config_error(write(tmp_path, {"api": {**loopback["api"], "token": "dév"}}))
    assert "header cannot carry" in message


@pytest.mark.parametrize("key", ["token", "hmac_secret"])
def test_a_weak_webhook_secret_is_refused_without_being_shown(tmp_path: Path, key: str) -> None:
    api = {"api": {"enabled": True, "token": STRONG}}
    message = config_error(write(tmp_path, api, {"hook": {**HOOK, key: "shortSECRETvalue"}}))
    assert f"hook.yaml: {key}" in message and "16 characters long" in message
    assert "shortSECRETvalue" not in message and "SECRET" not in message
    env_key = f"{key}_env"
    message = config_error(write(tmp_path, api, {"hook": {**HOOK, env_key: "HOOK_SECRET"}}),
                           {"HOOK_SECRET": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"})  # fmt: skip
    assert f"{env_key} (HOOK_SECRET)" in message and "entropy" in message and "aaaa" not in message


def test_gpufleet_token_prints_a_fresh_strong_token_every_time() -> None:
    tokens = [subprocess.run([sys.executable, "-m", "gpufleet", "token"], capture_output=True, text=True, check=True,
                             timeout=60).stdout.strip() for _ in range(2)]  # fmt: skip
    assert tokens[0] != tokens[1] and all(secret_problem(t) is None for t in tokens)


def test_an_hmac_secret_is_never_sent_in_a_header_so_any_character_is_fine() -> None:
    assert secret_problem("ü-" + STRONG, in_header=False) is None
    assert secret_problem("ü-" + STRONG) is not None


# -- environment values are taken raw ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        "Secr3t: Value-zzzz",  # YAML would make it a mapping
        "12345678901234567890",  # ... a number
        "*anchorSECRET",  # ... an alias error, with a traceback that prints it
        "abc #def-ghi",  # ... a comment, cutting it at the '#'
        "true",
        "[not, a, list]",
        "  spaces kept  ",
    ],
)
def test_string_settings_from_the_environment_are_taken_raw(tmp_path: Path, secret: str) -> None:
    fleet = load_fleet(write(tmp_path, {}), env={"GPUFLEET_S3__SECRET_ACCESS_KEY": secret,
                                                 "GPUFLEET_REDIS__KEY_PREFIX": secret})  # fmt: skip
    assert fleet.settings.s3.secret_access_key == secret and fleet.settings.redis.key_prefix == secret


def test_numbers_booleans_and_lists_from_the_environment_still_work(tmp_path: Path) -> None:
    env = {"GPUFLEET_WORKER__VIRTUAL_GPUS": "3", "GPUFLEET_API__ENABLED": "false", "GPUFLEET_WORKER__LEASE_S": "7.5",
           "GPUFLEET_WORKER__POOLS": "[eu-west, us-east]"}  # fmt: skip
    w = load_fleet(write(tmp_path, {}), env=env).settings.worker
    assert (w.virtual_gpus, w.lease_s, w.pools) == (3, 7.5, ("eu-west", "us-east"))
    message = config_error(write(tmp_path, {}), {"GPUFLEET_WORKER__POOLS": "[*poolSECRET"})
    assert "GPUFLEET_WORKER__POOLS" in message and "not valid YAML" in message and "poolSECRET" not in message


# -- no message shows a secret -----------------------------------------------------------------------------------


def test_yaml_errors_say_where_but_not_what(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    for text in ("api:\n  token: *anchorSECRET\n", "s3:\n  secret_access_key: 'unterminatedSECRET\n",
                 "s3:\n  secret_access_key: [SECRETinside\n"):  # fmt: skip
        path.write_text(text)
        message = config_error(path)
        assert "not valid YAML: line" in message and "SECRET" not in message, message


@pytest.mark.parametrize(
    ("fleet", "triggers"),
    [
        ({"s3": {"secret_access_key": {"nested": "SECRETvalue"}}}, None),
        ({"s3": {"access_key_id": ["SECRETvalue"]}}, None),
        ({"s3": "secret_access_key: SECRETvalue"}, None),  # a whole section given as a string
        ({"api": {"enabled": True, "token": 1234567890123456789}}, None),
        ({"redis": {"url": "http://user:SECRETvalue@redis:6379/0"}}, None),
        ({"defaults": {"on_success": "kafkaa://user:SECRETvalue@broker:9092/done"}}, None),
        ({"defaults": {"dead_letter": "kafka://user:SECRETvalue@broker:9092/"}}, None),
        ({"api": {"enabled": True, "token": STRONG}}, {"hook": {**HOOK, "hmac_secret": ["SECRETvalue"]}}),
        ({"api": {"enabled": True, "token": STRONG}}, {"hook": {**HOOK, "token": {"SECRETvalue": 1}}}),
    ],
)
def test_invalid_secrets_are_masked_in_every_message(tmp_path: Path, fleet: dict[str, Any],
                                                     triggers: dict[str, Any] | None) -> None:  # fmt: skip
    message = config_error(write(tmp_path, fleet, triggers))
    assert "SECRET" not in message and "1234567890" not in message, message


def test_ordinary_values_are_still_shown(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, {"kafka": {"session_timeout_ms": 12}}))
    assert "kafka.session_timeout_ms" in message and "got 12" in message
    message = config_error(write(tmp_path, {"worker": {"pools": "eu"}}))
    assert "worker.pools" in message and "got 'eu'" in message


def test_a_url_password_is_masked() -> None:
    assert redact_url("redis://:p%40ss@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_gpufleet_run_without_a_token_stops_at_once_with_the_fix(tmp_path: Path) -> None:
    env = {**os.environ, "GPUFLEET_CONFIG": str(write(tmp_path, {"api": {"enabled": True}}))}
    env.pop("GPUFLEET_API__TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "gpufleet", "run"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode != 0 and "GPUFLEET_API__TOKEN=$(gpufleet token)" in done.stdout + done.stderr


def test_the_cli_reports_an_env_secret_error_without_value_or_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, {"api": {"enabled": True}})
    env = {**os.environ, "GPUFLEET_CONFIG": str(path), "GPUFLEET_API__TOKEN": "*anchorSECRET: x #y"}
    done = subprocess.run([sys.executable, "-m", "gpufleet", "check"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "GPUFLEET_API__TOKEN" in out and "header cannot carry" in out, out
    assert "SECRET" not in out and "Traceback" not in out, out


def test_the_trigger_file_error_masks_a_short_hmac_secret(tmp_path: Path) -> None:
    (tmp_path / "triggers").mkdir()
    (tmp_path / "triggers" / "hook.yaml").write_text(yaml.safe_dump({**HOOK, "hmac_secret": "0123456789"}))
    message = config_error(write(tmp_path, {"api": {"enabled": True, "token": STRONG}}))
    assert "hmac_secret" in message and "0123456789" not in message
