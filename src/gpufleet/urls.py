"""URLs pick backends, as in kombu: the scheme maps to ``module:Class``, imported only when used."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpufleet.credentials import redact_url, secret_problem, shared_secret_fix
from gpufleet.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Endpoint:
    """A parsed source or destination URL.

    ``kafka:///topic`` means "the fleet's own Kafka" (``kafka.bootstrap_servers``);
    ``kafka://h1:9092,h2:9092/topic`` names other brokers.
    """

    url: str
    scheme: str
    hosts: str | None
    path: str
    options: dict[str, str]


def parse_url(
    url: str,
    schemes: dict[str, str],
    *,
    where: str | None,
    key: str | None,
    what: str,
    pathless: frozenset[str] = frozenset(),
) -> Endpoint:
    """Split ``url`` and check its scheme; a scheme in ``pathless`` (a whole-URL endpoint, such as https) may
    name no path."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        hint = did_you_mean(parts.scheme, list(schemes)) if parts.scheme else None
        raise ConfigError(
            f"unsupported {what} URL {redact_url(url)!r}",
            file=where,
            key=key,
            fix=hint or f"use one of {', '.join(s + '://' for s in sorted(schemes))}",
        )
    if not url.startswith(f"{parts.scheme}://"):  # kafka:/topic would read as a path, and no broker
        raise ConfigError(
            f"{what} URL {redact_url(url)!r} lacks the '//' after '{parts.scheme}:'",
            file=where,
            key=key,
            fix=f"{parts.scheme}:///name, or {parts.scheme}://host:port/name",
        )
    path = unquote(parts.path.lstrip("/"))
    if not path and parts.scheme not in pathless:
        raise ConfigError(
            f"{what} URL {redact_url(url)!r} names no topic or queue",
            file=where,
            key=key,
            fix=f"{parts.scheme}:///name",
        )
    return Endpoint(
        url=url, scheme=parts.scheme, hosts=parts.netloc or None, path=path, options=dict(parse_qsl(parts.query))
    )


# An option that names an environment variable (``secret_env``, ``password_env``): a variable's name, nothing more.
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Options(BaseModel):
    """A backend's URL options, declared beside its class (``OPTIONS``): unknown ones are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(
    endpoint: Endpoint,
    model: type[Options],
    *,
    what: str,
    where: str | None,
    key: str | None,
    env: Mapping[str, str] | None = None,
) -> Options:
    """Validate ``endpoint.options`` against the backend's model; with ``env``, also that the variables its
    ``*_env`` options name are set and hold a strong secret. Raises ConfigError naming ``where`` and ``key``."""
    try:
        parsed = model.model_validate(endpoint.options)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        fields = list(model.model_fields)
        scheme = endpoint.scheme
        if err["type"] == "extra_forbidden":
            fix = did_you_mean(name, fields) or (f"{scheme}:// takes {fields}" if fields else "remove it")
            raise ConfigError(f"{scheme}:// {what}s take no option {name!r}", file=where, key=key, fix=fix) from None
        if err["type"] == "missing":
            raise ConfigError(
                f"{scheme}:// {what}s need the option {name!r}", file=where, key=key, fix=f"add ?{name}=... to the URL"
            ) from None
        raise ConfigError(f"option {name!r}: {err['msg']}", file=where, key=key) from None
    for option, var in parsed.model_dump().items():
        if env is None or not option.endswith("_env") or var is None:
            continue
        value = env.get(var)
        weakness = value and secret_problem(value, in_header=False)
        problem = "is not set" if not value else weakness and f"holds a weak secret: {weakness}"
        if problem:
            raise ConfigError(
                f"{option}: the environment variable {var} {problem}", file=where, key=key, fix=shared_secret_fix(var)
            )
    return parsed


def amqp_login(url: str, password_env: str | None) -> dict[str, Any]:
    """py-amqp's connection arguments for ``amqp[s]://user:password@host:port/vhost``: the vhost URL-decoded (``/``
    when the path is empty), the default ports 5672 and 5671, and the password read from the environment variable
    ``password_env`` when one is named, instead of from the URL.

    Raises:
        ConfigError: ``password_env`` names a variable that is not set.
    """
    parts = urlsplit(url)
    password = parts.password
    if password_env is not None:
        password = os.environ.get(password_env)  # the variable is named by the URL
        if not password:
            raise ConfigError(f"environment variable {password_env} is not set", key="password_env")
    tls = parts.scheme == "amqps"
    return {
        "host": f"{parts.hostname or '127.0.0.1'}:{parts.port or (5671 if tls else 5672)}",
        "userid": unquote(parts.username or "guest"),
        "password": unquote(password or "guest"),
        "virtual_host": unquote(parts.path[1:]) or "/",
        "ssl": tls,
    }


def import_backend(spec: str) -> type:
    """Import ``"package.module:Class"``."""
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type)
    return cls
