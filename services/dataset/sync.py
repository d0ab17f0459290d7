"""Metadata sync, the dataset service's I/O with the object stores: list every mount, write the manifest.

The listing streams page by page into a ``libs.manifest.ManifestWriter`` (a temporary NDJSON file) that
``ManifestStore`` then uploads, so memory stays bounded by one listing page whatever the number of objects.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable

from libs.bus import RetryLater
from libs.config import S3Settings
from libs.events.dataset import DatasetRecord, ManifestEntry
from libs.manifest import ManifestStore, ManifestWriter
from libs.mounts import mount_path
from libs.telemetry import get_logger
from libs.ufs import open_store
from libs.ufs.base import Location, ObjectStore, UfsError
from libs.ufs.mounts import MissingSecret, read_secrets, resolve_location, secret_refs
from services.dataset.domain import SyncResult

log = get_logger(__name__)

StoreOpener = Callable[[Location], ObjectStore]
# Wait before listing again an endpoint that was unreachable.
UNREACHABLE_RETRY_SECONDS = 15.0


async def sync_metadata(record: DatasetRecord, manifests: ManifestStore, defaults: S3Settings,
                        page_size: int, opener: StoreOpener = open_store) -> SyncResult:
    """List every mount of the dataset and store its manifest.

    A problem retrying cannot fix (a missing secret, a bucket that does not exist, access denied) becomes
    ``SyncResult.error``; an unreachable endpoint raises ``RetryLater`` with the same kind of message.
    """
    dataset = record.dataset
    generation = record.generation
    requests = record.sync_requests
    with ManifestWriter() as manifest:
        for index, mount in enumerate(dataset.spec.mounts):
            try:
                location = resolve_location(dataset, mount,
                                            read_secrets(defaults.secrets_dir, secret_refs(dataset, mount)), defaults)
            except MissingSecret as err:
                return SyncResult(generation=generation, requests=requests, error=f"mount {mount.mount_point}: {err}")
            root = mount_path(mount, len(dataset.spec.mounts))
            store = opener(location)
            try:
                async for info in store.list(page_size=page_size):
                    manifest.add(ManifestEntry(path=posixpath.join(root, info.key), mount=index, key=info.key,
                                               size=info.size, etag=info.etag, mtime=info.mtime))
            except UfsError as err:
                error = f"cannot list {mount.mount_point}: {err.message}"
                if err.retryable:
                    raise RetryLater(error, UNREACHABLE_RETRY_SECONDS) from err
                return SyncResult(generation=generation, requests=requests, error=error)
            finally:
                await store.close()
        name = manifests.name(dataset.metadata.namespace, dataset.metadata.name)
        await manifests.save(name, manifest)
    log.info("synced", dataset=name, generation=generation, files=manifest.file_num, bytes=manifest.total_bytes)
    return SyncResult(generation=generation, requests=requests, file_num=manifest.file_num,
                      total_bytes=manifest.total_bytes, manifest=name)
