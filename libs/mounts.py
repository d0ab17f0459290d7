"""Dataset mounts, pure: the Fluid/Alluxio spellings of mount options, and where each mount appears in the tree.

Used by validation (``services.dataset.domain``) and by the listing; ``libs.ufs.mounts`` turns a
mount into an object-store location.
"""

from __future__ import annotations

import posixpath

from libs.events.dataset import Mount

# Options each scheme understands. Fluid/Alluxio spellings are accepted as aliases of ours.
OPTION_ALIASES = {
    "alluxio.underfs.s3.endpoint": "endpoint",
    "alluxio.underfs.s3.endpoint.region": "region",
    "alluxio.underfs.s3.disable.dns.buckets": "pathStyle",
    "aws.region": "region",
    "fs.s3a.endpoint": "endpoint",
}


def canonical_options(mount: Mount, shared: dict[str, str]) -> dict[str, str]:
    """The mount's options with shared options underneath and aliases resolved to Shoal's names."""
    merged = {**shared, **mount.options}
    return {OPTION_ALIASES.get(key, key): value for key, value in merged.items()}


def mount_path(mount: Mount, mount_count: int) -> str:
    """Where a mount appears inside the dataset: its ``path``, else ``/<name>``, else ``/`` when alone."""
    if mount.path:
        return posixpath.normpath("/" + mount.path.lstrip("/"))
    if mount.name:
        return "/" + mount.name
    return "/" if mount_count == 1 else ""
