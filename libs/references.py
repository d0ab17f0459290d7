"""Reference datasets, pure: what ``dataset://<namespace>/<name>[/<folder>]`` names (Fluid's way to share one
dataset's cache across namespaces), and how a reference is recognised.

A reference is a Dataset whose only mount is ``dataset://``: it lists nothing, caches nothing and has no runtime of
its own. Its status mirrors its *source*'s (``services.dataset``), and every node that mounts the source shows the
reference at its own mount point as a link into the source's mount (``services.agent``), so reads go through the
source's one FUSE mount and block cache: no second copy, no second store GET. The Kubernetes bridge points the
reference's PersistentVolume at the source's mount, as Fluid copies the source's volume.

Spelled here once, for the dataset service (validation, status), the agent (links) and the bridge (volumes).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

from libs.events.common import DNS1123_LABEL, dns_label_errors
from libs.events.dataset import Dataset, Mount
from libs.mounts import url_dropped_error
from libs.paths import relative_problem
from libs.redact import hide_secret_query, strip_userinfo
from libs.subjects import resource_key

SCHEME = "dataset"
PREFIX = f"{SCHEME}://"


@dataclass(frozen=True)
class Reference:
    """The source a reference mounts: its namespace and name, and optionally a folder inside it (Fluid's sub path,
    ``dataset://ns/name/sub/dir``: the reference shows only that folder)."""

    namespace: str
    name: str
    folder: str = ""

    @property
    def key(self) -> str:
        """The source's key in ``shoal_datasets`` (``libs.subjects.resource_key``'s form)."""
        return resource_key(self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f"/{self.folder}" if self.folder else "")


def is_reference_mount(mount: Mount) -> bool:
    return mount.mount_point.startswith(PREFIX)


def parse(mount_point: str) -> tuple[Reference | None, str]:
    """The source ``mount_point`` names, or None and why not (a sentence saying what to write instead).

    The sentence goes into rejection facts and logs: it shows the mount point without what a user name or password
    in it would be (``libs.redact.strip_userinfo``, strict) or a token in its query, never as given."""
    shown = hide_secret_query(strip_userinfo(mount_point, strict=True))
    if not mount_point.startswith(PREFIX):
        return None, f"{shown!r} is not a {PREFIX} mount"
    try:
        parts = urlsplit(mount_point)
    except ValueError as err:  # an unbalanced '[' (an IPv6 host never closed)
        return None, f"{shown!r} is not a valid URL ({err}): write {PREFIX}<namespace>/<name>"
    if dropped := url_dropped_error(mount_point):
        return None, f"{shown!r} {dropped}"
    namespace = parts.netloc
    name, _, folder = parts.path.lstrip("/").partition("/")
    folder = folder.strip("/")
    usage = f"write {PREFIX}<namespace>/<name> (or {PREFIX}<namespace>/<name>/<folder>)"
    if parts.query or parts.fragment or "@" in namespace:
        return None, f"{shown!r} must be plain: {usage}"
    if not namespace or not name:
        return None, f"{shown!r} names no dataset: {usage}"
    errors = dns_label_errors(namespace, "namespace", DNS1123_LABEL) + dns_label_errors(name, "name")
    if errors:
        return None, f"{shown!r}: " + "; ".join(errors)
    if folder:
        normal = posixpath.normpath(folder)
        problem = ("must not contain '..'" if ".." in folder.split("/") else relative_problem(normal))
        if problem is not None:
            named = "" if "@" in folder else f" {folder!r}"  # a password may have landed in it
            return None, f"{shown!r}: the folder{named} {problem}"
        folder = normal
    return Reference(namespace=namespace, name=name, folder=folder), ""


def reference_of(dataset: Dataset) -> Reference | None:
    """The source of a reference dataset (its first ``dataset://`` mount), or None for a dataset of stores.

    A spec mixing ``dataset://`` with other mounts is refused at apply; a malformed one too, so None here only
    means "not a reference" for the specs that were accepted."""
    for mount in dataset.spec.mounts:
        if is_reference_mount(mount):
            return parse(mount.mount_point)[0]
    return None


def is_reference(dataset: Dataset) -> bool:
    return any(is_reference_mount(mount) for mount in dataset.spec.mounts)
