"""Dataset mounts as object-store locations: option aliases, where a mount appears, endpoint and credentials.

Shared by the dataset service (listing) and the agent (reads). Pure except ``read_secrets``, which reads secret
files; credentials stay wrapped in ``Secret``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from libs.config import S3Settings, Secret
from libs.events.dataset import Dataset, Mount
from libs.redact import has_userinfo, is_secret_name, strip_userinfo
from libs.ufs.base import LocalLocation, Location, S3Location

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


def exposed_secret_errors(dataset: Dataset) -> list[str]:
    """Secrets given in clear text, which would travel (and stay) in events: secret options and URLs with a user
    or password. Each reason names the field where the secret was given and never shows its value.

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
    for index, mount in enumerate(dataset.spec.mounts):
        if has_userinfo(mount.mount_point):
            errors.append(f"spec.mounts[{index}].mountPoint {strip_userinfo(mount.mount_point, strict=True)!r} "
                          f"has credentials in its URL: {advice}")
    return errors


def mount_path(mount: Mount, mount_count: int) -> str:
    """Where a mount appears inside the dataset: its ``path``, else ``/<name>``, else ``/`` when alone."""
    if mount.path:
        return posixpath.normpath("/" + mount.path.lstrip("/"))
    if mount.name:
        return "/" + mount.name
    return "/" if mount_count == 1 else ""


class MissingSecret(Exception):
    pass


def secret_refs(dataset: Dataset, mount: Mount) -> list[tuple[str, str]]:
    """(secret name, key) pairs the mount needs."""
    options = [*dataset.spec.shared_encrypt_options, *mount.encrypt_options]
    return [(o.value_from.secret_key_ref.name, o.value_from.secret_key_ref.key) for o in options]


def resolve_location(dataset: Dataset, mount: Mount, secrets: Mapping[tuple[str, str], Secret],
                     defaults: S3Settings) -> Location:
    parts = urlsplit(mount.mount_point)
    if parts.scheme == "local":
        return LocalLocation(root=Path(parts.path))
    options = canonical_options(mount, dataset.spec.shared_options)
    encrypted: dict[str, Secret] = {}
    for option in [*dataset.spec.shared_encrypt_options, *mount.encrypt_options]:
        ref = option.value_from.secret_key_ref
        if (ref.name, ref.key) not in secrets:
            raise MissingSecret(f"secret {ref.name!r} has no key {ref.key!r} (needed for {option.name})")
        encrypted[option.name] = secrets[(ref.name, ref.key)]
    access_key = encrypted.get("aws.accessKeyId") or (
        Secret(options["aws.accessKeyId"]) if "aws.accessKeyId" in options else defaults.access_key_id
    )
    secret_key = encrypted.get("aws.secretKey") or defaults.secret_access_key
    return S3Location(
        bucket=parts.netloc,
        prefix=parts.path.strip("/"),
        endpoint_url=options.get("endpoint", defaults.endpoint),
        region=options.get("region", defaults.region),
        path_style=options.get("pathStyle", str(defaults.path_style)).lower() == "true",
        access_key_id=access_key,
        secret_access_key=secret_key,
    )


def read_secrets(secrets_dir: str, refs: list[tuple[str, str]]) -> dict[tuple[str, str], Secret]:
    """Secrets laid out like a mounted Kubernetes Secret: ``<dir>/<name>/<key>``. Missing ones are left out."""
    found: dict[tuple[str, str], Secret] = {}
    if not secrets_dir:
        return found
    for name, key in refs:
        path = Path(secrets_dir) / name / key
        try:
            found[(name, key)] = Secret(path.read_text().strip())
        except OSError:
            continue
    return found
