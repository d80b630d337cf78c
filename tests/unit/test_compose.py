"""Static checks of the Docker Compose stack in compose/: every secret is required (no defaults), nothing without
authentication is published, Redis needs a password, and gpufleet uses a least-privilege MinIO key of its own.

They read the YAML, so they need no Docker; ``docker compose config`` is tried as well where it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
MAIN = COMPOSE / "docker-compose.yml"
FILES = sorted(COMPOSE.glob("docker-compose*.yml"))
ROLES = {"dispatcher", "trigger", "bucket-trigger", "api", "worker"}
REQUIRED_VARS = {
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "GPUFLEET_S3_ACCESS_KEY",
    "GPUFLEET_S3_SECRET_KEY",
    "REDIS_PASSWORD",
    "GPUFLEET_API_TOKEN",
}
KAFKA_PORTS = {9092, 9093, 9094}
ALLOWED_S3_ACTIONS = {
    "s3:GetObject",
    "s3:PutObject",
    "s3:ListBucket",
    "s3:GetBucketLocation",
    "s3:AbortMultipartUpload",
}

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY|AUTH")
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")  # ${NAME}, ${NAME:-x}, ${NAME:?message}, ...
REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*[^}\s][^}]*\}")  # ${NAME:?non-empty message}


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's ``!reset`` and ``!override`` tags (as the value they carry)."""


def _tagged(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_multi_constructor("!", _tagged)


def _load(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader subclass
    assert isinstance(data, dict), path
    return data


def _services(path: Path) -> dict[str, dict[str, Any]]:
    return _load(path).get("services") or {}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _text(value: Any) -> str:
    """A command, entrypoint or healthcheck test as one string."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _script(service: dict[str, Any]) -> str:
    return _text(service.get("entrypoint")) + "\n" + _text(service.get("command"))


def _required_var(value: str) -> str | None:
    """The variable ``value`` requires (``${NAME:?message}``), if every reference in it is of that form."""
    refs = REFERENCE.findall(value)
    required = REQUIRED.findall(value)
    if not refs or len(required) != len(refs):
        return None
    return required[0]


def _ports(service: dict[str, Any]) -> list[tuple[str | None, int | None]]:
    """(host ip, container port) of each published port, in short or long syntax."""
    out: list[tuple[str | None, int | None]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            target = entry.get("target")
            out.append((entry.get("host_ip"), int(target) if target is not None else None))
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        host_ip = parts[0] if len(parts) == 3 else None
        container = parts[-1].split("-", 1)[0]
        out.append((host_ip, int(container) if container.isdigit() else None))
    return out


def _init_service(services: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    found = [(name, s) for name, s in services.items() if "mc admin user add" in _script(s)]
    assert len(found) == 1, "one init service must create gpufleet's MinIO user (mc admin user add)"
    return found[0]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_secret_is_a_required_variable(path: Path) -> None:
    for name, service in _services(path).items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                assert _required_var(value), f"{path.name}: {name}.{key} must be ${{VAR:?message}}, is {value!r}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_secret_has_a_default(path: Path) -> None:
    for var, rest in REFERENCE.findall(path.read_text()):
        if var in REQUIRED_VARS or SECRET_NAME.search(var):
            assert rest.startswith(":?") and rest[2:].strip(), f"{path.name}: ${{{var}{rest}}} must be ${{{var}:?...}}"


def test_every_required_variable_is_required_and_documented() -> None:
    required = set(REQUIRED.findall(MAIN.read_text()))
    assert required >= REQUIRED_VARS
    readme = (COMPOSE / "README.md").read_text()
    for var in sorted(required):
        assert re.search(rf"^{var}=", readme, re.MULTILINE), f"compose/README.md's .env example lacks {var}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_published_ports_are_loopback_only_and_never_kafka(path: Path) -> None:
    for name, service in _services(path).items():
        assert service.get("network_mode") != "host", f"{path.name}: {name} uses the host's network"
        ports = _ports(service)
        if "kafka" in str(service.get("image", "")) or name == "kafka":
            assert not ports, f"{path.name}: {name} publishes {service['ports']}"
        for host_ip, container in ports:
            assert host_ip == "127.0.0.1", f"{path.name}: {name} publishes port {container} beyond loopback"
            assert container not in KAFKA_PORTS, f"{path.name}: {name} publishes Kafka's port {container}"


def test_kafka_has_no_external_listener() -> None:
    env = _env(_services(MAIN)["kafka"])
    assert "EXTERNAL" not in env["KAFKA_LISTENERS"]
    assert "localhost" not in env["KAFKA_ADVERTISED_LISTENERS"]


def test_redis_requires_a_password() -> None:
    redis = _services(MAIN)["redis"]
    env = _env(redis)
    assert not redis.get("ports")
    match = re.search(r"--requirepass\s+\"?(\$\$(\w+)|\$\{[^}]+\})", _script(redis))
    assert match, "redis-server must run with --requirepass"
    value = env.get(match.group(2), "") if match.group(2) else match.group(1)
    assert _required_var(value) == "REDIS_PASSWORD"
    check = _text(redis["healthcheck"]["test"])
    authenticated = re.search(r"-a\s+\"?\$\$REDIS_PASSWORD", check) or _required_var(env.get("REDISCLI_AUTH", ""))
    assert authenticated, "the healthcheck must authenticate (redis-cli -a or REDISCLI_AUTH)"


def test_roles_use_the_redis_password_and_their_own_minio_key() -> None:
    services = _services(MAIN)
    init_name, _ = _init_service(services)
    assert services.keys() >= ROLES
    for name in ROLES:
        role = services[name]
        env = _env(role)
        url = env["GPUFLEET_REDIS__URL"]
        assert re.match(r"rediss?://:\$\{REDIS_PASSWORD:\?[^}]+\}@", url), f"{name}: {url}"
        assert _required_var(env["GPUFLEET_S3__ACCESS_KEY_ID"]) not in (None, "MINIO_ROOT_USER"), name
        assert _required_var(env["GPUFLEET_S3__SECRET_ACCESS_KEY"]) not in (None, "MINIO_ROOT_PASSWORD"), name
        referenced = {var for value in env.values() for var, _ in REFERENCE.findall(value)}
        assert not {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} & referenced, f"{name} gets MinIO's root credentials"
        depends = role.get("depends_on") or {}
        assert isinstance(depends, dict) and init_name in depends, f"{name} must wait for {init_name}"
        assert depends[init_name].get("condition") == "service_completed_successfully", name


def test_init_service_creates_gpufleets_user_with_a_narrow_policy() -> None:
    services = _services(MAIN)
    _, init = _init_service(services)
    script, env = _script(init), _env(init)
    role_key = _required_var(_env(services["worker"])["GPUFLEET_S3__ACCESS_KEY_ID"])
    keys = [k for k, v in env.items() if _required_var(v) == role_key]
    assert keys, "the init service must get the roles' access key"
    user = rf"\"?\$\$(?:{'|'.join(keys)})\b"
    assert re.search(rf"mc admin user add \S+ {user}", script)
    assert re.search(rf"mc admin policy attach \S+ (\S+) --user {user}", script)

    # The policy is a file under compose/, mounted into the init service and created from there.
    mounts = {}
    for volume in init.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        mounts[target] = (COMPOSE / source).resolve()
    created = re.search(r"mc admin policy create \S+ (\S+) (\S+)", script)
    assert created and created.group(2) in mounts, "mc admin policy create must read a policy file from compose/"
    policy_file = mounts[created.group(2)]
    assert COMPOSE in policy_file.parents and policy_file.is_file()
    policy = json.loads(policy_file.read_text())

    buckets = set(re.findall(r"mc mb (?:--ignore-existing )?\S+/([\w.-]+)", script))
    assert buckets, "the init service creates the buckets"
    granted: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement and "NotResource" not in statement
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for action in actions:
            assert "*" not in action and action in ALLOWED_S3_ACTIONS, action
        for resource in resources:
            match = re.fullmatch(r"arn:aws:s3:::([\w.-]+)(/\*)?", resource)
            assert match and match.group(1) in buckets, f"resource {resource!r} is not one of the buckets {buckets}"
            for action in actions:
                granted.setdefault(action, set()).add(resource)

    # ...and enough: read what the bucket trigger's events name, write where its outputs go.
    for bucket in re.findall(r"mc event add \S+/([\w.-]+)", script):
        assert f"arn:aws:s3:::{bucket}/*" in granted.get("s3:GetObject", set())
    trigger = yaml.safe_load((COMPOSE.parent / "triggers" / "minio-images.yaml").read_text())
    output_bucket = trigger["output"].removeprefix("s3://").split("/", 1)[0]
    assert f"arn:aws:s3:::{output_bucket}/*" in granted.get("s3:PutObject", set())


def _docker_compose() -> list[str] | None:
    if not shutil.which("docker"):
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if probe.returncode == 0 else None


def test_docker_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    compose = _docker_compose()
    if compose is None:
        pytest.skip("docker compose is not installed")
    files = [arg for f in FILES for arg in ("-f", str(f))]
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED_VARS}
    empty = tmp_path / "empty.env"
    empty.write_text("")
    cmd = [*compose, "--env-file", str(empty), *files, "config", "--quiet"]
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert missing.returncode != 0
    assert "required variable" in missing.stderr
    env.update(dict.fromkeys(REQUIRED_VARS, "x" * 32))
    env["GPUFLEET_S3_ACCESS_KEY"] = "gpufleet"
    complete = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert complete.returncode == 0, complete.stderr


def test_the_cpu_overlay_builds_every_role_with_the_pinned_cpu_torch() -> None:
    """One image for every role: each service that builds it gets the same arguments, the torch pin of the
    development lock (requirements/torch.txt), and PyTorch's CPU index (the Dockerfile falls back to the default
    index when it does not answer)."""
    makefile = (COMPOSE.parent / "Makefile").read_text()
    pin = re.fullmatch(r"(torch==\S+)\n", (COMPOSE.parent / "requirements" / "torch.txt").read_text())
    index = re.search(r"^TORCH_CPU_INDEX\s*:=\s*(\S+)", makefile, re.M)
    assert pin and index
    builders = {name for name, s in _services(MAIN).items() if "build" in s}
    assert builders == ROLES
    overlay = _services(COMPOSE / "docker-compose.cpu.yml")
    for role in ROLES:
        assert overlay[role]["build"]["args"] == {"TORCH_SPEC": pin[1], "TORCH_INDEX_URL": index[1]}, role
    dockerfile = (COMPOSE.parent / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL" in dockerfile and "--progress-bar on" in dockerfile
