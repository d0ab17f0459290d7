"""libs.ufs.presign: URLs signed without the client equal the client's, for awkward keys and every address form.

The client is a real aiobotocore S3 client (signing needs no network); each pair is signed in the same second
(a pair that straddles one differs in its date and is signed again)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.utils import percent_encode

from libs.ufs.presign import Presigner, learn_presigner

KEYS = ["model.bin", "year=2024/month=01/part-0.parquet", "dir/with space/ü-ß-日本.bin", "a+b%20c~d", "..//x/./y",
        *(f"odd{char}name" for char in "!$&'()*,;=@:+ ~%#?[]{}|^`\"<>\\")]
EXPIRES = 900

CONFIGS: dict[str, dict[str, Any]] = {
    "path style, endpoint, default signature": dict(endpoint_url="http://127.0.0.1:8333", region_name="us-east-1",
                                                    s3={"addressing_style": "path"}),
    "virtual host, AWS, s3v4": dict(endpoint_url=None, region_name="eu-central-1", signature_version="s3v4",
                                    s3={"addressing_style": "virtual"}),
    "path style, endpoint, s3v4": dict(endpoint_url="http://127.0.0.1:8333", region_name="eu-west-1",
                                       signature_version="s3v4", s3={"addressing_style": "path"}),
    "auto, AWS": dict(endpoint_url=None, region_name="us-west-2", s3={"addressing_style": "auto"}),
}


@pytest.fixture(params=sorted(CONFIGS))
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    options = dict(CONFIGS[request.param])
    endpoint, region = options.pop("endpoint_url"), options.pop("region_name")
    config = AioConfig(request_checksum_calculation="when_required", **options)
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id="AKID",
                                           aws_secret_access_key="SECRET/key+", config=config) as made:
        yield made


Presign = Callable[[str], Awaitable[str]]


def presign_with(client: Any, bucket: str) -> Presign:
    async def presign(key: str) -> str:
        url: str = await client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=EXPIRES)
        return url
    return presign


async def same_second_pair(presign: Presign, presigner: Presigner, key: str) -> tuple[str, str]:
    for _ in range(5):
        second = int(time.time())
        theirs, ours = await presign(key), presigner.url(key)
        if int(time.time()) == second:
            return theirs, ours
    raise AssertionError("five pairs each straddled a second")


async def test_every_key_is_signed_as_the_client_signs_it(client: Any) -> None:
    presign = presign_with(client, "bucket-1")
    presigner = await learn_presigner(presign, "bucket-1", "AKID", "SECRET/key+", EXPIRES)
    assert presigner is not None
    for key in KEYS:
        theirs, ours = await same_second_pair(presign, presigner, key)
        assert ours == theirs, key


async def test_without_explicit_keys_the_client_signs() -> None:
    # Credentials from botocore's chain may refresh: only the client knows when.
    async def never(key: str) -> str:
        raise AssertionError("not asked")
    assert await learn_presigner(never, "b", "", "", EXPIRES) is None


async def test_a_url_this_module_cannot_explain_leaves_every_key_to_the_client() -> None:
    async def unknown_signature(key: str) -> str:
        return f"http://127.0.0.1:8333/b/{key}?X-Custom-Signature=abc"

    async def key_not_in_the_path(key: str) -> str:
        return "http://127.0.0.1:8333/b/by-id/42?AWSAccessKeyId=AKID&Signature=x&Expires=1"

    async def different_signature(key: str) -> str:  # what the client would say if its canonical form differed
        return f"http://127.0.0.1:8333/b/{percent_encode(key, safe='/~')}?AWSAccessKeyId=AKID&Signature=x&Expires=1"

    for presign in (unknown_signature, key_not_in_the_path, different_signature):
        assert await learn_presigner(presign, "b", "AKID", "SECRET", EXPIRES) is None, presign.__name__
