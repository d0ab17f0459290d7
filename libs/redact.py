"""What must never be shown: credentials in URLs and secret-looking fields, and how to hide them; how much of an
error text is shown; and how a text a terminal would act on is shown instead (``shown_text``).

Shared by every place that shows user input back (rejection reasons, status messages, logs, dead letters) and
by the CLI, which refuses clear-text secrets before they are published. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

# What stands in for a hidden value.
HIDDEN = "***"
# Error texts shown in logs, records, status messages and facts quote what a server answered, whose size a broken or
# hostile endpoint decides (megabytes of error text): cut to this, a message stays well within a NATS message and a
# log line readable, and still says what failed and where.
MAX_ERROR_CHARS = 1000

# Option and field names that hold a secret: the spellings Shoal, Fluid/Alluxio and Hadoop use, and anything
# named like a password, token or private key. ``aws.accessKeyId`` is an identifier, not a secret.
SECRET_OPTION_NAMES = frozenset({"aws.secretKey", "aws.secretAccessKey", "fs.s3a.secret.key"})
_SECRET_NAME = re.compile(r"secret|passw|token|private[-_.]?key|session[-_.]?key", re.IGNORECASE)

# scheme://userinfo@ anywhere in a text. Either a plain userinfo (no '/' before the '@'), or "user:password@"
# whose password may hold '/', '+' or '@' unescaped, as AWS secret keys do (then up to the token's last '@').
# A path with an '@' but no ':' before it ("s3://bucket/a@b") is left alone.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/?#@\s\"'<>]*|[^/?#@\s\"'<>:]*:[^\s\"'<>]*)@"
)
# A JSON string member whose name looks secret: "name": "value" (escaped quotes inside the value kept whole).
_SECRET_MEMBER = re.compile(r'("(?P<name>[^"\\]{1,200})"\s*:\s*)"(?:[^"\\]|\\.)*"')


def cut_error(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def shown_text(text: str, keep: str = "", spellings: Mapping[str, str] | None = None) -> str:
    """``text`` with each character that is not printable (control characters, Unicode's format characters such as
    bidirectional overrides, separators other than the space), bar those in ``keep``, written as Python's ``repr``
    escapes it (``\\x07``, ``\\n``, ``\\u202e``), or as ``spellings`` says for the characters it names.

    The one escaper of what is shown on a terminal: log lines (``libs.telemetry``) and the CLI's tables and messages
    (``libs.cli.render.terminal_text``, with kubectl's ``^[`` for ESC) quote what another system wrote (a key, a
    store's error, an annotation), and a character acted on there recoloured or retitled the terminal, and a line
    break forged a line a script reads as another."""
    if text.isprintable():
        return text
    spellings = spellings or {}
    return "".join(char if char.isprintable() or char in keep else spellings.get(char) or repr(char)[1:-1]
                   for char in text)


# A request's signing values, as a server or proxy may quote them back in an error: a pre-signed URL's query
# (``X-Amz-Signature=``, ``X-Amz-Credential=``, ``X-Amz-Security-Token=``; SigV2's ``Signature=``,
# ``AWSAccessKeyId=``) and an ``Authorization`` header's ``Credential=`` and ``Signature=``. A pre-signed URL is a
# bearer ticket to its object until it expires, and a session token is a credential.
_SIGNING = re.compile(r"(?P<name>\b(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|Credential|"
                      r"AWSAccessKeyId)\b['\"]?\s*[=:]\s*['\"]?)[^\s&,;'\"<>]+", re.IGNORECASE)


def hide_signing(text: str) -> str:
    """``text`` with the values of every request-signing parameter it quotes replaced by ``***``."""
    return _SIGNING.sub(lambda match: f"{match['name']}{HIDDEN}", text)


def is_secret_name(name: str) -> bool:
    """True for an option or field name whose value must never travel in clear text."""
    return name in SECRET_OPTION_NAMES or bool(_SECRET_NAME.search(name))


def has_userinfo(url: str) -> bool:
    """True when the URL carries a user name or password (``s3://user:pass@bucket``, also unescaped)."""
    return _USERINFO.search(url) is not None


# Strict: everything between "://" and the token's last '@' (a secret with '/' and no ':' looks like a path).
_STRICT_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s\"'<>]*@")


def strip_userinfo(text: str, strict: bool = False) -> str:
    """``text`` with the user name and password of every URL in it replaced by ``***``.

    Used wherever user input is shown back: ``s3://key:SECRET@bucket/x`` becomes ``s3://***@bucket/x``.
    ``strict`` also hides whatever precedes an '@' further in (``s3://bucket/a@b`` shows as ``s3://***@b``):
    for echoing a URL a person gave, where a password with '/' cannot be told from a path.
    """
    pattern = _STRICT_USERINFO if strict else _USERINFO
    return pattern.sub(lambda match: f"{match['scheme']}{HIDDEN}@", text)


# A parameter of a URL's query or fragment (``#access_token=`` is OAuth's): its separator, name and value.
_PARAM = re.compile(r"(?P<sep>[?&#;])(?P<name>[^=&#;?]+)=(?P<value>[^&#;]*)")
# Query parameters that carry a credential besides the secret-looking names and the signing ones: Azure's SAS
# signature (``sig``) and a plain API key.
_SECRET_QUERY_NAMES = frozenset({"sig", "key", "apikey", "api_key", "api-key"})


def _secret_param(name: str) -> bool:
    return (is_secret_name(name) or name.lower() in _SECRET_QUERY_NAMES
            or _SIGNING.fullmatch(f"{name}=x") is not None)


def _query_of(url: str) -> tuple[str, str]:
    """``url`` cut where its query or fragment starts: (before, from the '?' or '#' on)."""
    cut = min((at for at in (url.find("?"), url.find("#")) if at >= 0), default=len(url))
    return url[:cut], url[cut:]


def hide_secret_query(url: str) -> str:
    """``url`` with the value of each query (or fragment) parameter that carries a credential replaced by ``***``:
    ``https://h/f/?X-Amz-Signature=***&x=1``. The rest is kept, so a refusal still shows what was refused."""
    head, tail = _query_of(url)
    return head + _PARAM.sub(lambda match: f"{match['sep']}{match['name']}={HIDDEN}"
                             if _secret_param(match["name"]) else match.group(0), tail)


def secret_query_names(url: str) -> list[str]:
    """The names of ``url``'s query (or fragment) parameters that carry a credential (``X-Amz-Signature``,
    ``token``, ``sig``, ...), in order, each once."""
    names: list[str] = []
    for match in _PARAM.finditer(_query_of(url)[1]):
        if match["value"] and _secret_param(match["name"]) and match["name"] not in names:
            names.append(match["name"])
    return names


def redact_value(value: Any) -> Any:
    """A decoded JSON value with secret-looking members hidden and URL userinfo stripped, at any depth."""
    if isinstance(value, dict):
        return {key: HIDDEN if isinstance(key, str) and is_secret_name(key) and item not in ("", None)
                else redact_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_value(item) for item in value]
    if isinstance(value, str):
        return strip_userinfo(value)
    return value


def redact_payload(payload: bytes) -> bytes:
    """A message payload safe to keep: JSON re-encoded through ``redact_value``; anything else (malformed
    JSON, not UTF-8) has secret-looking ``"name": "value"`` members and URL userinfo masked in its text.

    Only a payload that held something secret changes, so an ordinary dead letter keeps its exact bytes.
    """
    try:
        decoded = msgspec.json.decode(payload)
        redacted = redact_value(decoded)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # too deep, or not UTF-8: masked as text
        text = payload.decode("utf-8", errors="surrogateescape")
        masked = _SECRET_MEMBER.sub(
            lambda match: f'{match[1]}"{HIDDEN}"' if is_secret_name(match["name"]) else match[0], text
        )
        masked = strip_userinfo(masked)
        return payload if masked == text else masked.encode("utf-8", errors="surrogateescape")
    return payload if redacted == decoded else msgspec.json.encode(redacted)
