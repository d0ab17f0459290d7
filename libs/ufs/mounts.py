"""Dataset mounts as object-store locations: endpoint and credentials, web folder and its limits, the folder of
a ``local://`` path or of a ``pvc://`` volume claim (``SHOAL_PVC_ROOT/<namespace>/<claim>/<sub/path>``).

Shared by the dataset service (listing) and the agent (reads). Pure except ``read_secrets`` and
``mount_location``, which read secret files, and ``local_location_error``, which looks at the disk; credentials
stay wrapped in ``Secret``. Option
aliases and where a mount appears are ``libs.mounts`` (pure, so domain modules can use them without importing
the object stores).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from libs.config import S3Settings, Secret
from libs.events.dataset import Dataset, Mount
from libs.hostpaths import local_root_of, real_local_root_error
from libs.mounts import MISSING_SECRET_KEY, canonical_options, flat_secret_key
from libs.redact import strip_userinfo
from libs.ufs.base import (
    HttpLocation,
    LocalLocation,
    Location,
    S3Location,
)

# Options of http(s):// mounts (validated by the dataset service) and the HttpLocation field each sets.
HTTP_LIMIT_OPTIONS = {"maxDepth": "max_depth", "maxPages": "max_pages", "maxFiles": "max_files"}


class MissingSecret(Exception):
    pass


def secret_refs(dataset: Dataset, mount: Mount) -> list[tuple[str, str]]:
    """(secret name, key) pairs the mount needs."""
    options = [*dataset.spec.shared_encrypt_options, *mount.encrypt_options]
    return [(o.value_from.secret_key_ref.name, o.value_from.secret_key_ref.key) for o in options]


def claim_folder(pvc_root: str, namespace: str, claim: str) -> Path:
    """Where volume claim ``claim`` of ``namespace`` is mounted: ``<SHOAL_PVC_ROOT>/<namespace>/<claim>``."""
    return Path(pvc_root) / namespace / claim


def resolve_location(dataset: Dataset, mount: Mount, secrets: Mapping[tuple[str, str], Secret],
                     defaults: S3Settings, pvc_root: str = "", local_roots: Sequence[str] = ()) -> Location:
    """The location of ``mount``; ``pvc_root`` is SHOAL_PVC_ROOT (a pvc:// mount without one resolves below a
    folder that does not exist, which ``local_location_error`` reports); ``local_roots`` is SHOAL_LOCAL_ROOTS
    (a local:// location keeps the one it lies below, which its store checks at each use)."""
    parts = urlsplit(mount.mount_point)
    if parts.scheme == "local":
        local_root = local_root_of(parts.path, local_roots)
        return LocalLocation(root=Path(parts.path), local_root=Path(local_root) if local_root is not None else None,
                             source=mount.mount_point)
    options = canonical_options(mount, dataset.spec.shared_options)
    if parts.scheme == "pvc":
        claim = claim_folder(pvc_root or "/nonexistent-pvc-root", dataset.metadata.namespace, parts.netloc)
        sub = unquote(parts.path).strip("/")
        return LocalLocation(root=claim / sub if sub else claim, claim_root=claim, source=mount.mount_point)
    if parts.scheme in ("http", "https"):
        limits = {}
        for name, field in HTTP_LIMIT_OPTIONS.items():
            value = options.get(name, "")
            # Validation refuses anything but a positive number; an older record keeps the default.
            if value.isdigit() and int(value) > 0:
                limits[field] = int(value)
        return HttpLocation(url=mount.mount_point, **limits)
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


# The namespace whose secrets may also lie directly in the folder, as every secret did before namespaces were kept
# apart there: ``<dir>/<secret>/<key>`` (the README's ``shoal up`` layout) keeps working for it.
UNNAMESPACED_SECRETS = "default"


def secret_paths(secrets_dir: str, namespace: str, name: str, key: str) -> list[Path]:
    """Where key ``key`` of secret ``name``, named by a dataset of ``namespace``, may be, in the order looked at.

    Each path can only ever be one namespace's, so a dataset never reads a same-named secret of another namespace:

    - ``<dir>/<namespace>/<name>/<key>``: a folder per namespace, in it a folder per secret;
    - the Kubernetes bridge's copy, named ``<namespace>.<secret>`` (``services.bridge.domain.stored_secret_name``;
      a namespace holds no dot, so the name says whose it is): ``<dir>/<name>/<key>`` (its files) or
      ``<dir>/<name>.<key>`` (its mirror Secret, mounted: ``flat_secret_key``), for a name starting with the
      dataset's own namespace and a dot only;
    - for ``UNNAMESPACED_SECRETS`` only: ``<dir>/<name>/<key>`` and ``<dir>/<name>.<key>`` for a name (and, flat, a
      key) without a dot, so never a path the bridge's forms give another namespace.
    """
    root = Path(secrets_dir)
    paths = [root / namespace / name / key]
    if name.startswith(f"{namespace}.") or (namespace == UNNAMESPACED_SECRETS and "." not in name):
        paths.append(root / name / key)
        # Flat, the default namespace's ``a`` key ``b.c`` would be the bridge's copy of namespace a's ``b`` key c.
        if "." in name or "." not in key:
            paths.append(root / flat_secret_key(name, key))
    return paths


def read_secrets(secrets_dir: str, namespace: str, refs: list[tuple[str, str]]) -> dict[tuple[str, str], Secret]:
    """The secrets ``refs`` names, for a dataset of ``namespace``, from the files ``secret_paths`` says. Missing ones
    are left out; one that is not text is ``MissingSecret`` saying so (never what it holds)."""
    found: dict[tuple[str, str], Secret] = {}
    if not secrets_dir:
        return found
    for name, key in refs:
        for path in secret_paths(secrets_dir, namespace, name, key):
            try:
                found[(name, key)] = Secret(path.read_text().strip())
            except OSError:
                continue
            except UnicodeDecodeError:
                raise MissingSecret(f"secret {name!r} key {key!r} ({path}) is not UTF-8 text: a credential is "
                                    "text; write the key itself, not a binary or encoded file") from None
            break
    return found


def missing_secret_hint(secrets_dir: str, namespace: str, refs: Sequence[tuple[str, str]]) -> str:
    """What to add to a ``MissingSecret`` message: when no folder of secrets is set, that none is read ("secret
    's3-creds' has no key 'id'" sent the user looking for a typo in a Secret that was never read); when a secret of
    ``refs`` lies directly in the folder, where only ``UNNAMESPACED_SECRETS``' may, where the namespace's belongs;
    otherwise where the first missing one was looked for (paths only, never what a file holds), and for one not
    the Kubernetes bridge's copy, where to write it: the message alone sent the user guessing where Shoal reads."""
    if not secrets_dir:
        return ("; SHOAL_SECRETS_DIR is not set, so no secret is read: set it, for the dataset service and the "
                "agents, to the folder holding the secrets as <namespace>/<secret>/<key> files")
    for name, key in refs:
        unread = Path(secrets_dir) / name / key
        if (unread not in secret_paths(secrets_dir, namespace, name, key)
                and unread in secret_paths(secrets_dir, UNNAMESPACED_SECRETS, name, key) and unread.is_file()):
            return (f"; {unread} is not read for namespace {namespace!r} (a secret there is the "
                    f"{UNNAMESPACED_SECRETS!r} namespace's): put it in {Path(secrets_dir) / namespace / name / key}")
    for name, key in refs:
        paths = secret_paths(secrets_dir, namespace, name, key)
        if any(path.is_file() for path in paths):
            continue
        looked = f"; looked for {' and '.join(str(path) for path in paths)}"
        if name.startswith(f"{namespace}."):  # the bridge writes its copies: nothing for the user to put there
            return looked
        return f"{looked}: write the key to {paths[0]} (SHOAL_SECRETS_DIR/<namespace>/<secret>/<key>)"
    return ""


def mount_location(dataset: Dataset, mount: Mount, defaults: S3Settings, pvc_root: str = "",
                   local_roots: Sequence[str] = ()) -> Location:
    """The location of ``mount`` with its secrets read from ``defaults.secrets_dir`` (``read_secrets``), as the
    dataset service lists it and the agent reads it: one function, so a key missing on a node says what the
    dataset's status says for the service's (the agent's said only "has no key", not where it looked). A missing or
    unusable key is ``MissingSecret`` naming the mount (its URL's credentials hidden) and ``missing_secret_hint``'s
    paths: never what a file holds."""
    namespace = dataset.metadata.namespace
    refs = secret_refs(dataset, mount)
    try:
        return resolve_location(dataset, mount, read_secrets(defaults.secrets_dir, namespace, refs), defaults,
                                pvc_root=pvc_root, local_roots=local_roots)
    except MissingSecret as err:
        hint = missing_secret_hint(defaults.secrets_dir, namespace, refs)
        raise MissingSecret(strip_userinfo(f"mount {mount.mount_point}: {err}{hint}")) from None


def local_location_error(location: LocalLocation, local_roots: Sequence[str]) -> str | None:
    """Why the folder of a ``local://`` or ``pvc://`` location may not be listed or mounted here, or None.

    ``local://``: its real path must lie below ``local_roots`` (SHOAL_LOCAL_ROOTS). ``pvc://``: the claim's folder
    must exist (else the claim does not exist, or is not mounted here) and the real path must stay inside it.
    Does I/O.
    """
    claim = location.claim_root
    if claim is None:
        return real_local_root_error(str(location.root), local_roots)
    namespace, name = claim.parent.name, claim.name
    if not os.path.isdir(claim):
        return (f"volume claim {name!r} of namespace {namespace!r} is not mounted at {str(claim)!r}: check the claim "
                "name in the mountPoint, create the PersistentVolumeClaim in the dataset's namespace, or mount it "
                "into the dataset service and the agents at SHOAL_PVC_ROOT/<namespace>/<claim>")
    if not os.path.isdir(location.root):
        sub = os.path.relpath(location.root, claim)
        return (f"folder {sub!r} does not exist in volume claim {name!r} of namespace {namespace!r}: check the "
                "mountPoint")
    real, real_claim = os.path.realpath(location.root), os.path.realpath(claim)
    if real != real_claim and not real.startswith(real_claim.rstrip("/") + "/"):
        return f"{str(location.root)!r} leads to {real!r}, outside volume claim {name!r}"
    return None
