"""Scratch and uploads through a real TaskContext and pool-process bundle (S3 on moto): a symlink swapped in while a
download runs is never followed, the scratch tree is private to the worker's user, and upload names stay below the
task's prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gpufleet.config import Fleet
from gpufleet.dev.services import S3Service
from gpufleet.errors import PermanentTaskError, TaskError
from gpufleet.functions import Function
from gpufleet.worker.bundle import ProcessBundle
from tests.s3util import s3_client
from tests.unit.test_scratch import BODY, WORKER, context, make_bundle, mode


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, so that a directory made with the default mode would be 0755 and a file 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def bucket(moto: S3Service) -> str:
    name = f"scratch-{uuid.uuid4().hex[:12]}"
    with closing(s3_client(moto.url)) as s3:
        s3.create_bucket(Bucket=name)
        for key in ("victim.txt", "sub/victim.txt", "sub/file.bin"):
            s3.put_object(Bucket=name, Key=key, Body=BODY)
    return name


def on_get_object(bundle: ProcessBundle, action: Callable[[], None]) -> None:
    """Run ``action`` as the GET request is sent: after any check of the path, before the file is opened."""
    bundle.objects.client.meta.events.register("before-call.s3.GetObject", lambda **_: action())


def test_a_symlink_swapped_in_at_the_file_is_replaced_not_followed(tmp_path: Path, moto: S3Service,
                                                                   bucket: str) -> None:  # fmt: skip
    bundle = make_bundle(tmp_path, tmp_path / "root", moto)
    ctx = context(bundle, bucket)
    target = tmp_path / "outside.txt"
    target.write_text("not yours")

    def swap() -> None:
        (ctx.scratch / "in").mkdir(exist_ok=True)
        (ctx.scratch / "in" / "victim.txt").symlink_to(target)

    on_get_object(bundle, swap)
    path = ctx.download(f"s3://{bucket}/victim.txt")
    assert target.read_text() == "not yours"
    assert path == ctx.scratch / "in" / "victim.txt"
    assert not path.is_symlink() and path.read_bytes() == BODY
    ctx.close()


@pytest.mark.parametrize("link", ["in", "in/sub"])
def test_a_symlinked_directory_swapped_in_is_refused(tmp_path: Path, moto: S3Service, bucket: str, link: str) -> None:
    bundle = make_bundle(tmp_path, tmp_path / "root", moto)
    ctx = context(bundle, bucket)
    outside = tmp_path / "outside"
    outside.mkdir()

    def swap() -> None:
        planted = ctx.scratch / link
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.symlink_to(outside, target_is_directory=True)

    on_get_object(bundle, swap)
    with pytest.raises(TaskError, match="never followed"):
        ctx.download(f"s3://{bucket}/sub/victim.txt")
    assert list(outside.rglob("*")) == []
    scratch = ctx.scratch
    ctx.close()
    assert not scratch.exists() and outside.is_dir()  # removing the scratch directory removed only the link


def test_directories_are_0700_and_downloads_0600(tmp_path: Path, moto: S3Service, bucket: str,
                                                 umask_022: None) -> None:  # fmt: skip
    root = tmp_path / "missing" / "root"
    bundle = make_bundle(tmp_path, root, moto)
    ctx = context(bundle, bucket)
    path = ctx.download(f"s3://{bucket}/sub/file.bin")
    assert path.read_bytes() == BODY
    for directory in (root, root / WORKER, ctx.scratch, ctx.scratch / "in", ctx.scratch / "in" / "sub"):
        assert mode(directory) == 0o700, directory
    assert mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no partial file left beside it
    scratch = ctx.scratch
    ctx.close()
    assert not scratch.exists()


@pytest.mark.parametrize(
    "name",
    ["../../escape.txt", "a/../b", "/abs", "x\x00y", "a//b", "./x", "dir/", "tab\there", "n" * 1100, "é" * 600],
)
def test_an_upload_name_that_is_not_a_relative_key_is_refused(tmp_path: Path, moto: S3Service, bucket: str,
                                                              name: str) -> None:  # fmt: skip
    ctx = context(make_bundle(tmp_path, tmp_path / "root", moto), bucket)
    (ctx.scratch / "report.json").write_text("{}")
    with pytest.raises(PermanentTaskError, match="relative key") as refused:
        ctx.upload(ctx.scratch / "report.json", name=name)
    assert refused.value.error_type == "InvalidOutputName"
    assert ctx.outputs == []
    with closing(s3_client(moto.url)) as s3:
        assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out/")
    ctx.close()


def test_a_nested_upload_name_works(tmp_path: Path, moto: S3Service, bucket: str) -> None:
    ctx = context(make_bundle(tmp_path, tmp_path / "root", moto), bucket)
    (ctx.scratch / "report.json").write_text('{"ok": true}')
    uri = ctx.upload(ctx.scratch / "report.json", name="sub/dir/file.txt")
    assert uri == f"s3://{bucket}/out/t-1/sub/dir/file.txt" and ctx.outputs == [uri]
    with closing(s3_client(moto.url)) as s3:
        got: dict[str, Any] = s3.get_object(Bucket=bucket, Key="out/t-1/sub/dir/file.txt")
        assert got["Body"].read() == b'{"ok": true}'
    ctx.close()


@pytest.mark.parametrize("prefix", ["../private", "out/../../private", "a/./b", "a//b", "x\x00y"])
def test_an_output_prefix_that_climbs_or_hides_is_refused(tmp_path: Path, moto: S3Service, bucket: str,
                                                          prefix: str) -> None:  # fmt: skip
    """Before: ``ctx.upload(to="s3://outbucket/../privatebucket")`` was accepted, and some servers resolve ``..``."""
    ctx = context(make_bundle(tmp_path, tmp_path / "root", moto), bucket)
    (ctx.scratch / "r.json").write_text("{}")
    with pytest.raises(PermanentTaskError, match="the prefix") as refused:
        ctx.upload(ctx.scratch / "r.json", to=f"s3://{bucket}/{prefix}")
    assert refused.value.error_type == "InvalidOutputName" and ctx.outputs == []
    ctx.close()


def test_a_function_that_names_its_output_buckets_writes_nowhere_else(tmp_path: Path, moto: S3Service,
                                                                      bucket: str) -> None:  # fmt: skip
    """``workers/enhance.py`` takes its output location from the event: with ``output_buckets`` an event cannot send
    it to another bucket the fleet's key can write."""
    bundle = make_bundle(tmp_path, tmp_path / "root", moto)
    fn = Function("fn", lambda event, ctx: None, output_buckets=(bucket,))
    bundle.fleet = Fleet(settings=bundle.fleet.settings, functions={"fn": fn}, triggers={},
                          config_file=bundle.fleet.config_file)  # fmt: skip
    ctx = context(bundle, bucket)
    (ctx.scratch / "r.json").write_text("{}")
    with pytest.raises(PermanentTaskError, match=rf"may write to \['{bucket}'\] only") as refused:
        ctx.upload(ctx.scratch / "r.json", to="s3://privatebucket/loot")
    assert refused.value.error_type == "OutputNotAllowed"
    assert ctx.upload(ctx.scratch / "r.json", to=f"s3://{bucket}/fine") == f"s3://{bucket}/fine/t-1/r.json"
    ctx.close()


@pytest.mark.parametrize(("start", "end"), [(-5, None), (1.5, None), ("0-1,5", None), (None, -1), (True, 4), (4, 4),
                                            (5, 2), (0, "9")])  # fmt: skip
def test_a_bad_range_is_refused_before_anything_is_read(tmp_path: Path, moto: S3Service, bucket: str, start: Any,
                                                        end: Any) -> None:  # fmt: skip
    """Before: one bad bound (``start=-5``, ``1.5``, ``"0-1,5"``) made a Range header S3 ignores: the whole object
    was read into memory."""
    ctx = context(make_bundle(tmp_path, tmp_path / "root", moto), bucket)
    with pytest.raises(PermanentTaskError, match="use whole numbers") as refused:
        ctx.read(f"s3://{bucket}/victim.txt", start, end)
    assert refused.value.error_type == "InvalidRange"
    ctx.close()


def test_a_read_holds_at_most_max_read_bytes(tmp_path: Path, moto: S3Service, bucket: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr("gpufleet.worker.context.MAX_READ_BYTES", 8)
    ctx = context(make_bundle(tmp_path, tmp_path / "root", moto), bucket)
    uri = f"s3://{bucket}/victim.txt"  # 13 bytes
    assert ctx.read(uri, 2, 10) == BODY[2:10] and ctx.read(uri, 5) == BODY[5:]
    for start, end in ((None, None), (0, 9), (4, None)):
        with pytest.raises(PermanentTaskError, match="more than 8 bytes") as refused:
            ctx.read(uri, start, end)
        assert refused.value.error_type == "ReadTooLarge"
    ctx.close()
