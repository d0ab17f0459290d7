"""Under file systems (UFS): where a dataset's bytes live, read through one ``ObjectStore`` protocol.

``open_store`` decides which implementation serves a location: ``S3ObjectStore`` for S3 and S3-compatible
endpoints, ``LocalObjectStore`` for a directory (``local://`` and ``pvc://``), ``HttpObjectStore`` for a web
server folder (``http://``, ``https://``). All are read-only; see ``base`` for the protocol and errors.
"""

from __future__ import annotations

from libs.ufs.base import (
    AccessDenied,
    EndpointUnreachable,
    HttpLocation,
    LocalLocation,
    Location,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    ObjectStore,
    S3Location,
    UfsError,
)
from libs.ufs.http import HttpObjectStore
from libs.ufs.local import LocalObjectStore
from libs.ufs.s3 import S3Clients, S3ObjectStore


def open_store(location: Location, s3_clients: S3Clients | None = None) -> ObjectStore:
    """The store for ``location``; it opens connections on first use, and the caller closes it. An S3 store takes
    its client from ``s3_clients`` when given (shared with the other stores of that location)."""
    if isinstance(location, S3Location):
        return S3ObjectStore(location, clients=s3_clients)
    if isinstance(location, LocalLocation):
        return LocalObjectStore(location)
    if isinstance(location, HttpLocation):
        return HttpObjectStore(location)
    raise TypeError(f"no object store for {type(location).__name__}")


__all__ = [
    "AccessDenied",
    "EndpointUnreachable",
    "HttpLocation",
    "HttpObjectStore",
    "LocalLocation",
    "LocalObjectStore",
    "Location",
    "NoSuchBucket",
    "NoSuchKey",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectStore",
    "S3Clients",
    "S3Location",
    "S3ObjectStore",
    "UfsError",
    "open_store",
]
