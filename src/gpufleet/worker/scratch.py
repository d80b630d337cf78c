"""Scratch directories that no other user and no symlink can redirect.

Layout: ``<root>/<worker>/<task id>-<attempt>/``. The root is the ``worker.scratch_dir`` setting, or
``<system temp>/gpufleet-scratch-<uid>``: a name other users can guess, so it is trusted only once it is checked to be
a real directory (not a symlink) owned by this process's user; it is then set to mode 0700. Every directory below it
is created 0700 and downloaded files 0600.

Below the root nothing is reached by path: each component is opened relative to its parent's file descriptor with
``O_NOFOLLOW``, so a symlink swapped in at any component, at any moment, is refused rather than followed. A file is
written under a temporary name opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and renamed over the final name, which
replaces (never follows) whatever was there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import structlog

from gpufleet.errors import ConfigError, TaskError

log = structlog.get_logger("gpufleet.worker")
DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FIX = "remove it, or set worker.scratch_dir to a directory that this user owns"


def default_root() -> Path:
    """``<system temp>/gpufleet-scratch-<uid>``: one per user, since a root owned by another user is refused."""
    return Path(tempfile.gettempdir()) / f"gpufleet-scratch-{os.geteuid()}"


def open_root(root: Path) -> int:
    """Create ``root`` (0700) if it is missing and return a descriptor of it; the caller closes it.

    Raises:
        ConfigError: ``root`` is a symlink, not a directory, owned by another user, or cannot be created.
    """
    try:
        root.parent.mkdir(parents=True, exist_ok=True)  # the parents are the operator's choice, or the system temp
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, DIR_MODE)
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:  # a symlink (ELOOP or ENOTDIR with O_DIRECTORY), a file, or not ours to create
        problem = "is a symlink, which is refused" if root.is_symlink() else f"cannot be used: {exc.strerror}"
        raise ConfigError(f"scratch directory {root} {problem}", key="worker.scratch_dir", fix=_FIX) from None
    try:
        _make_private(fd, root)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_private(fd: int, path: Path | str) -> None:
    """Refuse a directory another user owns; tighten one of ours to 0700. Checked on the descriptor, so the
    directory checked is the one that will be used."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"scratch directory {path} is owned by uid {st.st_uid}, not by this worker's uid "
            f"{os.geteuid()}; another user could read or replace task files in it",
            key="worker.scratch_dir",
            fix=_FIX,
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode != DIR_MODE:
        if mode & 0o077:
            log.warning(
                "scratch directory was accessible to other users; set to mode 0700", path=str(path), mode=oct(mode)
            )
        os.fchmod(fd, DIR_MODE)


def _check_name(name: str) -> str:
    # One component only: a "/" would make the kernel walk (and follow) the directories it names.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise TaskError(f"{name!r} cannot name a scratch directory")
    return name


def _open_subdir(parent_fd: int, name: str) -> int:
    """Create ``name`` (0700) below ``parent_fd`` unless it exists, and open it without following a symlink."""
    created = True
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    except FileExistsError:
        created = False
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    if created:
        os.fchmod(fd, DIR_MODE)  # whatever the umask: the user's own access, nobody else's
    return fd


class ScratchDir:
    """One attempt's directory, ``<root>/<worker>/<name>``, held open by descriptor until :meth:`remove`.

    Raises:
        ConfigError: the root or the worker's directory is not a private directory of this user.
    """

    def __init__(self, root: Path, worker: str, name: str) -> None:
        self.path = root / _check_name(worker) / _check_name(name)
        self._name = name
        root_fd = open_root(root)
        try:
            self._worker_fd = _open_subdir(root_fd, worker)
        except OSError as exc:  # ELOOP or ENOTDIR: a symlink or a file where the worker's directory goes
            raise TaskError(f"cannot create {root / worker}: {exc.strerror}") from None
        finally:
            os.close(root_fd)
        try:
            _make_private(self._worker_fd, root / worker)
            shutil.rmtree(name, dir_fd=self._worker_fd, ignore_errors=True)  # left over by a killed attempt
            self._fd = _open_subdir(self._worker_fd, name)
        except OSError as exc:
            os.close(self._worker_fd)
            raise TaskError(f"cannot create {self.path}: {exc.strerror}") from None
        except BaseException:
            os.close(self._worker_fd)
            raise

    @contextlib.contextmanager
    def create(self, parts: Sequence[str]) -> Iterator[BinaryIO]:
        """Write the file ``path/<parts...>`` (mode 0600): it appears, whole, when the block ends without error.

        Missing directories are created 0700. ``parts`` must be plain names (see ``objects.key_parts``).

        Raises:
            TaskError: a component is a symlink or not a directory, or the file cannot be created.
        """
        *dirs, name = (_check_name(p) for p in parts)
        target = self.path.joinpath(*parts)
        fds: list[int] = []
        fd = self._fd
        tmp = f".part-{uuid.uuid4().hex}"  # not derived from the name, which may already be NAME_MAX long
        try:
            for depth, part in enumerate(dirs, 1):
                try:
                    fd = _open_subdir(fd, part)
                except OSError as exc:
                    where = self.path.joinpath(*dirs[:depth])
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise TaskError(
                            f"cannot write {target}: {where} is a symlink or not a directory (a symlink "
                            "in the scratch directory is never followed)"
                        ) from None
                    raise TaskError(f"cannot write {target}: {where}: {exc.strerror}") from None
                fds.append(fd)
            try:
                out = os.fdopen(os.open(tmp, _NEW_FILE_FLAGS, FILE_MODE, dir_fd=fd), "wb")
            except OSError as exc:
                raise TaskError(f"cannot write {target}: {exc.strerror}") from None
            try:
                with out:
                    yield out
                try:  # rename() replaces the final name itself (a symlink, say), never what it points to
                    os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                except OSError as exc:  # e.g. a directory has that name
                    raise TaskError(f"cannot write {target}: {exc.strerror}") from None
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise
        finally:
            for opened in fds:
                os.close(opened)

    def remove(self) -> None:
        """Delete the directory and everything in it (symlinks inside are removed, never followed)."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        shutil.rmtree(self._name, dir_fd=self._worker_fd, ignore_errors=True)
        os.close(self._worker_fd)
