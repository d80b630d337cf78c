"""``gpufleet init [DIR]``: a starter project to edit, a commented fleet file, one trigger and one function."""

from __future__ import annotations

import argparse
import shlex
from importlib.resources import files
from pathlib import Path

from gpufleet.errors import ConfigError

# Where each starter file goes, from the package's ``starter/`` folder: the layout `gpufleet run` reads by default.
LAYOUT = {"config/fleet.yaml": "fleet.yaml", "triggers/requests.yaml": "requests.yaml", "workers/hello.py": "hello.py"}


def init_project(root: Path) -> list[Path]:
    """Write the starter files under ``root`` and return their paths.

    Raises:
        ConfigError: one of them exists already (nothing is written then: a project is never half overwritten).
    """
    targets = {root / where: name for where, name in LAYOUT.items()}
    existing = [str(path) for path in targets if path.exists()]
    if existing:
        raise ConfigError(
            f"already there: {', '.join(existing)}; nothing was written",
            fix="`gpufleet init DIR` for a new folder, or move those files away",
        )
    starter = files("gpufleet").joinpath("starter")
    for path, name in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(starter.joinpath(name).read_text())
    return list(targets)


def cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    for path in init_project(root):
        print(f"wrote {path}")
    cd = f"  cd {shlex.quote(str(root))}\n" if root != Path() else ""
    print(
        "next:\n"
        f"{cd}"
        "  eval \"$(gpufleet dev up)\"     # local Redis, Kafka and S3 (pip install 'gpufleet[local]')\n"
        "  gpufleet check                # what the fleet will serve\n"
        "  gpufleet run                  # every role on this machine; Ctrl-C stops it\n"
        '  gpufleet invoke hello --payload \'{"name": "Ada"}\' --wait      # from another terminal\n'
        "  gpufleet tail                 # the records, as they land"
    )
    return 0
