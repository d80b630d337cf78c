"""Loading the fleet: ``config/fleet.yaml``, ``triggers/*.yaml`` and environment overrides, read into the models of
:mod:`gpufleet.settings` and validated at load.

This is the only module that reads the environment. Rules:

- Unknown keys are errors, with a "did you mean" hint.
- Every error names the file, the key and the fix.
- ``GPUFLEET_<SECTION>__<KEY>=value`` overrides a setting of ``fleet.yaml``. Example:
  ``GPUFLEET_REDIS__URL=redis://redis:6379/0``. Values are taken as they are (a secret full of ``#``, ``:`` or
  digits stays a string); only list settings (``worker.pools``) are read as YAML: ``[gpu-a, gpu-b]``.
- No message shows the value of a secret setting (:func:`gpufleet.credentials.is_secret_name`) or a URL's
  password.
- ``GPUFLEET_CONFIG`` names the fleet file when the CLI gets no ``--config``.
- Relative paths in ``fleet.yaml`` are relative to the folder that holds it.

The functions are loaded from the ``workers/`` folders (:func:`load_functions`): each file imported as a module of
its own, and the :class:`~gpufleet.functions.Function` objects it defines collected.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gpufleet.credentials import hidden, is_secret_name, redact_url
from gpufleet.destinations import parse_destination
from gpufleet.errors import ConfigError, did_you_mean
from gpufleet.functions import FUNCTIONS_NAMESPACE, Function
from gpufleet.settings import FleetSettings
from gpufleet.triggers import check_keys, parse_source, served_by, settings_model
from gpufleet.triggers.options import TriggerSettings

ENV_PREFIX = "GPUFLEET_"
# Not settings: read by the CLI and the roles (GPUFLEET_GPUS: by a handler, the GPUs its worker sees).
RESERVED_ENV = {"GPUFLEET_CONFIG", "GPUFLEET_PARENT_PID", "GPUFLEET_DEV_DIR", "GPUFLEET_GPUS"}
DEFAULT_CONFIG = Path("config/fleet.yaml")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Fleet:
    """Everything loaded and cross-checked: settings, functions and triggers."""

    settings: FleetSettings
    functions: dict[str, Function]
    triggers: dict[str, TriggerSettings]
    config_file: Path


def load_fleet(config_file: Path | None = None, env: Mapping[str, str] | None = None, *, secrets: bool = True) -> Fleet:
    """Load and validate the fleet: settings, environment overrides, functions and triggers.

    ``secrets=False`` leaves out the checks of the secrets that triggers and destinations name (``*_env``): a control
    command (status, cancel, invoke...) reads Redis and never signs a record nor checks a webhook, so it must not
    need the delivery role's secrets. Everything else is validated as for a role.

    Raises:
        ConfigError: anything invalid, naming the file, the key and the fix.
    """
    env = os.environ if env is None else env
    secret_env = env if secrets else None
    path = config_file or Path(env.get(f"{ENV_PREFIX}CONFIG", str(DEFAULT_CONFIG)))
    if path == DEFAULT_CONFIG and not path.exists():
        raise ConfigError(
            f"no fleet here ({Path.cwd()})",
            file=str(path),
            fix="`gpufleet init` writes a starter "
            "project in this folder; or pass --config FILE, or set GPUFLEET_CONFIG",
        )
    raw, from_env = _apply_env(_read_yaml(path), env)
    settings = _validate(FleetSettings, raw, str(path), from_env)
    base = path.resolve().parent
    settings = settings.model_copy(
        update={
            "functions": tuple((base / p).resolve() for p in settings.functions),
            "triggers": tuple((base / p).resolve() for p in settings.triggers),
        }
    )
    functions = load_functions(settings.functions)
    unknown = sorted(set(settings.aliases) - set(functions))
    if unknown:
        raise ConfigError(
            f"aliases for functions this fleet does not serve: {unknown}",
            file=str(path),
            key="aliases",
            fix=f"use one of {sorted(functions)}",
        )
    triggers = load_triggers(
        settings.triggers, functions, secret_env, settings.defaults.max_record_bytes, settings.api.weak_secrets_allowed
    )
    for key in ("on_success", "on_failure", "dead_letter"):
        parse_destination(getattr(settings.defaults, key), where=str(path), key=f"defaults.{key}", env=secret_env)
    for fn in functions.values():
        for key in ("on_success", "on_failure"):
            url = getattr(fn, key)
            if url:
                parse_destination(url, where=fn.source_file, key=f"{fn.name}.{key}", env=secret_env)
    hooks = [t.name for t in triggers.values() if t.enabled and served_by(t.scheme) == "api"]
    if hooks and not settings.api.enabled:
        raise ConfigError(
            f"webhook trigger(s) {hooks} are served by the api role, which is off",
            file=str(path),
            key="api.enabled",
            fix="set api.enabled: true (and api.token)",
        )
    return Fleet(settings=settings, functions=functions, triggers=triggers, config_file=path.resolve())


def load_triggers(
    folders: tuple[Path, ...],
    functions: Mapping[str, Function],
    env: Mapping[str, str] | None = None,
    max_record_bytes: int | None = None,
    weak_secrets_allowed: bool = False,
) -> dict[str, TriggerSettings]:
    """Load every ``*.yaml`` trigger file in the folders: each against its scheme's model (declared by its trigger
    class), then its source, function and destinations; with ``env``, the secrets they name too (left unresolved
    without it)."""
    triggers: dict[str, TriggerSettings] = {}
    for folder in folders:
        if not folder.is_dir():
            continue  # a fleet that only serves the HTTP API needs no trigger folder
        for file in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            where = str(file)
            raw = _read_yaml(file)
            raw.setdefault("name", file.stem)
            source = raw.get("source")
            if not isinstance(source, str):
                raise ConfigError(
                    "is required: the URL of the trigger's source" if source is None else "must be a URL",
                    file=where,
                    key="source",
                    fix="kafka:///topic, sqs:///queue, "
                    "webhook:///path, s3://bucket/prefix or amqp://host/vhost?queue=NAME",
                )
            scheme = parse_source(source, where=where, key="source", env=env).scheme
            check_keys(scheme, raw, raw.get("format"), where=where)
            trigger = _validate(settings_model(scheme, raw.get("format")), raw, where)
            if env is not None:
                trigger = trigger.resolved(env, where=where, weak_secrets_allowed=weak_secrets_allowed)
            if trigger.name in triggers:
                raise ConfigError(f"trigger name {trigger.name!r} is used twice", file=where, key="name")
            if max_record_bytes and (trigger.max_payload_bytes or 0) > max_record_bytes:
                raise ConfigError(
                    f"{trigger.max_payload_bytes} is more than defaults.max_record_bytes "
                    f"({max_record_bytes}): an accepted message must fit its dead letter",
                    file=where,
                    key="max_payload_bytes",
                    fix="lower it, or raise defaults.max_record_bytes",
                )
            if trigger.function is not None and trigger.function not in functions:
                raise ConfigError(
                    f"unknown function {trigger.function!r}",
                    file=where,
                    key="function",
                    fix=did_you_mean(trigger.function, functions) or f"one of {sorted(functions)}",
                )
            if trigger.object_events and trigger.function is None:
                raise ConfigError(
                    "an object-event trigger needs a function",
                    file=where,
                    key="function",
                    fix="name the function that gets each object event",
                )
            for key in ("dead_letter", "on_success", "on_failure"):
                url = getattr(trigger, key)
                if url:
                    parse_destination(url, where=where, key=key, env=env)
            triggers[trigger.name] = trigger
    return triggers


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path), fix="check the path or set --config") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {_yaml_problem(exc)}", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys", file=str(path))
    return data


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Overlay ``GPUFLEET_*`` variables; also return which keys they set ("redis.url" -> variable name)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    sources: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if len(path) not in (1, 2) or path[0] not in FleetSettings.model_fields:
            raise ConfigError(
                "unknown setting",
                file="environment",
                key=name,
                fix=f"use {ENV_PREFIX}<SECTION>__<KEY>, SECTION one of {sorted(FleetSettings.model_fields)}",
            )
        parsed: Any = value
        if value and _structured(FleetSettings, path):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"not valid YAML: {_yaml_problem(exc)}", file="environment", key=name, fix="write a list as [a, b]"
                ) from None
        sources[".".join(path)] = name
        if len(path) == 1:
            merged[path[0]] = parsed
        else:
            section = merged.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ConfigError("is not a section", file="environment", key=name)
            section[path[1]] = parsed
    return merged, sources


def _validate(model: type[M], raw: dict[str, Any], where: str, from_env: Mapping[str, str] | None = None) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if from_env and key in from_env:
            where = f"environment variable {from_env[key]}"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, err["loc"][:-1])
            hint = did_you_mean(str(err["loc"][-1]), owner.model_fields if owner else {})
            raise ConfigError("unknown key", file=where, key=key, fix=hint or "remove it") from None
        if not err["loc"]:  # a rule across keys: the message names them (the first one first) and the fix
            message = err["msg"].removeprefix("Value error, ")
            named = message.split(" ", 1)[0]
            if from_env and named in from_env:
                where = f"environment variable {from_env[named]}"
            raise ConfigError(message, file=where) from None
        if err["type"] == "missing":
            raise ConfigError("is required", file=where, key=key, fix="add it") from None
        shown = _shown(model, err["loc"], err.get("input"))
        raise ConfigError(err["msg"], file=where, key=key, fix=f"got {shown}") from None


def _shown(model: type[BaseModel], loc: tuple[int | str, ...], value: Any) -> str:
    """A rejected value as an error message may show it: never a secret, nor a section that may hold one."""
    path = [str(part) for part in loc]
    annotation = _annotation_at(model, path)
    if is_secret_name(path[-1]) or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return hidden(value)
    if isinstance(value, dict | list | tuple):
        return f"a {type(value).__name__} of {len(value)} items"
    shown = repr(redact_url(value) if isinstance(value, str) else value)
    return shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"


def _annotation_at(model: type[BaseModel], path: list[str]) -> Any:
    """The type of the setting at ``path``; None for a key the model does not have (validation names it)."""
    annotation: Any = model
    for part in path:
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        info = annotation.model_fields.get(part) if is_model else None
        if info is None:
            return None
        annotation = info.annotation
    return annotation


def _structured(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the setting at ``path`` is a section or a list (given in the environment as YAML)."""
    annotation = _annotation_at(model, path)
    return get_origin(annotation) in (tuple, list, dict) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without the text: YAML quotes what it could not read, and that may be a secret."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = re.sub(r"'[^']{2,}'", "'...'", str(getattr(exc, "problem", None) or type(exc).__name__))
    return where + problem


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def check_jobs(functions: dict[str, Function]) -> None:
    """Each job's shard function is served by this fleet and is no job itself, and each job merges.

    Raises:
        ConfigError: naming the job and the fix.
    """
    for fn in functions.values():
        if fn.shards is None:
            continue
        shard = functions.get(fn.shards.function)
        if shard is None or shard.shards is not None:
            why = "is not served by this fleet" if shard is None else "is a job itself (jobs do not nest)"
            raise ConfigError(
                f"job {fn.name!r}: its shard function {fn.shards.function!r} {why}",
                file=fn.source_file,
                key="shard",
                fix="name a @function of the same fleet",
            )
        if fn.shards.merge_fn is None:
            raise ConfigError(
                f"job {fn.name!r} has no merge step",
                file=fn.source_file,
                key="merge",
                fix="decorate a def merge(event, results, ctx) with @<the split>.merge",
            )


def load_functions(paths: Iterable[Path]) -> dict[str, Function]:
    """Import every ``*.py`` module in the given folders and collect the :class:`Function` objects they define.

    Raises:
        ConfigError: a module fails to import, or two functions share a name.
    """
    found: dict[str, Function] = {}
    for folder in paths:
        if not folder.is_dir():
            raise ConfigError("functions folder does not exist", file=str(folder), fix="create it or fix the path")
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            for fn in _functions_in(import_file(path)):
                if fn.name in found:
                    raise ConfigError(
                        f"function {fn.name!r} is also defined in {found[fn.name].source_file}",
                        file=str(path),
                        fix="give each function a unique name",
                    )
                fn.source_file = str(path)
                found[fn.name] = fn
    check_jobs(found)
    return found


def import_file(path: Path) -> object:
    # A private module namespace, so a user's workers/utils.py never shadows a library module.
    module_name = f"{FUNCTIONS_NAMESPACE}{path.stem}"
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path):
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError("cannot import this file", file=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(str(exc), file=str(path)) from exc
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise _import_error(path, exc) from exc
    return module


def _import_error(path: Path, exc: Exception) -> ConfigError:
    """Which line of the user's module failed, and what to do about it."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    line = exc.lineno if isinstance(exc, SyntaxError) else lines[-1] if lines else None
    at = f" (line {line})" if line else ""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        fix = f"install the package that provides {exc.name!r} where gpufleet runs, or remove the import"
    else:
        fix = f"run `python {path}` to see the whole traceback"
    return ConfigError(f"importing it failed{at}: {type(exc).__name__}: {exc}", file=str(path), fix=fix)


def _functions_in(module: object) -> list[Function]:
    return [value for value in vars(module).values() if isinstance(value, Function)]
