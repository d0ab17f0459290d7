"""Shared pieces of every event: object metadata, the tag convention, ids, byte quantities and times.

Schema evolution follows msgspec's rules: new fields get defaults, field types never change, and a breaking
change is a new type tag (``.v2``) decoded side by side with the old one.
"""

from __future__ import annotations

import calendar
import re
import time
import uuid
from typing import Any, Literal

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
# A Kubernetes label's name (a key's part after any prefix, and a non-empty value): alphanumerics, '-', '_', '.',
# starting and ending with an alphanumeric, at most 63 characters. A key's prefix is a DNS-1123 subdomain.
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
MAX_SUBDOMAIN_LENGTH = 253


def int_range(minimum: int, maximum: int | None = None) -> msgspec.Meta:
    """The values a spec's integer field accepts, stated in its JSON Schema and so in the CRDs (``libs.crds``):
    ``kubectl apply`` refuses the others before Shoal sees them. Not checked at decode (``Meta(ge=, le=)`` would):
    the service owning the field checks the same bounds and names the field in its error, and records and events
    stored before a bound was set still decode."""
    bounds = {"minimum": minimum} if maximum is None else {"minimum": minimum, "maximum": maximum}
    return msgspec.Meta(extra_json_schema=bounds)


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field=TAG_FIELD, forbid_unknown_fields=False):
    """Base of every message on the bus. ``id`` is also sent as ``Nats-Msg-Id`` for deduplication."""

    id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex)


# What an accepted apply (or scale) did to its object, in kubectl's words, as the service that holds the object
# found it when it handled the command: ``created`` (it held none), ``configured`` (what the command sets differs
# from what it held), ``unchanged``. "" on the fact of a command that sets nothing (a resync, a run) and from a
# service older than the field. The CLI prints it: a read of its own before publishing could be overtaken.
ApplyResult = Literal["", "created", "configured", "unchanged"]


def apply_result(before: object | None, after: object) -> ApplyResult:
    """The word for an apply that took what the service held of the object's applied fields from ``before`` (None:
    no object) to ``after``."""
    if before is None:
        return "created"
    return "unchanged" if before == after else "configured"


def answered_result(computed: ApplyResult, sequence: int, held_sequence: int, held_result: ApplyResult) -> ApplyResult:
    """What an apply at stream ``sequence`` answers: ``computed``, unless the record already holds this very command
    (``held_sequence``: a redelivery after its save, the first delivery's fact lost to a crash or a failed publish),
    whose result the record kept (``held_result``): computed again, it would say ``unchanged`` of the object that
    command created or configured."""
    if sequence and sequence == held_sequence and held_result:
        return held_result
    return computed


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


def label_errors(key: str, value: str) -> list[str]:
    """Why ``key=value`` is not a Kubernetes label (empty when it is one): a node carrying it could match no
    ``nodeAffinity`` a user can write, since the API server refuses such a key or value in one."""
    errors = []
    prefix, _, name = key.rpartition("/")
    if "/" in key and not (prefix and DNS1123_SUBDOMAIN.fullmatch(prefix) and len(prefix) <= MAX_SUBDOMAIN_LENGTH):
        errors.append(f"label key {key!r}: the prefix before '/' must be a DNS subdomain (lower-case letters, "
                      f"digits, '-' and '.', at most {MAX_SUBDOMAIN_LENGTH} characters), e.g. topology.kubernetes.io")
    if not (LABEL_NAME.fullmatch(name) and len(name) <= MAX_LABEL_LENGTH):
        errors.append(f"label key {key!r}: the name must be 1 to {MAX_LABEL_LENGTH} letters, digits, '-', '_' or '.', "
                      "starting and ending with a letter or digit")
    if value and not (LABEL_NAME.fullmatch(value) and len(value) <= MAX_LABEL_LENGTH):
        errors.append(f"label {key}={value!r}: a value must be empty or at most {MAX_LABEL_LENGTH} letters, digits, "
                      "'-', '_' or '.', starting and ending with a letter or digit")
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


# Kubernetes' resource.Quantity grammar (k8s.io/apimachinery pkg/api/resource, quantity.go):
#   <quantity> ::= <sign>? <number> <suffix>;  <number> ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
#   <suffix>   ::= Ki | Mi | Gi | Ti | Pi | Ei  |  n | u | m | "" | k | M | G | T | P | E  |  (e|E) <sign>? <digits>
# "1E" is an exa and "1E3" a thousand; "K" (upper case), "B" and a space are not in it. The exponent is whole, as
# Kubernetes' parser reads it.
_QUANTITY = re.compile(r"(?P<sign>[+-]?)(?P<whole>[0-9]*)(?:\.(?P<fraction>[0-9]*))?"
                       r"(?:(?P<binary>[KMGTPE])i|(?P<decimal>[numkMGTPE])|[eE](?P<exponent>[+-]?[0-9]+))?")
_BINARY_EXPONENTS = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_DECIMAL_EXPONENTS = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Suffixes of less than a byte: in Kubernetes' grammar, refused for a size (``parse_quantity``).
_BELOW_ONE = {"n": "nano", "u": "micro", "m": "milli"}
# The most bytes a quantity may say: Kubernetes reads a byte count as an int64 (Quantity.Value), and caps a binary
# quantity there; Shoal refuses more rather than cap it.
MAX_QUANTITY = 2**63 - 1
# Python will not read a longer number (int's digit limit, 4300); no size needs more than 20.
_MAX_DIGITS = 1000
_QUANTITY_FORMS = ("a number and an optional suffix: Ki Mi Gi Ti Pi Ei (powers of 1024), k M G T P E (powers of 1000) "
                   "or an exponent like e9; e.g. 4Mi, 2Gi, 500M, 0.5Gi (no space, no 'B'; 'K' is not a suffix: "
                   "k is 1000, Ki is 1024)")


def parse_quantity(value: str | int) -> int:
    """Bytes of a Kubernetes quantity ("4Mi", "2Gi", "500M", "1e9", 1024), by Kubernetes' grammar.

    A fraction of a byte is rounded up to the next whole byte ("0.5" is 1, "1.0001k" is 1001), as Kubernetes'
    ``Quantity.Value()`` does, which is what Fluid reads a quota with. Blanks around the text are ignored, as
    Kubernetes' JSON decoding of a quantity does. Refused, with a ValueError that says why: text outside the
    grammar, a negative size, more than ``MAX_QUANTITY`` bytes, and the suffixes of less than a byte (``m``, ``u``,
    ``n``: "512m" is 0.512 bytes to Kubernetes, a slip for 512M or 512Mi).
    """
    match = _QUANTITY.fullmatch(str(value).strip())
    if not match or not (match["whole"] or match["fraction"]):
        raise ValueError(f"{value!r} is not a quantity: write {_QUANTITY_FORMS}")
    fraction = (match["fraction"] or "").rstrip("0")
    significant = (match["whole"] + fraction).lstrip("0")
    if not significant:
        return 0
    if match["sign"] == "-":
        raise ValueError(f"{value!r} is negative: a size is 0 or more bytes")
    if match["decimal"] in _BELOW_ONE:
        # Kubernetes reads "512m" as 0.512 bytes and rounds it up to one byte: never what a size means.
        number = str(value).strip()[:-1].lstrip("+")
        raise ValueError(f"{value!r} is in {_BELOW_ONE[match['decimal']]}bytes ('{match['decimal']}'), less than a "
                         f"byte: for a size write e.g. {number}M (millions of bytes) or {number}Mi (MiB)")
    # value = int(significant) * 10**scale * 2**shift, kept in integers so that no digit is rounded away.
    scale, shift = -len(fraction), 0
    if match["binary"]:
        shift = _BINARY_EXPONENTS[match["binary"]]
    elif match["decimal"]:
        scale += _DECIMAL_EXPONENTS[match["decimal"]]
    elif match["exponent"]:
        # An exponent past 10**12 says the same as 10**12 below: far more than MAX_QUANTITY, or far less than a byte.
        exponent = match["exponent"].lstrip("+-").lstrip("0")
        magnitude = int(exponent or "0") if len(exponent) <= 12 else 10**12
        scale += -magnitude if match["exponent"].startswith("-") else magnitude
    too_large = ValueError(f"{value!r} is more than {MAX_QUANTITY} bytes, the most a Kubernetes quantity holds")
    digits = len(significant)
    # Judge the order of magnitude before computing a power of ten, which an exponent like 1e999999999 makes huge.
    if digits - 1 + scale > 19:  # at least 10**20 > MAX_QUANTITY
        raise too_large
    if digits > _MAX_DIGITS:
        raise ValueError(f"{value!r} has more than {_MAX_DIGITS} significant digits")
    mantissa = int(significant)
    if scale >= 0:
        size = mantissa * 10**scale << shift
    elif -scale > digits + 19:  # mantissa * 2**shift < 10**(digits + 19) <= 10**-scale: less than one byte
        size = 1
    else:
        size = -(-(mantissa << shift) // 10**-scale)  # rounded up
    if size > MAX_QUANTITY:
        raise too_large
    return size


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
