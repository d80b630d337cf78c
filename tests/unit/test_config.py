"""Configuration errors name the file, the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpufleet.config import load_fleet
from gpufleet.errors import ConfigError

FUNCTIONS = Path(__file__).parents[1] / "functions"


def write(tmp_path: Path, fleet: dict, triggers: dict[str, dict] | None = None) -> Path:
    (tmp_path / "triggers").mkdir(exist_ok=True)
    for name, body in (triggers or {}).items():
        (tmp_path / "triggers" / f"{name}.yaml").write_text(yaml.safe_dump(body))
    fleet = {"functions": [str(FUNCTIONS)], "triggers": ["triggers"], **fleet}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    return path


def test_the_shipped_configuration_loads() -> None:
    env = {"GPUFLEET_API__TOKEN": "Xq7vR2mN9kLp4sT8wZ1bC6dF3gH0jY5u"}  # none is shipped (see test_secrets)
    fleet = load_fleet(Path(__file__).parents[2] / "config" / "fleet.yaml", env=env)
    assert {"embed", "sleep", "fail", "gpu_info"} <= set(fleet.functions)
    assert "requests" in fleet.triggers


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, {"kafka": {"bootstrap_server": "x:9092"}})
    with pytest.raises(ConfigError) as err:
        load_fleet(path, env={})
    message = str(err.value)
    assert str(path) in message and "kafka.bootstrap_server" in message
    assert "did you mean 'bootstrap_servers'" in message


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fleet.yaml: redis.url: .*not a redis://"):
        load_fleet(write(tmp_path, {"redis": {"url": "http://localhost"}}), env={})
    with pytest.raises(ConfigError, match=r"worker.virtual_gpus"):
        load_fleet(write(tmp_path, {"worker": {"virtual_gpus": -1}}), env={})


def test_trigger_with_unknown_function_or_bad_url(tmp_path: Path) -> None:
    path = write(tmp_path, {}, {"t1": {"source": "kafka:///in", "function": "ecko"}})
    with pytest.raises(ConfigError) as err:
        load_fleet(path, env={})
    assert "t1.yaml" in str(err.value) and "function" in str(err.value) and "did you mean 'echo'" in str(err.value)

    path = write(tmp_path, {}, {"t1": {"source": "kafka:/in", "function": "echo"}})
    with pytest.raises(ConfigError, match=r"t1.yaml: source: .*lacks the '//'.*kafka:///name"):
        load_fleet(path, env={})

    path = write(tmp_path, {}, {"t1": {"source": "kafak:///in", "function": "echo"}})
    with pytest.raises(ConfigError, match=r"t1.yaml: source: .*did you mean 'kafka'"):
        load_fleet(path, env={})

    path = write(tmp_path, {}, {"t1": {"source": "kafka:///in", "function": "echo", "on_succes": "kafka:///x"}})
    with pytest.raises(ConfigError, match=r"t1.yaml: on_succes: unknown key .*did you mean 'on_success'"):
        load_fleet(path, env={})


def test_environment_overrides_and_their_errors(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    fleet = load_fleet(path, env={"GPUFLEET_REDIS__URL": "redis://redis:6379/1", "GPUFLEET_WORKER__VIRTUAL_GPUS": "3"})
    assert fleet.settings.redis.url == "redis://redis:6379/1"
    assert fleet.settings.worker.virtual_gpus == 3
    with pytest.raises(ConfigError, match=r"environment variable GPUFLEET_REDIS__URLL: redis.urll: unknown key"):
        load_fleet(path, env={"GPUFLEET_REDIS__URLL": "redis://x"})
    with pytest.raises(ConfigError, match=r"environment variable GPUFLEET_WORKER__LEASE_S: worker.lease_s: "):
        load_fleet(path, env={"GPUFLEET_WORKER__LEASE_S": "soon"})
    with pytest.raises(ConfigError, match=r"GPUFLEET_NOPE: unknown setting"):
        load_fleet(path, env={"GPUFLEET_NOPE": "1"})


def test_missing_file_and_broken_function_module(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read"):
        load_fleet(tmp_path / "nope.yaml", env={})
    funcs = tmp_path / "funcs"
    funcs.mkdir()
    (funcs / "broken.py").write_text("import no_such_module_here\n")
    path = write(tmp_path, {"functions": [str(funcs)]})
    with pytest.raises(
        ConfigError,
        match=r"broken.py: importing it failed \(line 1\): ModuleNotFoundError.*"
        r"fix: install the package that provides 'no_such_module_here'",
    ):
        load_fleet(path, env={})
    (funcs / "broken.py").write_text("x = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"importing it failed \(line 2\): RuntimeError: boom .*fix: run `python "):
        load_fleet(path, env={})
    (funcs / "broken.py").write_text("x = 1\n\ny = = 2\n")
    with pytest.raises(ConfigError, match=r"importing it failed \(line 3\): SyntaxError"):
        load_fleet(path, env={})
    (funcs / "broken.py").write_text("from gpufleet import function\n@function(timeout_s=0)\ndef f(e, c): pass\n")
    with pytest.raises(ConfigError, match=r"broken.py: .*timeout_s"):
        load_fleet(path, env={})


def test_api_needs_a_token_and_never_echoes_it(tmp_path: Path) -> None:
    path = write(tmp_path, {"api": {"enabled": True}})
    # Only the API's process needs it: a GPU host loads the same file without one.
    api = load_fleet(path, env={}).settings.api
    with pytest.raises(ConfigError, match=r"fleet.yaml: api.token: is required .* GPUFLEET_API__TOKEN"):
        api.require_token(str(path))
    with pytest.raises(ConfigError) as err:
        load_fleet(path, env={"GPUFLEET_API__TOKEN": "short-secret"})
    assert "GPUFLEET_API__TOKEN" in str(err.value) and "12 characters" in str(err.value)
    assert "short-secret" not in str(err.value)
    strong = "Xq7vR2mN9kLp4sT8wZ1bC6dF3gH0jY5u"
    fleet = load_fleet(path, env={"GPUFLEET_API__TOKEN": strong})
    assert fleet.settings.api.token == strong


@pytest.mark.parametrize(
    ("trigger", "key", "fix"),
    [
        (
            {"source": "kafka:///t", "skip_existing": True},
            "skip_existing",
            "kafka triggers take ['commit_interval_ms', 'group']",
        ),
        ({"source": "kafka:///t", "poll_interval_s": 5}, "poll_interval_s", "did you mean 'commit_interval_ms'"),
        ({"source": "kafka:///t", "wait_time_s": 5}, "wait_time_s", "kafka triggers take"),
        ({"source": "kafka:///t", "token": "x"}, "token", "kafka triggers take"),
        ({"source": "kafka:///t", "prefix": "in/"}, "prefix", "add `format: s3`"),
        ({"source": "kafka:///t", "grup": "g"}, "grup", "did you mean 'group'"),
        ({"source": "s3://bucket/in", "function": "echo", "wait_time_s": 5}, "wait_time_s", "poll_interval_s"),
        ({"source": "sqs:///q", "function": "echo", "skip_existing": True}, "skip_existing", "visibility_timeout_s"),
        ({"source": "sqs:///q", "function": "echo", "format": "json"}, "format", "always read S3 event"),
    ],
)
def test_a_key_the_triggers_scheme_does_not_take_is_an_error(tmp_path: Path, trigger: dict, key: str,
                                                              fix: str) -> None:  # fmt: skip
    path = write(tmp_path, {}, {"t": trigger})
    with pytest.raises(ConfigError) as err:
        load_fleet(path, env={})
    assert err.value.key == key and "t.yaml" in str(err.value) and fix in str(err.value), str(err.value)
    kafka_objects = {"source": "kafka:///t", "format": "s3", "function": "echo", "prefix": "in/", "group": "g"}
    assert load_fleet(write(tmp_path, {}, {"t": kafka_objects}), env={}).triggers["t"].prefix == "in/"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("kafka:///t?group=g", "kafka:// trigger sources take no option 'group'"),
        ("sqs:///q?acount=123456789012", "did you mean 'account'"),
        ("sqs:///q?account=12", "option 'account'"),
        ("amqp://rabbit/", "amqp:// trigger sources need the option 'queue'"),
        ("amqp://rabbit/?queue=q&password_env=RABBIT_PASSWORD", "RABBIT_PASSWORD is not set"),
    ],
)
def test_a_source_option_the_scheme_does_not_declare_is_an_error(tmp_path: Path, source: str, message: str) -> None:
    """A URL's options are declared beside the trigger class (OPTIONS), and checked with the environment at load."""
    function = {} if source.startswith(("kafka", "amqp")) else {"function": "echo"}
    path = write(tmp_path, {}, {"t": {"source": source, **function}})
    with pytest.raises(ConfigError) as err:
        load_fleet(path, env={})
    assert err.value.key == "source" and "t.yaml" in str(err.value) and message in str(err.value), str(err.value)


def test_a_source_option_naming_a_set_variable_loads(tmp_path: Path) -> None:
    path = write(tmp_path, {}, {"t": {"source": "amqp://rabbit/?queue=q&password_env=RABBIT_PASSWORD"}})
    fleet = load_fleet(path, env={"RABBIT_PASSWORD": "Xq7vR2mN9kLp4sT8wZ1bC6dF3gH0jY5u"})
    assert fleet.triggers["t"].scheme == "amqp"


IMPORTS_ONE_WAY = """
import importlib, pkgutil, sys
mods = ["gpufleet.urls", "gpufleet.intake.path", "gpufleet.registry.messages", "gpufleet.aws", "gpufleet.triggers",
        "gpufleet.destinations"]
for package in ("gpufleet.triggers", "gpufleet.destinations"):
    mods += [f"{package}.{m.name}" for m in pkgutil.iter_modules(importlib.import_module(package).__path__)]
for mod in mods:
    for name in [n for n in sys.modules if n.startswith("gpufleet.")]:
        del sys.modules[name]
    importlib.import_module(mod)
    for loader in ("gpufleet.config", "gpufleet.settings"):
        assert loader not in sys.modules, f"{mod} imports {loader}"
print(len(mods))
"""


def test_settings_import_the_backends_and_never_the_other_way_round() -> None:
    """config -> settings, triggers, destinations -> urls, one way: a backend names the settings' types only for
    mypy (tests/unit/test_imports.py forbids any circle; this, that a backend never loads the settings at all)."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_ONE_WAY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 15


@pytest.mark.parametrize(("aliases", "why"), [
    ({"nope": {"prod": {"1": 1}}}, "aliases for functions this fleet does not serve: ['nope']"),
    ({"echo": {"Prod": {"1": 1}}}, "alias 'Prod'"),
    ({"echo": {"prod": {}}}, "name at least one version"),
    ({"echo": {"prod": {"1": 0}}}, "weights are numbers > 0"),
])  # fmt: skip
def test_aliases_are_checked_at_load(tmp_path: Path, aliases: dict, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_fleet(write(tmp_path, {"aliases": aliases}), env={})
    assert why in str(err.value) and "aliases" in str(err.value)


def test_a_job_must_name_a_served_shard_function_and_merge(tmp_path: Path) -> None:
    from gpufleet.config import load_functions

    part = "@function(name='part')\ndef part(e, ctx): pass\n"

    def load(body: str) -> None:
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "jobs.py").write_text("from gpufleet import function, job\n" + body)
        load_functions([folder])

    with pytest.raises(ConfigError, match="job 'big': its shard function 'nowhere' is not served by this fleet"):
        load("@job(name='big', shard='nowhere')\ndef big(e, ctx): return []\n@big.merge\ndef m(e, r, ctx): pass\n")
    with pytest.raises(ConfigError, match="job 'big' has no merge step"):
        load(part + "@job(name='big', shard=part)\ndef big(e, ctx): return []\n")
    with pytest.raises(ConfigError, match="max_shards=0"):
        load(part + "@job(name='big', shard=part, max_shards=0)\ndef big(e, c): ...")
    with pytest.raises(ConfigError, match="def merge\\(event, results, ctx\\)"):
        load(part + "@job(name='big', shard=part)\ndef big(e, c): ...\n@big.merge\ndef m(e): ...")
