"""Metadata sync, the dataset service's I/O with the object stores: list every mount, write the manifest.

The listing streams page by page into a ``libs.manifest.ManifestWriter`` (a temporary NDJSON file) that
``ManifestStore`` then uploads, so memory stays bounded by one listing page (plus the set of folder paths) whatever
the number of objects. Keys become paths by the rules of ``libs.paths``; a second pass over a first spool leaves
out files a folder shadows, so the manifest, fileNum and ufsTotal hold only what the mount shows, and every
object left out is counted, logged and reported in the status. A manifest with the same bytes as the stored one
is not uploaded again (``SyncResult.manifest_changed``), so a periodic listing that finds nothing new writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from libs import paths
from libs.bus import RetryLater
from libs.config import S3Settings
from libs.events.dataset import DatasetRecord, ManifestEntry
from libs.manifest import ManifestStore, ManifestWriter, read_entries
from libs.mounts import mount_path
from libs.redact import cut_error, strip_userinfo
from libs.subjects import key_name, resource_key
from libs.telemetry import get_logger
from libs.ufs import open_store
from libs.ufs.base import EndpointUnreachable, LocalLocation, Location, ObjectInfo, ObjectStore, UfsError
from libs.ufs.mounts import MissingSecret, local_location_error, mount_location
from services.dataset.domain import SyncResult, manifest_name, spec_listed

log = get_logger(__name__)

StoreOpener = Callable[[Location], ObjectStore]

# An object's time: ``mtime`` and, where the store has it, the exact ``mtime_ns`` (``ObjectInfo``).
ObjectTime = tuple[float, int | None]


def _time_order(mtime: ObjectTime) -> tuple[float, int]:
    # Seconds first (they order every store's times), then nanoseconds among times a float cannot tell apart.
    return mtime[0], mtime[1] if mtime[1] is not None else 0


def mount_folders(roots: list[tuple[int, str, ObjectTime | None]]) -> list[ManifestEntry]:
    """The folder marker of each mount's folder but the dataset's own ('/'), so that a mount shows as a folder
    even with nothing below it (a prefix holding only its own marker, which the listing leaves out, or nothing
    yet). ``roots``: (mount index, folder, time of its newest object or None). A marker's time is its newest
    object's, which a folder has anyway; an empty mount's folder has the dataset's (the latest of all), as the
    dataset's own folder does, rather than 1970."""
    times = [newest for _, _, newest in roots if newest is not None]
    latest: ObjectTime = max(times, key=_time_order, default=(0.0, None))
    return [ManifestEntry(path=root + "/", mount=index, key="", size=0, etag="",
                          mtime=(latest if newest is None else newest)[0],
                          mtime_ns=(latest if newest is None else newest)[1])
            for index, root, newest in roots if root.strip("/")]


def names_object_error(mount_point: str, location: Location) -> str:
    """The sync's error for a mount that names one object (a file), not a folder: which folder to mount instead.
    Shoal has no way to select files within a mount, so the message says how to have the object alone."""
    noun = "file" if isinstance(location, LocalLocation) else "object"
    article = "a" if noun == "file" else "an"
    shown = strip_userinfo(mount_point)
    folder = shown.rstrip("/").rsplit("/", 1)[0] + "/"  # no '?' or '#' to mind: refused at apply
    return cut_error(f"mount {shown} names {article} {noun}, not a folder: mount its folder {folder} instead (a mount "
                     f"is always a folder, every {noun} below it in the dataset; to have this {noun} alone, put it in "
                     "a folder of its own and mount that)")


async def _paced(listing: AsyncIterator[ObjectInfo], seconds: float) -> AsyncIterator[ObjectInfo]:
    """``listing``, each entry within ``seconds``: the entries of a page in hand come at once, so this bounds the
    wait for each page. A store slower than that (one that answers a byte at a time never trips a read timeout)
    raises ``EndpointUnreachable``, retried later like a store that does not answer.

    One timer for the whole listing, not one per entry: it fires at the deadline of the wait in progress and is set
    again from there when an entry came meanwhile. An ``asyncio.timeout`` around each entry armed and cancelled a
    timer per object, a quarter of the CPU of an autoSync listing of 300,000 objects that found nothing new."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    waiting_since: float | None = None  # when the wait for the next entry began; None between waits
    expired = False
    timer: asyncio.TimerHandle

    def look() -> None:
        nonlocal timer, expired
        if waiting_since is not None and loop.time() >= waiting_since + seconds:
            expired = True
            task.cancel()
            return
        timer = loop.call_at((waiting_since if waiting_since is not None else loop.time()) + seconds, look)

    timer = loop.call_later(seconds, look)
    try:
        while True:
            waiting_since = loop.time()
            try:
                info = await anext(listing)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError as err:
                if not expired or task.uncancel() > 0:
                    raise  # cancelled by someone else (too)
                raise EndpointUnreachable(f"no listing page within {seconds:g} s (SHOAL_SYNC_PAGE_SECONDS): the "
                                          "store answers too slowly, or not at all") from err
            finally:
                waiting_since = None
            yield info
    finally:
        timer.cancel()
        close = getattr(listing, "aclose", None)
        if close is not None:
            await close()


def _failed_unexpectedly(record: DatasetRecord, key: str, mount_point: str, err: Exception) -> SyncResult:
    """The sync's result for an error at a mount that is no store error the stores know (a bug, a case a store does
    not handle, a record an older version accepted): the dataset fails with what happened, once, rather than the
    reconciler relisting it every few seconds in silence."""
    error = cut_error(strip_userinfo(f"cannot list {mount_point}: {type(err).__name__}: {err}", strict=True))
    # No traceback: it would repeat the exception's text unredacted.
    log.warning("listing failed unexpectedly", dataset=key_name(key), error=error)
    return SyncResult(generation=record.generation, requests=record.sync_requests, incarnation=record.incarnation,
                      error=error)


async def sync_metadata(record: DatasetRecord, manifests: ManifestStore, defaults: S3Settings,
                        page_size: int, opener: StoreOpener = open_store,
                        local_roots: Sequence[str] | None = None, pvc_root: str = "",
                        page_seconds: float = 120.0) -> SyncResult:
    """List every mount of the dataset and store its manifest.

    A problem retrying cannot fix (a missing secret, a bucket that does not exist, access denied) becomes
    ``SyncResult.error``; an unreachable endpoint raises ``RetryLater`` with the same kind of message.
    ``local_roots`` (SHOAL_LOCAL_ROOTS) is checked again on the real path of a ``local://`` mount, so a link
    below a root cannot lead the listing out of it; a ``pvc://`` mount's claim must be mounted below ``pvc_root``
    (SHOAL_PVC_ROOT), or the dataset fails with a message saying so. A page of a listing that takes longer than
    ``page_seconds`` (SHOAL_SYNC_PAGE_SECONDS) counts as an unreachable store. Errors never show credentials a URL
    may carry.
    """
    dataset = record.dataset
    namespace = dataset.metadata.namespace
    key = resource_key(namespace, dataset.metadata.name)
    generation = record.generation
    requests = record.sync_requests
    listed = 0
    skipped = paths.Skipped()
    folders = paths.Folders()
    # Each mount's folder, and the time of its newest object (None: nothing below it), see ``mount_folders``.
    roots: list[tuple[int, str, ObjectTime | None]] = []
    # An empty mount of a spec already listed was a folder then: no HEAD per listing to ask again.
    check_objects = not spec_listed(record)
    with ManifestWriter() as usable, ManifestWriter() as manifest:
        for index, mount in enumerate(dataset.spec.mounts):
            try:
                location = mount_location(dataset, mount, defaults, pvc_root=pvc_root, local_roots=local_roots or ())
                refused = (await asyncio.to_thread(local_location_error, location, local_roots or ())
                           if isinstance(location, LocalLocation)
                           and (local_roots is not None or location.claim_root is not None) else None)
                store = None if refused else opener(location)
            except MissingSecret as err:
                return SyncResult(generation=generation, requests=requests, incarnation=record.incarnation,
                                  error=cut_error(str(err)))
            except Exception as err:
                # A record stored before a check at apply (a mountPoint holding a NUL byte), or a store that cannot
                # be opened (an endpoint botocore refuses): as for a listing that fails unexpectedly, below.
                return _failed_unexpectedly(record, key, mount.mount_point, err)
            if store is None:
                return SyncResult(generation=generation, requests=requests, incarnation=record.incarnation,
                                  error=cut_error(f"mount {mount.mount_point}: {refused}"))
            root = mount_path(mount, len(dataset.spec.mounts))
            prefix = paths.path_prefix(root)
            newest: ObjectTime | None = None
            mount_listed = 0
            try:
                async for info in _paced(store.list(page_size=page_size), page_seconds):
                    listed += 1
                    mount_listed += 1
                    problem = info.unusable or paths.key_problem(info.key)
                    if problem is not None:
                        skipped.add(info.key, problem, index)
                        continue
                    # Checked just above: ``dataset_path`` would check the key again, a second time per object.
                    entry = ManifestEntry(path=prefix + info.key, mount=index, key=info.key,
                                          size=info.size, etag=info.etag, mtime=info.mtime,
                                          mtime_ns=info.mtime_ns, mode=info.mode, uid=info.uid, gid=info.gid)
                    folders.note(entry.path)
                    usable.add(entry)
                    mtime = (info.mtime, info.mtime_ns)
                    newest = mtime if newest is None else max(newest, mtime, key=_time_order)
                # Nothing below the prefix: a folder with nothing in it yet, or a mount naming one object, read as
                # the folder of that name (Fluid users write s3://bucket/dir/model.bin), which bound 0 files.
                # Asked at the first listing of a spec only (``spec_listed``).
                if not mount_listed and check_objects and await store.names_object():
                    return SyncResult(generation=generation, requests=requests, incarnation=record.incarnation,
                                      error=names_object_error(mount.mount_point, location))
            except UfsError as err:
                error = cut_error(strip_userinfo(f"cannot list {mount.mount_point}: {err.message}"))
                if err.retryable:
                    raise RetryLater(error) from err  # the handler knows the delay (settings)
                # A local file as the mount fails its listing ("not a directory"): say what to mount instead. (Not
                # asked of a store whose listing failed otherwise: whatever answered it may answer a HEAD with 200.)
                if isinstance(location, LocalLocation) and not mount_listed:
                    with contextlib.suppress(UfsError):
                        if await store.names_object():
                            error = names_object_error(mount.mount_point, location)
                return SyncResult(generation=generation, requests=requests, incarnation=record.incarnation, error=error)
            except Exception as err:
                return _failed_unexpectedly(record, key, mount.mount_point, err)
            finally:
                await store.close()
            roots.append((index, root, newest))
        if folders.may_shadow:
            for entry in read_entries(usable.rewound()):
                if folders.shadows(entry.path):
                    skipped.add(entry.key, paths.SHADOWED, entry.mount)
                    continue
                manifest.add(entry)
        else:
            # No folder has a file's path: every usable entry stays, in the order written, so the manifest is the
            # usable entries as they are (decoding and encoding each again cost a second pass over the listing).
            manifest = usable
        for entry in mount_folders(roots):
            manifest.add(entry)
        # Named with the record's incarnation, generation and resync count: if the dataset changes, is resynced,
        # or is deleted and applied again while this listing runs, this upload lands beside the manifest the
        # record names, never over it (the handler drops it). Only an autoSync pass, which lists the spec and
        # resync the status holds, finds its manifest already there to compare with.
        name = manifest_name(record)
        changed = await manifests.save(name, manifest, first=name != record.status.manifest)
    if skipped.count:
        log.warning("objects left out of the tree", dataset=key_name(key), generation=generation, listed=listed,
                    skipped=skipped.count, examples=skipped.examples)
    log.info("synced", dataset=key_name(key), generation=generation, files=manifest.file_num,
             bytes=manifest.total_bytes, manifest=name, manifest_changed=changed)
    return SyncResult(generation=generation, requests=requests, incarnation=record.incarnation,
                      file_num=manifest.file_num, total_bytes=manifest.total_bytes, manifest=name, listed=listed,
                      skipped=skipped.count, skipped_examples=tuple(skipped.examples), manifest_changed=changed)
