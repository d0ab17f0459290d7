"""Turning a Dataset mount into an object-store location: scheme, bucket and prefix, endpoint, credentials.

Pure: secrets arrive as an already-read mapping; credentials stay wrapped in ``Secret``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from libs.config import S3Settings, Secret
from libs.events.dataset import Dataset, Mount
from libs.ufs.base import LocalLocation, Location, S3Location
from services.dataset.domain import canonical_options


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
