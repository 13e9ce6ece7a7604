"""Every table file a device could use, in lookup order, good or bad: what `moetune show`
lists and `moetune export` exports. The lookup itself is loader.py's."""

from __future__ import annotations

from dataclasses import dataclass

from . import loader, table_paths
from .device import DeviceInfo
from .errors import TableError
from .tables import Table, parse_table_file_name, read_record


@dataclass(frozen=True)
class FoundTable:
    file: table_paths.TableFile
    record: Table | None  # None: the file is not a valid table
    error: str | None
    used: bool  # False: shadowed by an earlier source, another family, or invalid

    @property
    def table(self) -> dict | None:
        """The table's JSON form (tables.validate_table's), or None."""
        return None if self.record is None else self.record.to_json()


def find_tables(device: str | DeviceInfo | None = None) -> list[FoundTable]:
    """Every table file the loader could read for `device`, in lookup order, per shape.

    Bad files (a folder or unreadable file at a table's path included) are listed with
    their error instead of raising or warning.
    """
    target = loader.resolve_device(device, strict=False)
    names: set[str] = set()
    for root, _ in table_paths.table_roots():
        folders = table_paths.device_folders(root) if target.compute_capability is not None else [root / target.key]
        for folder in folders:
            names.update(path.name for path in folder.glob("*.json") if parse_table_file_name(path.name))
    found: list[FoundTable] = []
    for name in sorted(names, key=shape_order):
        used_one = False
        for candidate in table_paths.candidate_files(name, target):
            try:
                table, error = read_record(candidate.path), None
            except TableError as problem:
                table, error = None, str(problem)
            if table is not None and candidate.origin == table_paths.FROM_FAMILY and not loader.same_family(table, target):
                continue
            used = table is not None and not used_one
            used_one = used_one or used
            found.append(FoundTable(candidate, table, error, used))
    return found


def shape_order(name: str) -> tuple:
    key = parse_table_file_name(name)
    return (0, 0, 0, 0, name, ()) if key is None else (*key[:5], key.block_shape or ())  # per tensor first
