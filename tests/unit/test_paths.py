"""The key → path rules (libs.paths) and the agent's tree built by them: one rule per case, keys never leave their
mount, the folder-shadows-file rule does not depend on listing order, and what is left out is reported."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs import paths
from libs.events.dataset import ManifestEntry
from services.agent.namespace import ROOT_INODE, InodeAllocator, Namespace


def entry(path: str, size: int = 10, mount: int = 0) -> ManifestEntry:
    return ManifestEntry(path=path, mount=mount, key=path.lstrip("/"), size=size, etag="e1", mtime=1.0)


@pytest.mark.parametrize("key", ["a", "a/b/c.jpg", "a b/ü.txt", ".hidden", "a/..b", "x" * 255, "é" * 127,
                                 "folder/", "a/b/", "line\nfeed", "  "])
def test_usable_keys(key: str) -> None:
    assert paths.key_problem(key) is None


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "is empty"),
        ("/etc/passwd", "starts with '/'"),
        ("a//b", "empty name"),
        ("a/", None),
        ("a//", "empty name"),
        ("./a", "name '.'"),
        ("a/./b", "name '.'"),
        ("a/../b", "name '..'"),
        ("..", "name '..'"),
        ("a/nul\0byte", "NUL byte"),
        ("x" * 256, "256 bytes"),
        ("d/" + "é" * 128, "256 bytes"),
        ("bad/\ud800", "not valid UTF-8"),
    ],
)
def test_each_unusable_key_has_its_reason(key: str, problem: str | None) -> None:
    found = paths.key_problem(key)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


roots = st.sampled_from(["/", "/a", "/a/b", "/data"])
keys = st.text(alphabet=st.sampled_from(["a", "b", "/", ".", "\0", "é"]), max_size=12)


@given(roots, keys)
def test_a_usable_key_never_leaves_its_mount(root: str, key: str) -> None:
    if paths.key_problem(key) is not None:
        with pytest.raises(ValueError):
            paths.dataset_path(root, key)
        return
    path = paths.dataset_path(root, key)
    inside = root.rstrip("/") + "/"
    assert path.startswith(inside)
    # Already normal: no '.', '..' or '//' the kernel or a join could resolve to somewhere else.
    assert posixpath.normpath(path) == path.rstrip("/")


def test_leading_slash_and_double_slash_keys_are_refused_not_joined() -> None:
    # posixpath.join("/a", "/b/f") is "/b/f": another mount's file.
    with pytest.raises(ValueError):
        paths.dataset_path("/a", "/b/f")
    with pytest.raises(ValueError):
        paths.dataset_path("/a", "/x")


@given(st.permutations(["/x", "/x/y", "/m", "/m/", "/q/r/s", "/q/r", "/q"]))
def test_a_folder_shadows_a_file_of_its_path_in_any_listing_order(order: list[str]) -> None:
    folders = paths.Folders()
    for path in order:
        folders.note(path)
    assert {path for path in order if folders.shadows(path)} == {"/x", "/m", "/q/r", "/q"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["/a", "/a/b", "/a/b/", "/a/b/c", "/c", "/c/d", "/e/", "/e/f/g", "/h/i"]),
                unique=True).flatmap(st.permutations))
def test_may_shadow_is_false_only_when_no_file_is_shadowed(order: list[str]) -> None:
    """The sync's fast path: with ``may_shadow`` False it keeps every path without asking ``shadows`` of each. It
    must never be False while a file is shadowed, in any listing order (the folder before the file or after)."""
    folders = paths.Folders()
    for path in order:
        folders.note(path)
    if any(folders.shadows(path) for path in order):
        assert folders.may_shadow
    # In order (as S3 lists), it is exact: False whenever nothing is shadowed.
    folders = paths.Folders()
    for path in sorted(order):
        folders.note(path)
    assert folders.may_shadow == any(folders.shadows(path) for path in order)


def test_a_listing_in_order_without_a_shadowed_file_takes_the_fast_path() -> None:
    listing = sorted([f"/dir-{i % 100}/sub/file-{i}.jpg" for i in range(10_000)] + ["/dir-1/", "/dir-1.txt",
                                                                                  "/dir-2.txt/x"])
    folders = paths.Folders()
    for path in listing:
        folders.note(path)
    assert not folders.may_shadow
    # A file, then what sorts between it and the folder of its name, then that folder: found in order too.
    folders = paths.Folders()
    for path in ["/a/m", "/a/m.txt", "/a/m!", "/a/m/inside", "/a/n"]:
        folders.note(path)
    assert folders.may_shadow and folders.shadows("/a/m")


def test_a_listing_out_of_order_may_shadow_whatever_it_holds() -> None:
    folders = paths.Folders()
    for path in ["/b/x", "/a/y"]:
        folders.note(path)
    assert folders.may_shadow


def test_path_prefix_joined_with_a_checked_key_is_its_dataset_path() -> None:
    for root in ("/", "/a", "/a/b/"):
        assert paths.path_prefix(root) + "k/v" == paths.dataset_path(root, "k/v")


def test_skipped_keeps_a_count_and_a_few_short_examples() -> None:
    skipped = paths.Skipped()
    for i in range(8):
        skipped.add(f"k{i}" + "z" * 300, "why", mount=1)
    assert skipped.count == 8
    assert len(skipped.examples) == paths.EXAMPLES
    assert all(len(example) < paths.EXAMPLE_CHARS + 20 and example.endswith("(mount 1): why")
               for example in skipped.examples)


# --- the agent's tree follows the same rules ---


def test_folder_wins_over_a_file_of_the_same_name_in_either_order() -> None:
    for entries in ([entry("/f"), entry("/f/inside")], [entry("/f/inside"), entry("/f")]):
        tree = Namespace.build(entries, InodeAllocator())
        f = tree.lookup(ROOT_INODE, "f")
        assert f is not None and f.is_dir
        assert [n.name for n in tree.children(f.inode)] == ["inside"]
        assert tree.skipped.count == 1 and "'/f'" in tree.skipped.examples[0]
        assert tree.total_bytes == 10


def test_folder_markers_are_empty_folders_and_not_files() -> None:
    tree = Namespace.build([entry("/empty/", size=0), entry("/a/b/", size=0), entry("/a/b/c"), entry("/x"),
                            entry("/x/", size=0)], InodeAllocator())
    empty = tree.lookup(ROOT_INODE, "empty")
    assert empty is not None and empty.is_dir and tree.children(empty.inode) == []
    a = tree.lookup(ROOT_INODE, "a")
    assert a is not None and [n.name for n in tree.children(a.inode)] == ["b"]
    x = tree.lookup(ROOT_INODE, "x")
    assert x is not None and x.is_dir  # the marker "x/" shadows the file "x"
    assert sorted(e.path for e in tree.files()) == ["/a/b/c"]


def test_unusable_manifest_paths_are_counted_not_dropped_in_silence() -> None:
    tree = Namespace.build([entry("/ok"), entry("/../escape"), entry("/a/./b"), entry("/a//b"),
                            entry("/" + "x" * 256), entry("/nul\0"), entry("relative"), entry("/ok")],
                           InodeAllocator())
    assert [n.name for n in tree.children(ROOT_INODE)] == ["ok"]
    assert tree.skipped.count == 7


@given(st.lists(st.text(alphabet=st.sampled_from(["a", "b", "/", "."]), min_size=1, max_size=6), max_size=12))
def test_the_tree_matches_a_reference_model_of_the_rules(keys: list[str]) -> None:
    usable = [key for key in dict.fromkeys(keys) if paths.key_problem(key) is None]
    # Reference model, straight from the documented rules: a file is shown unless a usable key lies below it.
    files = {key for key in usable if not key.endswith("/") and not any(o.startswith(key + "/") for o in usable)}
    folders = {key[:i] for key in usable for i in range(1, len(key)) if key[i] == "/"}
    folders |= {key[:-1] for key in usable if key.endswith("/")}
    tree = Namespace.build([entry(paths.dataset_path("/", key)) for key in usable], InodeAllocator())
    shown_files: set[str] = set()
    shown_folders: set[str] = set()
    for node in tree.nodes():
        if node.inode == ROOT_INODE:
            continue
        parts = []
        walker = node
        while walker.inode != ROOT_INODE:
            parts.append(walker.name)
            parent = tree.get(walker.parent)
            assert parent is not None
            walker = parent
        (shown_folders if node.is_dir else shown_files).add("/".join(reversed(parts)))
    assert (shown_files, shown_folders) == (files, folders)
    assert tree.skipped.count == len(usable) - len(files) - len({k for k in usable if k.endswith("/")})
