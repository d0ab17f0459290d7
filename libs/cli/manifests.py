"""Which manifests ``-f`` names, as kubectl finds them: a file, ``-`` for stdin, or a folder.

Which I/O it owns: looking at the paths (stat, folder listings) and reading the files' text. A folder stands for
its ``*.yaml``, ``*.yml`` and ``*.json`` files in name order; its subfolders only with ``recursive`` (``-R``),
walked in name order too, each where it sorts among the files (kubectl's ``filepath.Walk``). Symbolic links to
folders are not followed when walking: a link back up would never end. A path that does not exist, or a folder
without a manifest, is an error before anything is read, so a mistyped path applies nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

STDIN = "-"
# The most a manifest file may hold: far above any set of documents NATS would carry (1 MiB each), and a bound on
# what `-f /dev/zero` or a wrong huge file reads into memory before it is refused.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# kubectl's FileExtensions: the files a folder is read for.
EXTENSIONS = (".yaml", ".yml", ".json")


class ManifestPathError(ValueError):
    """A path names nothing to read; the message says which and why."""


@dataclass(frozen=True)
class ManifestSource:
    """One manifest to read; ``name`` is how messages call it (the path, or ``<stdin>``)."""

    name: str
    path: Path | None  # None: stdin

    def read(self) -> str:
        """The text (UTF-8, at most ``MAX_MANIFEST_BYTES``); UnicodeDecodeError and OSError (one for a manifest
        larger than that) are the caller's to report."""
        if self.path is None:
            with click.open_file(STDIN, "rb") as stdin:  # click's stdin: not closed
                data = stdin.read(MAX_MANIFEST_BYTES + 1)
        else:
            with self.path.open("rb") as file:
                data = file.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise OSError(errno.EFBIG, f"larger than the {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB a manifest may "
                                       f"have (a device such as /dev/zero, or not a manifest?)")
        return data.decode("utf-8")


def manifest_sources(paths: Sequence[str], recursive: bool) -> list[ManifestSource]:
    """The manifests ``paths`` name, in the order given (a folder's in name order)."""
    sources: list[ManifestSource] = []
    for given in paths:
        if given == STDIN:
            sources.append(ManifestSource("<stdin>", None))
            continue
        path = Path(given)
        if path.is_dir():
            found = _folder(path, recursive)
            if not found:
                where = "in the folder or its subfolders" if recursive else "directly in the folder"
                hint = "" if recursive or not any(child.is_dir() for child in path.iterdir()) else \
                    " (-R reads its subfolders too)"
                raise ManifestPathError(f'no manifests ({", ".join("*" + e for e in EXTENSIONS)}) {where} '
                                        f'"{given}"{hint}')
            sources += [ManifestSource(str(file), file) for file in found]
        elif path.exists():
            sources.append(ManifestSource(given, path))
        else:
            raise ManifestPathError(f'the path "{given}" does not exist')
    return sources


def _folder(folder: Path, recursive: bool) -> list[Path]:
    try:
        children = sorted(folder.iterdir(), key=lambda child: child.name)
    except OSError as err:
        raise ManifestPathError(f'cannot list the folder "{folder}": {err.strerror or err}') from err
    found: list[Path] = []
    for child in children:
        if child.is_dir():
            if recursive and not child.is_symlink():
                found += _folder(child, recursive)
        elif child.suffix in EXTENSIONS:  # as kubectl: case counts
            found.append(child)
    return found
