"""The list cursor: encoded and decoded in the API layer only."""

from __future__ import annotations

import pytest

from agent.api.cursor import decode_cursor, encode_cursor


def test_cursors_round_trip_and_reject_garbage() -> None:
    """A cursor decodes to the seq it was made from; garbage is ValueError; no next page is no cursor."""
    assert decode_cursor(encode_cursor(1234)) == 1234
    assert encode_cursor(None) is None
    for bad in ("", "zzz", "c", "cxyz"):
        with pytest.raises(ValueError):
            decode_cursor(bad)


def test_cursors_are_bounded_to_sqlite_integers() -> None:
    """A cursor is 'c' + at most 16 lowercase hex digits below 2**63; anything else is ValueError."""
    assert decode_cursor(encode_cursor(2**63 - 1)) == 2**63 - 1
    for bad in (encode_cursor(2**63), encode_cursor(2**64), "c" + "f" * 17, "c 1", "c_1", "c+1", "C1", "c1\n", "cA"):
        with pytest.raises(ValueError):
            decode_cursor(bad)
