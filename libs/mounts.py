"""Dataset mounts, pure: the Fluid/Alluxio spellings of mount options, where each mount appears in the tree,
which secrets a spec gives in clear text, and how a secret key is named in one Secret holding many
(``flat_secret_key``: the Kubernetes bridge writes that name, ``libs.ufs.mounts.read_secrets`` reads it).

Used by validation (``services.dataset.domain``) and by the listing; ``libs.ufs.mounts`` turns a
mount into an object-store location.
"""

from __future__ import annotations

import posixpath

from libs.events.dataset import Dataset, Mount
from libs.redact import has_userinfo, hide_secret_query, is_secret_name, secret_query_names, strip_userinfo

# Options each scheme understands. Fluid/Alluxio spellings are accepted as aliases of ours.
OPTION_ALIASES = {
    "alluxio.underfs.s3.endpoint": "endpoint",
    "alluxio.underfs.s3.endpoint.region": "region",
    # AWS's region in Fluid's S3 samples (docs/en/samples/s3_configuration.md); the one above is other vendors'.
    "alluxio.underfs.s3.region": "region",
    "alluxio.underfs.s3.disable.dns.buckets": "pathStyle",
    "aws.region": "region",
    "fs.s3a.endpoint": "endpoint",
}


def canonical_options(mount: Mount, shared: dict[str, str]) -> dict[str, str]:
    """The mount's options with shared options underneath and aliases resolved to Shoal's names."""
    merged = {**shared, **mount.options}
    return {OPTION_ALIASES.get(key, key): value for key, value in merged.items()}


def exposed_secret_errors(dataset: Dataset) -> list[str]:
    """Secrets given in clear text, which would travel (and stay) in events: secret options, URLs with a user or
    password, and mount points or option values whose query (or fragment) signs them or holds a token. Each reason
    names the field where the secret was given and never shows its value.

    The dataset service rejects such a spec; the CLI refuses it before publishing anything.
    """
    errors = []
    advice = "put it in encryptOptions as a secretKeyRef so it never travels in events"
    fields = [("spec.sharedOptions", dataset.spec.shared_options)]
    fields += [(f"spec.mounts[{index}].options", mount.options) for index, mount in enumerate(dataset.spec.mounts)]
    for where, options in fields:
        for key, value in options.items():
            if is_secret_name(key):
                errors.append(f"{where}.{key} holds a secret in clear text: {advice}")
            elif has_userinfo(value):
                errors.append(f"{where}.{key} {strip_userinfo(value, strict=True)!r} has credentials in its URL: "
                              f"{advice}")
            elif names := secret_query_names(value):  # an endpoint signed or given a token, as a mount point may be
                errors.append(f"{where}.{key} {hide_secret_query(value)!r} has a credential in its query "
                              f"({', '.join(names)}): {advice}")
    for index, mount in enumerate(dataset.spec.mounts):
        shown = hide_secret_query(strip_userinfo(mount.mount_point, strict=True))
        if has_userinfo(mount.mount_point):
            errors.append(f"spec.mounts[{index}].mountPoint {shown!r} has credentials in its URL: {advice}")
        if names := secret_query_names(mount.mount_point):
            errors.append(f"spec.mounts[{index}].mountPoint {shown!r} has a credential in its query "
                          f"({', '.join(names)}): a signed or token URL would travel in events; mount the folder "
                          "or bucket itself")
    return errors


def mount_path(mount: Mount, mount_count: int) -> str:
    """Where a mount appears inside the dataset: its ``path``, else ``/<name>``, else ``/`` when alone."""
    if mount.path:
        return posixpath.normpath("/" + mount.path.lstrip("/"))
    if mount.name:
        return "/" + mount.name
    return "/" if mount_count == 1 else ""


# Characters urlsplit removes wherever they are in a URL (WHATWG's rule, Python >= 3.9.5), each as said in errors.
URL_DROPPED = {"\t": "a tab", "\n": "a line break", "\r": "a carriage return"}


def url_dropped_error(mount_point: str) -> str:
    """Why ``mount_point`` cannot be read as written, or "": read as a URL, it would lose its tabs and line breaks
    and name another folder or prefix ("s3://b/a\\tb/" lists "ab/"), without a word. Such a name cannot be mounted
    (mount points are not percent-decoded, so there is no other way to write one): refused rather than guessed."""
    found = [name for char, name in URL_DROPPED.items() if char in mount_point]
    if not found:
        return ""
    return (f"holds {' and '.join(found)}, which reading it as a URL would drop (another folder or prefix would be "
            "mounted): mount the folder above the one so named")


# How a dataset's status says a secret key was not found (``libs.ufs.mounts.MissingSecret``): the Kubernetes bridge
# recognises it to ask again once the kubelet has refreshed the mounted Secret.
MISSING_SECRET_KEY = "has no key"


def flat_secret_key(name: str, key: str) -> str:
    """The data key of secret ``name``'s ``key`` when many secrets share one Kubernetes Secret: ``<name>.<key>``.

    A Secret volume shows each data key as a file of the mounted folder, so ``<dir>/<name>.<key>`` is what the
    services read (``libs.ufs.mounts.read_secrets``) of the Secret the bridge keeps (``SHOAL_KUBE_SECRET_MIRROR``).
    """
    return f"{name}.{key}"
