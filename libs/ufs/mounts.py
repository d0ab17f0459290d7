"""Dataset mounts as object-store locations: endpoint and credentials.

Shared by the dataset service (listing) and the agent (reads). Pure except ``read_secrets``, which reads secret
files; credentials stay wrapped in ``Secret``. Option aliases and where a mount appears are ``libs.mounts``
(pure, so domain modules can use them without importing the object stores).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from libs.config import S3Settings, Secret
from libs.events.dataset import Dataset, Mount
from libs.mounts import MISSING_SECRET_KEY, canonical_options, flat_secret_key
from libs.ufs.base import LocalLocation, Location, S3Location


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
            raise MissingSecret(f"secret {ref.name!r} {MISSING_SECRET_KEY} {ref.key!r} (needed for {option.name})")
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
    """Secrets from ``secrets_dir``: ``<dir>/<name>/<key>`` (a folder per secret, as a mounted Secret per name
    gives), else ``<dir>/<name>.<key>`` (``flat_secret_key``: one mounted Secret holding many). Missing ones are
    left out."""
    found: dict[tuple[str, str], Secret] = {}
    if not secrets_dir:
        return found
    for name, key in refs:
        for path in (Path(secrets_dir) / name / key, Path(secrets_dir) / flat_secret_key(name, key)):
            try:
                found[(name, key)] = Secret(path.read_text().strip())
            except OSError:
                continue
            break
    return found
