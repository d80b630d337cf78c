"""Callback records against real Lambda destination records (tests/data/s3-vectors: AWS CDK's and
aws-lambda-java-libs' samples): a consumer written for Lambda's finds every field it reads, with Lambda's meaning."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from gpufleet.config import import_file
from gpufleet.delivery.records import Condition, callback_record, error_payload, function_arn

VECTORS = Path(__file__).parents[1] / "data" / "s3-vectors"


def lambda_record(name: str) -> dict[str, Any]:
    return orjson.loads((VECTORS / name).read_bytes())  # type: ignore[no-any-return]


def fields(record: dict[str, Any]) -> dict[str, type]:
    """Every field path of the record's envelope (the payloads are the function's own), with its value's type."""
    out: dict[str, type] = {}
    for key, value in record.items():
        if isinstance(value, dict) and key not in ("requestPayload", "responsePayload"):
            out |= {f"{key}.{k}": type(v) for k, v in value.items()}
        else:
            out[key] = type(value)
    return out


def ours(condition: Condition, started_at: float | None = 10.0, handled: bool = False) -> dict[str, Any]:
    response = (
        "done" if condition is Condition.SUCCESS else {"errorType": "Error", "errorMessage": "no", "stackTrace": []}
    )
    return callback_record(task_id="t-1", function="event-destinations", condition=condition, attempts=3,
                           event={"Success": condition is Condition.SUCCESS}, worker="vgpu0@h", gpu="vgpu0:virtual",
                           started_at=started_at, finished_at=12.5, response=response, fleet="prod",
                           handled=handled)  # fmt: skip


@pytest.mark.parametrize(("sample", "condition", "handled"), [
    ("cdk__destination_success_record.json", Condition.SUCCESS, False),
    ("cdk__destination_failure_record.json", Condition.RETRIES_EXHAUSTED, True),
    ("java__lambda_destination_event.json", Condition.RETRIES_EXHAUSTED, False),
])  # fmt: skip
def test_every_field_of_a_lambda_record_is_there_with_its_type_and_meaning(sample: str, condition: Condition,
                                                                            handled: bool) -> None:  # fmt: skip
    theirs, mine = lambda_record(sample), ours(condition, handled=handled)
    have = fields(mine)
    for path, kind in fields(theirs).items():
        if path == "responseContext.functionError" or (path, condition) == ("responsePayload", Condition.SUCCESS):
            continue  # below; and a success's payload is whatever the function returned
        assert have.get(path) is kind, f"{path}: {kind.__name__} in {sample}, {have.get(path)} here"
    assert mine["requestContext"]["condition"] == theirs["requestContext"]["condition"]
    assert mine["responseContext"]["statusCode"] == theirs["responseContext"]["statusCode"] == 200
    assert mine["responseContext"]["executedVersion"] == theirs["responseContext"]["executedVersion"] == "$LATEST"
    if condition is Condition.SUCCESS:
        assert "functionError" not in mine["responseContext"] and "functionError" not in theirs["responseContext"]
    else:  # Handled: the function returned its error; Unhandled: it raised (the Java sample's record omits it)
        assert mine["responseContext"]["functionError"] == ("Handled" if handled else "Unhandled")
        assert (
            theirs["responseContext"].get("functionError", mine["responseContext"]["functionError"])
            == (mine["responseContext"]["functionError"])
        )


def test_the_function_arn_splits_as_lambda_s_and_names_the_function_and_its_version() -> None:
    theirs = lambda_record("cdk__destination_success_record.json")["requestContext"]["functionArn"].split(":")
    mine = function_arn("prod", "embed", "4").split(":")
    assert len(mine) == len(theirs) == 8 and mine[0] == "arn" and mine[5] == theirs[5] == "function"
    assert mine[6:] == ["embed", "4"] and mine[4] == "prod"
    assert ours(Condition.SUCCESS)["requestContext"]["functionArn"].endswith(":function:event-destinations:$LATEST")


@pytest.mark.parametrize("condition", [Condition.EVENT_AGE_EXCEEDED, Condition.CANCELLED])
def test_an_event_no_handler_ran_has_no_status_code_nor_function_error(condition: Condition) -> None:
    context = ours(condition, started_at=None)["responseContext"]
    assert not {"statusCode", "functionError", "executedVersion"} & set(context)
    assert context["startedAt"] is None and context["finishedAt"]


def test_gpufleet_s_own_fields_stay_where_lambda_consumers_ignore_them() -> None:
    record = ours(Condition.TIMED_OUT)
    assert record["responseContext"]["functionError"] == "Unhandled"  # timed out: the invoke failed, as Lambda's
    assert {"worker", "gpu", "startedAt", "finishedAt", "durationMs"} <= set(record["responseContext"])
    assert record["requestContext"]["function"] == "event-destinations"
    assert record["requestContext"]["functionVersion"] == "$LATEST"


def test_a_function_declares_its_version_and_records_name_it() -> None:
    from gpufleet.errors import ConfigError
    from gpufleet.functions import Function

    def handler(event: Any, ctx: Any) -> None:
        return None

    assert Function("embed", handler).version == "$LATEST"
    assert Function("embed", handler, version="4.1-rc").version == "4.1-rc"
    for bad in ("4:1", "", "-4", "x" * 33):
        with pytest.raises(ConfigError, match="version"):
            Function("embed", handler, version=bad)
    record = callback_record(task_id="t", function="embed", condition=Condition.SUCCESS, attempts=1, event={},
                             worker="w", gpu="g", started_at=1.0, finished_at=2.0, response=None, fleet="prod",
                             version="4")  # fmt: skip
    assert record["requestContext"]["functionArn"] == "arn:gpufleet:gpufleet::prod:function:embed:4"
    assert record["requestContext"]["functionVersion"] == record["responseContext"]["executedVersion"] == "4"


def test_tails_line_shows_the_result_or_the_error_not_the_boilerplate() -> None:
    from gpufleet.cli.records import outcome_text

    ok = orjson.dumps(ours(Condition.SUCCESS))
    assert outcome_text(ok) == '2.50s  attempts=3  -> "done"'
    failed = orjson.dumps(ours(Condition.RETRIES_EXHAUSTED))
    assert outcome_text(failed) == "2.50s  attempts=3  Error: no"
    never_ran = orjson.dumps(ours(Condition.EVENT_AGE_EXCEEDED, started_at=None))
    assert "requestContext" not in outcome_text(never_ran)
    assert outcome_text(b"not json") == "not json" and outcome_text(b"[1]") == "[1]"


def test_a_stack_trace_names_files_from_their_package_never_where_the_worker_is_installed(tmp_path: Path) -> None:
    """Before: a failure record's stackTrace carried the worker's absolute install paths (its home, its venv)."""
    folder = tmp_path / "workers"
    folder.mkdir()
    (folder / "parse.py").write_text(
        "import json\n\ndef handler():\n    try:\n        json.loads('{')\n"
        "    except ValueError as exc:\n        raise RuntimeError('bad input') from exc\n"
    )
    module: Any = import_file(folder / "parse.py")
    with pytest.raises(RuntimeError) as caught:
        module.handler()
    trace = "".join(error_payload(caught.value)["stackTrace"])
    files = re.findall(r'File "([^"]+)"', trace)
    assert "workers/parse.py" in files and "json/decoder.py" in files, trace
    assert not [f for f in files if f.startswith("/") or str(tmp_path) in f or sys.prefix in f], files
    assert "json.decoder.JSONDecodeError" in trace and trace.rstrip().endswith("RuntimeError: bad input")
