"""The sampling policy: its document, its validation errors, its clock and its filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vims.errors import InputError
from vims.tracing_policy import Policy, Sampler

S = 1_000_000_000
MS = 1_000_000


def test_defaults_trace_everything() -> None:
    p = Policy.from_dict({})
    assert p.mode == "full" and p.duty == 1.0 and p.max_events_per_s is None
    assert p.wants("anything")
    s = Sampler(p, start_ns=0)
    assert s.armed(0) and s.armed(123 * S) and s.next_change(7) is None


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"mode": "half"}, "mode"),
        ({"mode": 3}, "mode"),
        ({"mode": "duty-cycle", "window_ms": 0}, "window_ms"),
        ({"mode": "duty-cycle", "window_ms": 200, "period_ms": 100}, "window_ms"),
        ({"mode": "duty-cycle", "period_ms": -1}, "period_ms"),
        ({"window_ms": "10"}, "window_ms"),
        ({"window_ms": True}, "window_ms"),
        ({"period_ms": float("nan")}, "period_ms"),
        ({"include": [1]}, "include"),
        ({"exclude": {"a": 1}}, "exclude"),
        ({"max_events_per_s": -5}, "max_events_per_s"),
        ({"version": 2}, "version"),
        ({"colour": "red"}, "colour"),
        ({"include_calls": ["open_at"]}, "include_calls"),
        ({"exclude_calls": [5000]}, "exclude_calls"),
        ({"exclude_calls": [True]}, "exclude_calls"),
        ({"include_calls": {"read": 1}}, "include_calls"),
    ],
)
def test_errors_name_the_field(doc: dict, field: str) -> None:
    with pytest.raises(InputError, match=f"'{field}'") as info:
        Policy.from_dict(doc, where="remote")
    assert str(info.value).startswith("remote: ")


def test_not_an_object() -> None:
    with pytest.raises(InputError, match="JSON object"):
        Policy.from_dict([1, 2])  # type: ignore[arg-type]


def test_round_trip_through_json_and_toml(tmp_path: Path) -> None:
    p = Policy.from_dict({"mode": "duty_cycle", "window_ms": 20, "period_ms": 200,
                          "include": "httpd", "exclude": ["sh"], "max_events_per_s": 500})
    assert p.mode == "duty-cycle" and p.include == ("httpd",)
    j = tmp_path / "p.json"
    j.write_text(json.dumps(p.to_dict()))
    assert Policy.load(j) == p
    t = tmp_path / "p.toml"
    t.write_text('mode = "duty-cycle"\nwindow_ms = 20\nperiod_ms = 200\ninclude = ["httpd"]\n'
                 'exclude = ["sh"]\nmax_events_per_s = 500\n')
    assert Policy.load(t) == p


def test_load_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "mode": "full",\n  oops\n}')
    with pytest.raises(InputError, match=r"bad.json:3: not JSON"):
        Policy.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"window_ms": -1}')
    with pytest.raises(InputError, match=r"wrong.json: field 'window_ms'"):
        Policy.load(wrong)
    with pytest.raises(InputError, match="cannot read the policy"):
        Policy.load(tmp_path / "absent.json")
    toml = tmp_path / "bad.toml"
    toml.write_text("mode = \n")
    with pytest.raises(InputError, match="not TOML"):
        Policy.load(toml)


def test_program_filters() -> None:
    p = Policy(include=("httpd", "busybox*"), exclude=("busybox-old",))
    assert p.wants("httpd") and p.wants("busybox") and p.wants("busybox2")
    assert not p.wants("busybox-old") and not p.wants("sh") and not p.wants("httpd2")
    s = Sampler(p, start_ns=0)
    kept = [c for c in ["httpd", "sh", "busybox", "cat"] if s.admit(c, 1)]
    assert kept == ["httpd", "busybox"] and s.filtered == 2


def test_call_filters_by_name_or_number() -> None:
    p = Policy.from_dict({"include_calls": ["read", "openat", 1, "sys_335"], "exclude_calls": "write"})
    assert p.filters_calls and not Policy().filters_calls
    assert [nr for nr in range(400) if p.wants_call(nr)] == [0, 257, 335]
    assert Policy.from_dict(p.to_dict()) == p and p.to_dict()["include_calls"] == ["read", "openat", 1, "sys_335"]
    s = Sampler(p, start_ns=0)
    kept = [nr for nr in (0, 1, 2, 257, 0) if s.admit("sh", 1, nr)]
    assert kept == [0, 257, 0] and s.filtered == 2
    assert s.admit("sh", 1)  # a caller that gives no number is judged on its program only


def test_unknown_call_names_the_call() -> None:
    with pytest.raises(InputError, match=r"unknown system call 'opne'.*x86_64 names") as info:
        Policy.from_dict({"exclude_calls": ["read", "opne"]}, where="remote")
    assert str(info.value).startswith("remote: field 'exclude_calls'")


def test_duty_cycle_clock() -> None:
    s = Sampler(Policy(mode="duty-cycle", window_ms=100, period_ms=1000), start_ns=5 * S)
    assert s.armed(5 * S) and s.armed(5 * S + 99 * MS) and not s.armed(5 * S + 100 * MS)
    assert not s.armed(5 * S + 999 * MS) and s.armed(6 * S)
    assert s.next_change(5 * S + 10 * MS) == 5 * S + 100 * MS
    assert s.next_change(5 * S + 500 * MS) == 6 * S


@given(window=st.integers(1, 1000), extra=st.integers(0, 1000),
       times=st.lists(st.integers(0, 10**11), min_size=1, max_size=50))
def test_duty_fraction_and_edges(window: int, extra: int, times: list[int]) -> None:
    period = window + extra
    p = Policy(mode="duty-cycle", window_ms=window, period_ms=period)
    s = Sampler(p, start_ns=0)
    for t in times:
        edge = s.next_change(t)
        assert edge is not None and edge > t
        # Nothing changes before the announced edge; at it, the state flips unless duty is 100%.
        assert s.armed(edge - 1) == s.armed(t)
        if window < period:
            assert s.armed(edge) != s.armed(t)
    armed = sum(s.armed(t) for t in range(0, period * MS * 3, MS))
    assert armed == 3 * window


def test_rate_cap_counts_and_disarms() -> None:
    s = Sampler(Policy(max_events_per_s=3), start_ns=0)
    results = [s.admit("x", t) for t in range(5)]
    assert results == [True, True, True, False, False]
    assert s.capped == 2
    # Cap reached: the trap may come off until the next second.
    assert not s.armed(10) and s.next_change(10) == S
    assert s.armed(S) and s.admit("x", S + 1)
