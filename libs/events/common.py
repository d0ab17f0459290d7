"""Shared pieces of every event: object metadata, the tag convention, ids, byte quantities and times.

Schema evolution follows msgspec's rules: new fields get defaults, field types never change, and a breaking
change is a new type tag (``.v2``) decoded side by side with the old one.
"""

from __future__ import annotations

import calendar
import re
import time
import uuid
from decimal import Decimal, localcontext
from typing import Any

import msgspec

TAG_FIELD = "type"
# What decoding a payload raises when it is not the event: msgspec's two errors, RecursionError for JSON nested past
# Python's recursion limit (``[[[[...``), and UnicodeDecodeError for a string that is not UTF-8 (both found by
# fuzzing: they escaped the consumer loop and ended it).
DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeDecodeError)

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_LABEL_LENGTH = 63


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field=TAG_FIELD, forbid_unknown_fields=False):
    """Base of every message on the bus. ``id`` is also sent as ``Nats-Msg-Id`` for deduplication."""

    id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex)


class ObjectMeta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class ObjectRef(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str = "default"


def dns_label_errors(value: str, what: str, pattern: re.Pattern[str] = DNS1035_LABEL) -> list[str]:
    """Why ``value`` is not a DNS label, as sentences a person can act on (empty when it is one)."""
    kind = "DNS-1035 label" if pattern is DNS1035_LABEL else "DNS-1123 label"
    if not value:
        return [f"{what} must not be empty"]
    errors = []
    if len(value) > MAX_LABEL_LENGTH:
        errors.append(f"{what} {value!r} is longer than {MAX_LABEL_LENGTH} characters")
    if not pattern.fullmatch(value):
        start = "a lower-case letter" if pattern is DNS1035_LABEL else "a lower-case letter or digit"
        errors.append(
            f"{what} {value!r} is not a {kind}: use lower-case letters, digits and '-', "
            f"starting with {start} and ending with a letter or digit"
        )
    return errors


_BINARY_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


def format_bytes(size: int) -> str:
    """Human size like Fluid's status strings ("13.33GiB")."""
    value = float(size)
    for unit in _BINARY_UNITS:
        if round(value, 2) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?(B)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def parse_quantity(value: str | int) -> int:
    """A Kubernetes byte quantity ("4Mi", "2Gi", "500M", 1024) in bytes; "4MiB"-style suffixes also pass."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a quantity (examples: 4Mi, 2Gi, 500M)")
    number, unit, _ = match.groups()
    with localcontext() as exact:
        exact.prec = 80  # enough digits that no quantity is rounded before the whole-number check
        parsed = Decimal(number) * _QUANTITY_FACTORS[unit]
    if parsed != parsed.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(parsed)


# Every time a status writes (Kubernetes' metav1.Time: RFC 3339, UTC, whole seconds).
_RFC3339 = "%Y-%m-%dT%H:%M:%SZ"
# The last second RFC 3339 can write (9999-12-31T23:59:59Z).
LAST_RFC3339 = 253_402_300_799.0


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339, the fraction dropped. A time outside the calendar's range (a node's
    broken clock, nanoseconds sent as seconds, NaN) is written as its number instead: formatting it would raise, and
    fail the status of every object the time is written into."""
    if not 0 <= seconds <= LAST_RFC3339:
        return f"{seconds:.0f}"
    return time.strftime(_RFC3339, time.gmtime(seconds))


def parse_rfc3339(text: str) -> float | None:
    """The seconds since the epoch of an ``rfc3339`` time; None when empty or not in that form."""
    try:
        return float(calendar.timegm(time.strptime(text, _RFC3339)))
    except ValueError:
        return None


def to_builtins(event: Any) -> Any:
    return msgspec.to_builtins(event)
