"""Where tuned tables are looked for: the folders in lookup order, and the files in them that
could serve one table name on one device (loader.py reads and picks among them)."""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

from .device import DeviceInfo

ENV_CONFIG_DIR = "MOETUNE_CONFIG_DIR"

# Origins of a table, in lookup order.
FROM_ENV = ENV_CONFIG_DIR
FROM_PACKAGE = "packaged"
FROM_FAMILY = "same family"


def _packaged_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("moetune.tuned_configs")))
    except ModuleNotFoundError:
        # A source checkout used without installing: the folder sits beside the package.
        return Path(__file__).resolve().parent.parent / "tuned_configs"


PACKAGED_DIR: Path = _packaged_dir()


@dataclass(frozen=True)
class TableFile:
    """A table file that may serve a device, and why it is a candidate."""

    path: Path
    origin: str  # FROM_ENV | FROM_PACKAGE | FROM_FAMILY
    device_key: str  # the folder it sits in


def config_dirs() -> list[Path]:
    """The folders named by MOETUNE_CONFIG_DIR, in order."""
    value = os.environ.get(ENV_CONFIG_DIR, "")
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def table_roots() -> list[tuple[Path, str]]:
    """The folders tables are looked up in, in order, each with its origin."""
    return [(folder, FROM_ENV) for folder in config_dirs()] + [(Path(PACKAGED_DIR), FROM_PACKAGE)]


def device_folders(root: Path) -> list[Path]:
    """The device folders under a root (each named by a device key)."""
    try:
        return sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(("_", ".")))
    except OSError:
        return []


def device_keys_with_tables() -> list[str]:
    """Keys of the devices that have a folder of tables in MOETUNE_CONFIG_DIR or the package."""
    return sorted({folder.name for root, _ in table_roots() for folder in device_folders(root)})


def _present(path: Path) -> bool:
    """Whether anything stands at `path`: a file, a folder, a broken link. What is there but
    cannot be read is reported when it is read, like any bad table."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def candidate_files(file_name: str, device: DeviceInfo) -> list[TableFile]:
    """Everything at a path that could serve one table name on `device`, in lookup order.

    Same-family candidates are listed by folder; whether their compute capability matches
    is known only once the table is read.
    """
    roots = table_roots()
    exact = [TableFile(root / device.key / file_name, origin, device.key) for root, origin in roots]
    family = []
    if device.compute_capability is not None:
        for root, _ in roots:
            for folder in device_folders(root):
                if folder.name != device.key:
                    family.append(TableFile(folder / file_name, FROM_FAMILY, folder.name))
    return [candidate for candidate in exact + family if _present(candidate.path)]
