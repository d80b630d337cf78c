"""The lock (``requirements/``) agrees with ``pyproject.toml``'s ranges, and ``make``'s virtualenv holds what it pins.

``make lock`` rewrites the lock; these tests fail when someone edits one side and not the other.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[2]
LOCKS = ROOT / "requirements"
# Each lock, and the extras of pyproject.toml it must satisfy (build-system.requires and the runtime always).
SETS = {"demo.txt": ("local", "torch"), "dev.txt": ("local", "torch", "dev")}
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)")


def pins(path: Path) -> dict[str, Version]:
    found = {}
    for line in path.read_text().splitlines():
        if m := _PIN.match(line):
            found[canonicalize_name(m[1])] = Version(m[2])
    return found


def requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    texts = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    for extra in extras:
        texts += project["project"]["optional-dependencies"][extra]
    reqs = [Requirement(t) for t in texts]
    return [r for r in reqs if canonicalize_name(r.name) != "gpufleet"]  # dev's "gpufleet[local]": listed itself


def torch_pin() -> Version:
    (req,) = [Requirement(line) for line in (LOCKS / "torch.txt").read_text().split() if line]
    (spec,) = req.specifier
    return Version(spec.version)


@pytest.mark.parametrize("lock", sorted(SETS))
def test_lock_pins_every_requirement_within_its_range(lock: str) -> None:
    locked = pins(LOCKS / lock)
    disagree = []
    for req in requirements(SETS[lock]):
        name = canonicalize_name(req.name)
        version = torch_pin() if name == "torch" else locked.get(name)
        if version is None:
            disagree.append(f"{req}: not in requirements/{lock}")
        elif not req.specifier.contains(version, prereleases=True):
            disagree.append(f"{req}: requirements/{lock} pins {version}")
    assert not disagree, "pyproject.toml and the lock disagree (run `make lock`):\n" + "\n".join(disagree)


def test_torch_is_out_of_the_lock_and_pinned_alone() -> None:
    """torch's CPU build comes from PyTorch's index, the rest from PyPI: the Makefile installs it on its own."""
    for lock in SETS:
        assert "torch" not in pins(LOCKS / lock)
    assert torch_pin() == Version("2.13.0")


def test_demo_lock_is_the_dev_lock_without_the_test_tools() -> None:
    demo, dev = pins(LOCKS / "demo.txt"), pins(LOCKS / "dev.txt")
    assert {name: v for name, v in demo.items() if dev.get(name) != v} == {}
    assert {"pytest", "playwright", "mypy", "ruff", "schemathesis"}.isdisjoint(demo)


@pytest.mark.parametrize("lock", sorted(SETS))
def test_every_pin_has_hashes(lock: str) -> None:
    text = (LOCKS / lock).read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    unhashed = [b.split()[0] for b in blocks if _PIN.match(b) and "--hash=sha256:" not in b]
    assert unhashed == []


def test_make_installed_exactly_the_locked_versions() -> None:
    """In the virtualenv ``make test`` built, every locked package is installed at its locked version."""
    if not (Path(sys.prefix) / ".dev").exists():
        pytest.skip("not the virtualenv that `make test` installs")
    wrong = {}
    for name, version in pins(LOCKS / "dev.txt").items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (str(version), str(installed))
    assert wrong == {}
    assert Version(metadata.version("torch")).public == str(torch_pin())
