"""Metadata sync, the dataset service's I/O with the object stores: list every mount, write the manifest.

The listing streams page by page into a temporary NDJSON file that is then uploaded to the JetStream Object
Store, so memory stays bounded by one listing page whatever the number of objects.
"""

from __future__ import annotations

import asyncio
import posixpath
import tempfile
from collections.abc import Callable, Sequence

from nats.js.object_store import ObjectStore as NatsObjectStore

from libs import subjects
from libs.config import S3Settings
from libs.events.dataset import DatasetRecord
from libs.hostpaths import real_local_root_error
from libs.manifest import ManifestEntry, write_entry
from libs.redact import strip_userinfo
from libs.telemetry import get_logger
from libs.ufs import open_store
from libs.ufs.base import LocalLocation, Location, ObjectStore, UfsError
from libs.ufs.mounts import MissingSecret, mount_path, read_secrets, resolve_location, secret_refs
from services.dataset.domain import SyncResult

log = get_logger(__name__)

StoreOpener = Callable[[Location], ObjectStore]


async def sync_metadata(record: DatasetRecord, manifests: NatsObjectStore, defaults: S3Settings,
                        page_size: int, opener: StoreOpener = open_store,
                        local_roots: Sequence[str] | None = None) -> SyncResult:
    """List every mount of the dataset and store its manifest; a UFS problem becomes ``SyncResult.error``.

    ``local_roots`` (SHOAL_LOCAL_ROOTS) is checked again on the real path of a ``local://`` mount, so a link
    below a root cannot lead the listing out of it. Errors never show credentials a URL may carry.
    """
    dataset = record.dataset
    generation = record.generation
    requests = record.sync_requests
    file_num = 0
    total_bytes = 0
    with tempfile.TemporaryFile() as out:
        for index, mount in enumerate(dataset.spec.mounts):
            try:
                location = resolve_location(dataset, mount,
                                            read_secrets(defaults.secrets_dir, secret_refs(dataset, mount)), defaults)
            except MissingSecret as err:
                return SyncResult(generation=generation, requests=requests,
                                  error=strip_userinfo(f"mount {mount.mount_point}: {err}"))
            if isinstance(location, LocalLocation) and local_roots is not None:
                refused = await asyncio.to_thread(real_local_root_error, str(location.root), local_roots)
                if refused:
                    return SyncResult(generation=generation, requests=requests,
                                      error=f"mount {mount.mount_point}: {refused}")
            root = mount_path(mount, len(dataset.spec.mounts))
            store = opener(location)
            try:
                async for info in store.list(page_size=page_size):
                    entry = ManifestEntry(path=posixpath.join(root, info.key), mount=index, key=info.key,
                                          size=info.size, etag=info.etag, mtime=info.mtime, mode=info.mode,
                                          uid=info.uid, gid=info.gid)
                    write_entry(out, entry)
                    file_num += 1
                    total_bytes += info.size
            except UfsError as err:
                return SyncResult(generation=generation, requests=requests,
                                  error=strip_userinfo(f"cannot list {mount.mount_point}: {err.message}"),
                                  retryable=err.retryable)
            finally:
                await store.close()
        out.flush()
        out.seek(0)
        name = subjects.manifest_name(dataset.metadata.namespace, dataset.metadata.name)
        await manifests.put(name, out)
    log.info("synced", dataset=name, generation=generation, files=file_num, bytes=total_bytes)
    return SyncResult(generation=generation, requests=requests, file_num=file_num, total_bytes=total_bytes,
                      manifest=name)
