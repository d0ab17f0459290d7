"""Byte quantities, human sizes, DNS labels and the retry back-off: small pure helpers shared by every service."""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.bus import retry_delay
from libs.events.common import (
    DNS1035_LABEL,
    DNS1123_LABEL,
    LAST_RFC3339,
    dns_label_errors,
    format_bytes,
    parse_quantity,
    parse_rfc3339,
    rfc3339,
)

# --- parse_quantity ---
# Kubernetes' resource.Quantity grammar (k8s.io/apimachinery pkg/api/resource, quantity.go), which Fluid's quota is.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1024", 1024),
        (1024, 1024),
        ("4Ki", 4 * 1024),
        ("4Mi", 4 * 1024**2),
        ("2Gi", 2 * 1024**3),
        ("1Ti", 1024**4),
        ("1Pi", 1024**5),
        ("1Ei", 1024**6),
        ("500M", 500_000_000),
        ("1k", 1000),
        ("1M", 10**6),
        ("3G", 3 * 10**9),
        ("1T", 10**12),
        ("1P", 10**15),
        ("1E", 10**18),  # exa, not an exponent
        ("1e3", 1000),
        ("1E3", 1000),
        ("1e+3", 1000),
        ("25e-1", 3),
        ("1.5Ki", 1536),
        ("0.5Gi", 512 * 1024**2),
        (".5Gi", 512 * 1024**2),
        ("1.Gi", 1024**3),
        ("+1Gi", 1024**3),
        ("-0", 0),
        ("0.0Mi", 0),
        ("007Mi", 7 * 1024**2),
        (" 4Mi ", 4 * 1024**2),  # as Kubernetes' JSON decoding of a quantity, which trims blanks
        ("7Ei", 7 * 2**60),
        ("9223372036854775807", 2**63 - 1),
        ("9223372036854775.807k", 2**63 - 1),
    ],
)
def test_parse_quantity_examples(text: str | int, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "Mi", "Gi", "abc", "4mi", "4Xi", "1K", "1KB", "4KB", "4MiB", "10B", "1 Gi",
                                  "4 Mi", "1e", "e3", "1e1.5", ".", "+", "1Gi1", "4Mi4", "0x10", "1,5Gi", "1Ki\n1",
                                  "\uff11Gi"])  # a full-width digit one
def test_parse_quantity_refuses_what_kubernetes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a quantity: write a number and an optional suffix: Ki Mi Gi Ti Pi Ei"):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["-1", "-4Mi", "-1Gi", -5, "-0.1"])
def test_parse_quantity_refuses_a_negative_size(text: str | int) -> None:
    with pytest.raises(ValueError, match="is negative: a size is 0 or more bytes"):
        parse_quantity(text)


@pytest.mark.parametrize(("text", "expected"), [("0.5", 1), ("1.1Ki", 1127), ("0.0001Ki", 1), ("1.0001k", 1001),
                                                ("1e-999999999", 1), ("1e-" + "9" * 5000, 1),
                                                ("0." + "0" * 5000 + "1", 1)])
def test_parse_quantity_rounds_a_fraction_of_a_byte_up(text: str, expected: int) -> None:
    # As Kubernetes' Quantity.Value(), with which Fluid reads a quota: a manifest Fluid takes means the same bytes.
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(("text", "written"), [("512m", "512"), ("1500m", "1500"), ("1.5m", "1.5"), ("1n", "1"),
                                               ("+2u", "2")])
def test_parse_quantity_refuses_the_suffixes_of_less_than_a_byte_naming_what_was_meant(text: str, written: str) -> None:
    # Kubernetes takes "512m" as 0.512 bytes (one, rounded up): for a size, always a slip for 512M or 512Mi.
    with pytest.raises(ValueError, match=f"less than a byte: for a size write e.g. {re.escape(written)}M .* or "
                                         f"{re.escape(written)}Mi"):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["8Ei", "9223372036854775808", "10E", "1e19", "1e999999999", "1e" + "9" * 5000,
                                  "9333912832481039Ti", "1" + "0" * 5000])
def test_parse_quantity_refuses_more_than_an_int64_of_bytes(text: str) -> None:
    # Kubernetes caps a binary quantity at 2**63-1 and overflows Value() past it; Shoal says so instead, and judges
    # the size before computing it (1e999999999 must not build a billion-digit number).
    with pytest.raises(ValueError, match="is more than 9223372036854775807 bytes"):
        parse_quantity(text)


def test_parse_quantity_refuses_a_number_python_cannot_read() -> None:
    with pytest.raises(ValueError, match="more than 1000 significant digits"):
        parse_quantity("1." + "0" * 5000 + "1")


@given(st.integers(min_value=0, max_value=2**53 - 1))
def test_parse_quantity_kibibytes(n: int) -> None:
    assert parse_quantity(f"{n}Ki") == n * 1024


@given(st.integers(min_value=0, max_value=2**22 - 1),
       st.sampled_from(["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T", "", "e0", "e3", "e6", "e9"]))
def test_parse_quantity_scales_by_the_unit(n: int, unit: str) -> None:
    assert parse_quantity(f"{n}{unit}") == n * parse_quantity(f"1{unit}")


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_parse_quantity_of_an_int_is_the_int(n: int) -> None:
    assert parse_quantity(n) == n == parse_quantity(str(n)) == parse_quantity(f"+{n}")


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=6))
def test_parse_quantity_of_a_decimal_is_its_ceiling(n: int, places: int) -> None:
    text = f"{n // 10**places}.{n % 10**places:0{places}d}" if places else str(n)
    assert parse_quantity(text) == -(-n // 10**places)
    assert parse_quantity(f"{n}e-{places}") == -(-n // 10**places)


# --- format_bytes ---


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (1024, "1.00KiB"),
        (1536, "1.50KiB"),
        (4 * 1024**2, "4.00MiB"),
        (14312928706, "13.33GiB"),
        (30 * 1024**3, "30.00GiB"),
        (1024**4, "1.00TiB"),
        (1024**5, "1.00PiB"),
        # PiB is the largest unit: bigger sizes stay in PiB rather than failing.
        (1024**6, "1024.00PiB"),
    ],
)
def test_format_bytes_examples(size: int, expected: str) -> None:
    assert format_bytes(size) == expected


_HUMAN = re.compile(r"^(?:[0-9]+B|[0-9]+\.[0-9]{2}(?:KiB|MiB|GiB|TiB|PiB))$")
_UNIT_FACTORS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}


@given(st.integers(min_value=0, max_value=2**70))
def test_format_bytes_is_close_to_the_size(size: int) -> None:
    text = format_bytes(size)
    assert _HUMAN.match(text), text
    number, unit = re.match(r"^([0-9.]+)(\D+)$", text).groups()  # type: ignore[union-attr]
    # Two decimals of the unit: within half a hundredth of the unit (plus float slack).
    assert abs(float(number) * _UNIT_FACTORS[unit] - size) <= 0.005 * _UNIT_FACTORS[unit] + size * 1e-12


@given(st.integers(min_value=0, max_value=2**60), st.integers(min_value=0, max_value=2**60))
def test_format_bytes_never_reports_a_larger_size_as_smaller(a: int, b: int) -> None:
    small, large = sorted((a, b))
    number_s, unit_s = re.match(r"^([0-9.]+)(\D+)$", format_bytes(small)).groups()  # type: ignore[union-attr]
    number_l, unit_l = re.match(r"^([0-9.]+)(\D+)$", format_bytes(large)).groups()  # type: ignore[union-attr]
    assert float(number_s) * _UNIT_FACTORS[unit_s] <= float(number_l) * _UNIT_FACTORS[unit_l]


# --- times ---


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        # The fraction is dropped, not rounded: a time is never written as a second that has not come yet.
        (1.999, "1970-01-01T00:00:01Z"),
        (1_714_564_800.0, "2024-05-01T12:00:00Z"),
        (1_714_564_800.75, "2024-05-01T12:00:00Z"),
        (LAST_RFC3339, "9999-12-31T23:59:59Z"),
        # Outside the calendar (a broken clock, nanoseconds sent as seconds): the number, not an exception.
        (LAST_RFC3339 + 1, "253402300800"),
        (1.7e18, "1700000000000000000"),
        (-1.0, "-1"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (math.nan, "nan"),
    ],
)
def test_rfc3339_examples(seconds: float, expected: str) -> None:
    assert rfc3339(seconds) == expected


@given(st.floats(min_value=0, max_value=LAST_RFC3339))
def test_rfc3339_within_the_calendar_is_the_utc_second_and_reads_back(seconds: float) -> None:
    assert rfc3339(seconds) == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    assert parse_rfc3339(rfc3339(seconds)) == math.floor(seconds)


@pytest.mark.parametrize("text", ["", "253402300800", "nan", "2024-05-01 12:00:00", "2024-05-01T12:00:00+02:00"])
def test_parse_rfc3339_of_anything_else_is_none(text: str) -> None:
    assert parse_rfc3339(text) is None


# --- DNS labels ---


@pytest.mark.parametrize("value", ["a", "abc", "a-b", "a1", "imagenet-2012", "a" * 63])
def test_dns1035_labels_accepted(value: str) -> None:
    assert dns_label_errors(value, "metadata.name") == []


@pytest.mark.parametrize("value", ["", "A", "1abc", "-abc", "abc-", "a_b", "a.b", "a" * 64, "ab c"])
def test_dns1035_labels_rejected(value: str) -> None:
    errors = dns_label_errors(value, "metadata.name")
    assert errors
    assert all(e.startswith("metadata.name") for e in errors)


def test_dns1123_label_may_start_with_a_digit() -> None:
    assert dns_label_errors("1abc", "metadata.namespace", DNS1123_LABEL) == []
    assert dns_label_errors("1abc", "metadata.name", DNS1035_LABEL) != []


def test_dns_label_errors_name_the_field_and_the_value() -> None:
    (error,) = dns_label_errors("Bad_Name", "metadata.name")
    assert "metadata.name" in error
    assert "'Bad_Name'" in error
    assert "DNS-1035" in error


def test_dns_label_with_a_trailing_newline_is_rejected() -> None:
    # BUG (libs/events/common.py, dns_label_errors): ``pattern.match`` with a ``$`` anchor accepts a trailing
    # "\n", so "abc\n" passes as a DNS label. It should be rejected (fullmatch, or \Z instead of $).
    assert dns_label_errors("abc\n", "metadata.name") != []
    assert dns_label_errors("abc\n", "metadata.namespace", DNS1123_LABEL) != []


# --- retry_delay ---


def test_retry_delay_examples() -> None:
    assert [retry_delay(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_retry_delay_treats_missing_delivery_counts_as_the_first() -> None:
    assert retry_delay(0) == retry_delay(1) == 0.5
    assert retry_delay(-3) == 0.5


@given(st.integers(min_value=0, max_value=1000))
def test_retry_delay_grows_and_is_capped(deliveries: int) -> None:
    delay = retry_delay(deliveries)
    assert 0.5 <= delay <= 30.0
    assert retry_delay(deliveries + 1) >= delay
    assert isinstance(delay, float)


@pytest.mark.parametrize("deliveries", [1025, 1026, 5000, 10**6])
def test_retry_delay_stays_capped_for_very_many_deliveries(deliveries: int) -> None:
    # BUG (libs/bus.py, retry_delay): ``0.5 * 2 ** (deliveries - 1)`` converts a huge int to float and raises
    # OverflowError from deliveries=1025 on (reachable with a large SHOAL_MAX_DELIVER). Expected: 30.0.
    assert retry_delay(deliveries) == 30.0
