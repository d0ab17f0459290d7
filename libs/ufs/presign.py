"""Pre-signed GET URLs for hot reads without the S3 client's request machinery, checked equal to the client's.

``generate_presigned_url`` runs the whole client for every key: parameter validation, serialisation, the
endpoint ruleset and its event hooks, about 0.4 ms of CPU per key here, once per file a cold read of small files
touches (the URLs are reused afterwards). What a URL depends on beyond its key is the same for every key of a
bucket: the address before the key, the signature version and its region. So the client signs one probe key, the
URL for the same key is built here with botocore's own query signers and key encoding, and only when the two are
equal, character for character (signed in the same second), are further keys signed here: 0.07-0.2 ms each.

Anything the probe does not explain (no explicit keys, so credentials that refresh; a signature this module does
not know; an address that does not end in the key) leaves every key to the client, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

# botocore's signers are imported where a presigner is learned, not here: libs.ufs.s3 imports this module, and a
# process that never opens an S3 client must not pay for botocore (see libs.ufs.s3's imports).

__all__ = ["Presigner", "learn_presigner"]

# Characters the client escapes or keeps in keys (the same rules as every other key), so a difference shows.
PROBE_KEY = "shoal-presign-probe/a b=c@(x)!+%ü~.bin"
# A probe signed across a second boundary differs in its date; a few tries make that unlikely to matter.
PROBE_ATTEMPTS = 3


class Presigner:
    """Signs GET URLs of one bucket's keys as its client does (``learn_presigner`` made sure of it)."""

    def __init__(self, base: str, signer: Callable[[], Any], auth_base: str | None = None) -> None:
        from botocore.awsrequest import AWSRequest
        from botocore.utils import percent_encode

        self._base = base
        self._signer = signer  # a new botocore query signer (they keep per-request state)
        # Signature version 2 signs "/bucket/key" even when the bucket is in the host name (virtual hosting).
        self._auth_base = auth_base
        self._request = AWSRequest
        self._encode = percent_encode

    def url(self, key: str) -> str:
        """The pre-signed GET URL of ``key`` (the whole key, any prefix included)."""
        encoded = self._encode(key, safe="/~")
        request = self._request(method="GET", url=self._base + encoded)
        if self._auth_base is not None:
            request.auth_path = self._auth_base + encoded
        self._signer().add_auth(request)
        return str(request.url)


def _candidates(client_url: str, bucket: str, access_key: str, secret_key: str, expires: int) -> list[Presigner]:
    """The signers that may give ``client_url`` for the probe key; none if the URL is not of a known kind."""
    from botocore.auth import HmacV1QueryAuth, S3SigV4QueryAuth
    from botocore.credentials import Credentials
    from botocore.utils import percent_encode

    address, _, query = client_url.partition("?")
    encoded_key = percent_encode(PROBE_KEY, safe="/~")
    if not address.endswith("/" + encoded_key):
        return []
    base = address[: -len(encoded_key)]
    params = parse_qs(query)
    credentials = Credentials(access_key, secret_key)
    if params.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"]:
        scope = params.get("X-Amz-Credential", [""])[0].split("/")
        if len(scope) != 5:
            return []
        region, service = scope[2], scope[3]
        return [Presigner(base, lambda: S3SigV4QueryAuth(credentials, service, region, expires=expires))]
    if "AWSAccessKeyId" in params and "Signature" in params:
        def signer() -> Any:
            return HmacV1QueryAuth(credentials, expires=expires)
        # The bucket in the path, or in the host name with the path it stands for signed.
        return [Presigner(base, signer), Presigner(base, signer, auth_base=f"/{bucket}/")]
    return []


async def learn_presigner(client_presign: Callable[[str], Awaitable[str]], bucket: str, access_key: str,
                          secret_key: str, expires: int) -> Presigner | None:
    """A ``Presigner`` whose URL for the probe key equals ``client_presign(PROBE_KEY)``'s, or None.

    ``client_presign(key)`` is the client's pre-signed GET of that key of ``bucket`` with ``expires`` seconds;
    explicit keys only (credentials from botocore's chain may refresh, which this module would not see)."""
    if not access_key or not secret_key:
        return None
    for _ in range(PROBE_ATTEMPTS):
        expected = await client_presign(PROBE_KEY)
        candidates = _candidates(expected, bucket, access_key, secret_key, expires)
        if not candidates:
            return None
        for candidate in candidates:
            if candidate.url(PROBE_KEY) == expected:
                return candidate
    return None
