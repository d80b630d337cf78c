"""Scratch and uploads through a real TaskContext and pool-process bundle (S3 on moto): a symlink swapped in while a
download runs is never followed, the scratch tree is private to the worker's user, and upload names stay below the
task's prefix."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from gpufleet.config import Fleet
from gpufleet.dev.services import S3Service
from gpufleet.errors import ConfigError
from gpufleet.settings import FleetSettings, S3Settings, WorkerSettings
from gpufleet.worker.bundle import ProcessBundle
from gpufleet.worker.context import TaskContext

WORKER = "vgpu0@test"

BODY = b"object bytes\n"


def make_bundle(tmp_path: Path, root: Path | None, s3: S3Service | None = None) -> ProcessBundle:
    s3_settings = S3Settings()
    if s3 is not None:
        s3_settings = S3Settings(endpoint_url=s3.url, access_key_id=s3.access_key, secret_access_key=s3.secret_key,
                                 addressing_style="path")  # fmt: skip
    settings = FleetSettings(s3=s3_settings, worker=WorkerSettings(scratch_dir=root))
    fleet = Fleet(settings=settings, functions={}, triggers={}, config_file=tmp_path / "gpufleet.yaml")
    return ProcessBundle(fleet, worker_name=WORKER, gpu="vgpu0:virtual")


def context(bundle: ProcessBundle, bucket: str = "b") -> TaskContext:
    return TaskContext(bundle, "t-1", "fn", 1, None, {"output": f"s3://{bucket}/out"})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_default_root_is_per_user(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, None)
    assert bundle.scratch_root == Path(tempfile.gettempdir()) / f"gpufleet-scratch-{os.geteuid()}"


def test_a_root_of_ours_with_a_loose_mode_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o777)
    ctx = context(make_bundle(tmp_path, root))
    assert ctx.scratch.is_dir()
    assert mode(root) == 0o700
    ctx.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    os.chown(root, 12345, 12345)
    bundle = make_bundle(tmp_path, root)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        context(bundle).scratch  # noqa: B018 - creating the directory is what is refused
    with pytest.raises(ConfigError, match="owned by uid 12345") as refused:
        bundle.check_scratch()  # what a worker process runs when it starts
    message = str(refused.value)
    assert str(root) in message and "worker.scratch_dir" in message and "fix:" in message
    assert list(root.iterdir()) == []


def test_a_symlinked_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    root = tmp_path / "root"
    root.symlink_to(real, target_is_directory=True)
    with pytest.raises(ConfigError, match="symlink") as refused:
        context(make_bundle(tmp_path, root)).scratch  # noqa: B018 - creating the directory is what is refused
    assert str(root) in str(refused.value) and "fix:" in str(refused.value)
    assert list(real.iterdir()) == []
