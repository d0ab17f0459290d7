"""Metadata sync, the dataset service's I/O with the object stores: list every mount, write the manifest.

The listing streams page by page into a temporary NDJSON file, so memory stays bounded by one listing page (plus
the set of folder paths) whatever the number of objects. Keys become paths by the rules of ``libs.paths``; a
second pass over that file leaves out files a folder shadows, so the manifest, fileNum and ufsTotal hold only
what the mount shows, and every object left out is counted, logged and reported in the status.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from nats.js.object_store import ObjectStore as NatsObjectStore

from libs import paths, subjects
from libs.config import S3Settings
from libs.events.dataset import DatasetRecord
from libs.manifest import ManifestEntry, read_entries, write_entry
from libs.telemetry import get_logger
from libs.ufs import open_store
from libs.ufs.base import Location, ObjectStore, UfsError
from libs.ufs.mounts import MissingSecret, mount_path, read_secrets, resolve_location, secret_refs
from services.dataset.domain import SyncResult

log = get_logger(__name__)

StoreOpener = Callable[[Location], ObjectStore]


async def sync_metadata(record: DatasetRecord, manifests: NatsObjectStore, defaults: S3Settings,
                        page_size: int, opener: StoreOpener = open_store) -> SyncResult:
    """List every mount of the dataset and store its manifest; a UFS problem becomes ``SyncResult.error``."""
    dataset = record.dataset
    generation = record.generation
    requests = record.sync_requests
    listed = 0
    file_num = 0
    total_bytes = 0
    skipped = paths.Skipped()
    folders = paths.Folders()
    with tempfile.TemporaryFile() as usable, tempfile.TemporaryFile() as out:
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
                    listed += 1
                    problem = paths.key_problem(info.key)
                    if problem is not None:
                        skipped.add(info.key, problem, index)
                        continue
                    entry = ManifestEntry(path=paths.dataset_path(root, info.key), mount=index, key=info.key,
                                          size=info.size, etag=info.etag, mtime=info.mtime)
                    folders.note(entry.path)
                    write_entry(usable, entry)
            except UfsError as err:
                return SyncResult(generation=generation, requests=requests,
                                  error=f"cannot list {mount.mount_point}: {err.message}", retryable=err.retryable)
            finally:
                await store.close()
        usable.seek(0)
        for entry in read_entries(usable):
            if folders.shadows(entry.path):
                skipped.add(entry.key, paths.SHADOWED, entry.mount)
                continue
            if not paths.is_folder(entry.path):
                file_num += 1
                total_bytes += entry.size
            write_entry(out, entry)
        out.flush()
        out.seek(0)
        name = subjects.manifest_name(dataset.metadata.namespace, dataset.metadata.name)
        await manifests.put(name, out)
    if skipped.count:
        log.warning("objects left out of the tree", dataset=name, generation=generation, listed=listed,
                    skipped=skipped.count, examples=skipped.examples)
    log.info("synced", dataset=name, generation=generation, files=file_num, bytes=total_bytes)
    return SyncResult(generation=generation, requests=requests, file_num=file_num, total_bytes=total_bytes,
                      manifest=name, listed=listed, skipped=skipped.count, skipped_examples=tuple(skipped.examples))
