"""How object keys become paths in a dataset's tree: the one rule the sync (which writes the manifest) and the
agent (which builds the tree from it) both apply. Pure.

A mount appears at a '/'-rooted folder of the dataset (its *root*); an object with key ``k`` (relative to the
mount's prefix) appears at ``<root>/<k>``, split into names at every '/'. Object stores allow keys no POSIX tree
can hold, so some objects are left out, never renamed or normalised (a normalised key could land on another
object's path):
- a key with an empty name (``a//b``, or a leading '/': ``/etc/x``, which would otherwise leave its mount), or a
  name ``.`` or ``..``;
- a key with a NUL byte, or a name longer than 255 bytes (``NAME_MAX``) in UTF-8, or one that is not UTF-8;
- an empty key;
- a file whose path is also a folder (``x`` next to ``x/y``, or next to the marker ``x/``): the folder wins, as
  it holds everything below it.
A key ending in '/' is a folder marker (what consoles write for "create folder"): it makes that folder exist,
empty if nothing is below it; it is not a file, and bytes it holds are not shown.

Every key that is left out is reported with its reason (``Skipped``): the dataset's status carries the count
and a few examples, and the sync logs them. docs/semantics.md describes the rules for users.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

# Linux's NAME_MAX: the longest name a path component may have, in bytes.
MAX_NAME_BYTES = 255
# How many skipped keys a report keeps as examples: enough to see the pattern, small enough for a status.
EXAMPLES = 5
# Examples are cut to this many characters: a key may be 1 KiB long.
EXAMPLE_CHARS = 120

SHADOWED = "a folder of the same name exists"
DUPLICATE = "another object already has this path"


def quoted_key(key: str) -> str:
    """How every message (an error, a status, a report) names an object key: as a Python string literal. A key may
    hold spaces, quotes, line breaks, escape sequences or undecodable bytes (kept as surrogates); quoted so, it is
    one unambiguous token whose odd characters are shown escaped, never acted on by a terminal nor read as the end
    of the message."""
    return repr(key)


def _name_problem(name: str) -> str | None:
    if name == "":
        return "has an empty name ('//' or a leading '/')"
    if name in (".", ".."):
        return f"has a name {name!r}"
    try:
        # Strict: a name of non-UTF-8 bytes arrives from os.scandir with surrogate escapes, which no manifest
        # (JSON) and no FUSE reply can carry; "surrogateescape" would have let it through to fail the sync.
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"has a name of {size} bytes (the limit is {MAX_NAME_BYTES})"
    return None


def relative_problem(relative: str) -> str | None:
    """Why the '/'-separated ``relative`` path (a key, or a mount's path without its leading '/') cannot be in the
    tree, or None when it can. A trailing '/' (a folder marker) is allowed."""
    if "\0" in relative:
        return "contains a NUL byte"
    if relative.startswith("/"):
        return "starts with '/' (it would leave its mount)"
    body = relative[:-1] if relative.endswith("/") else relative
    for name in body.split("/"):
        problem = _name_problem(name)
        if problem is not None:
            return problem
    return None


def key_problem(key: str) -> str | None:
    """Why the object ``key`` cannot appear in the tree, or None when it can (see the module's rules)."""
    if key == "":
        return "is empty"
    return relative_problem(key)


def target_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a DataLoad's or DataClean's target (a path in the dataset, as the mount shows it:
    '/', '/train', '/train/a.jpg', '/train/'), or None when it can. The manifest's paths are plain (the rules
    above), so a '.', '..' or empty name ('//'), a NUL, a name over 255 bytes or one that is not UTF-8 names nothing:
    said at apply, and by the CLI before it sends, rather than "not in the manifest" once a run is planned (at every
    firing of a Cron load)."""
    if not path.startswith("/"):
        return "must start with '/' (a path in the dataset, e.g. /train)"
    if path == "/":
        return None
    body = path[1:]
    names = (body[:-1] if body.endswith("/") else body).split("/")
    if any(name in (".", "..") for name in names):
        return ("must not hold '.' or '..' segments; write the path itself (e.g. /train/a, not /train/./a or "
                "/val/../train/a)")
    if "" in names:
        return "must not hold an empty segment ('//'); write the path itself (e.g. /train/a, not /train//a)"
    # A NUL, a name over NAME_MAX or one that is not UTF-8 (a shell's $'\xff', a name copied from a host folder):
    # no manifest path has one, and a name that is not UTF-8 cannot even be sent (JSON carries no such text).
    problem = relative_problem(body)
    if problem is not None:
        return f"{problem}: no file or folder of a dataset has such a path (objects named so are left out)"
    return None


def selects(target: str, path: str) -> bool:
    """Whether a target path (a DataLoad's or DataClean's ``target[].path``, a scheduler's path hint) selects the
    manifest path ``path``: the path itself and everything below it, a trailing '/' or not; '/' selects everything.
    """
    base = target.rstrip("/")
    return not base or path == base or path.startswith(base + "/")


def selected_spans(sorted_paths: Sequence[str], target: str) -> tuple[range, range]:
    """Where in ``sorted_paths`` the paths ``target`` selects (``selects``) are: the path itself, and what is below
    it. Two binary searches, not a scan: every path below ``base/`` sorts in [base/, base0), '0' being the character
    after '/'."""
    base = target.rstrip("/")
    if not base:
        return range(len(sorted_paths)), range(0)
    return (range(bisect.bisect_left(sorted_paths, base), bisect.bisect_right(sorted_paths, base)),
            range(bisect.bisect_left(sorted_paths, base + "/"), bisect.bisect_left(sorted_paths, base + "0")))


def is_folder(path: str) -> bool:
    """Whether a manifest path (or key) is a folder marker rather than a file."""
    return path.endswith("/")


def dataset_path(root: str, key: str) -> str:
    """Where ``key`` of the mount at ``root`` ('/' or '/a/b') appears; a folder marker keeps its trailing '/'.

    Never leaves ``root``: a key ``key_problem`` refuses is an error here, not a path somewhere else.
    """
    problem = key_problem(key)
    if problem is not None:
        raise ValueError(f"key {quoted_key(key)} {problem}")
    return path_prefix(root) + key


def path_prefix(root: str) -> str:
    """What the path of every object of the mount at ``root`` starts with: ``dataset_path`` is this and the key. A
    caller that has checked the key with ``key_problem`` already (the sync, for every object it lists) joins them
    itself, instead of checking each key a second time."""
    return root.rstrip("/") + "/"


@dataclass
class Skipped:
    """Objects left out of the tree: how many, and a few examples of which and why."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, key: str, reason: str, mount: int = 0) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            shown = quoted_key(key)
            if len(shown) > EXAMPLE_CHARS:
                shown = shown[: EXAMPLE_CHARS - 1] + "…"
            self.examples.append(f"{shown} (mount {mount}): {reason}")


@dataclass
class Folders:
    """The set of folder paths of a tree, for the one rule that needs the whole listing: a folder shadows a file
    of the same path. Fed every usable path first, then asked about each; the listing may come in any order
    (SeaweedFS does not list in S3's key order). Memory grows with the number of folders, not of files.

    ``may_shadow`` says, once every path is noted, whether any file may be shadowed at all: False lets the caller
    skip asking about each path, a second pass over a listing of millions. It is exact for paths noted in order
    (S3 lists keys so, and a mount's root is the same before each): all the paths that start with a file's path
    then come right after it, so the files that are a prefix of the path being noted (a short stack) are the only
    ones a folder made now can shadow. Paths out of order (another store, mounts whose roots are not in order) make
    it True: the caller then asks about each."""

    paths: set[str] = field(default_factory=set)
    _shadowing: bool = False
    _in_order: bool = True
    _last: str = ""
    # In order: the files noted whose path is a prefix of the last path noted, each a prefix of the next.
    _open: list[str] = field(default_factory=list)

    @property
    def may_shadow(self) -> bool:
        return self._shadowing or not self._in_order

    def note(self, path: str) -> None:
        """Record the folders ``path`` needs: '/a/b/c' needs '/a' and '/a/b'; the marker '/a/b/' also '/a/b'."""
        if self._in_order:
            if path <= self._last:
                self._in_order = False
                self._open.clear()
            self._last = path
            while self._open and not path.startswith(self._open[-1]):
                self._open.pop()
        if is_folder(path):
            folder = path[:-1]
        else:
            folder = path.rsplit("/", 1)[0]
            if path in self.paths:  # its folder came first
                self._shadowing = True
            elif self._in_order:
                self._open.append(path)
        while folder and folder not in self.paths:  # a folder already known brings its parents with it
            self.paths.add(folder)
            if self._open and folder in self._open:  # a file noted before it
                self._shadowing = True
            folder = folder.rsplit("/", 1)[0]

    def shadows(self, path: str) -> bool:
        """Whether ``path`` is a file that a folder of the same path hides."""
        return not is_folder(path) and path in self.paths
