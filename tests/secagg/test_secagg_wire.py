"""Wire format: round trips, and rejection of truncated, trailing, mis-bound, mis-sized and replayed
messages."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import wire
from secagg.errors import MessageRejected
from secagg.keys import SERVER_ID
from secagg.wire import Kind

RUN = bytes(range(16))


def _msg(kind: Kind = Kind.UNMASK_REQUEST, payload: bytes = b"\x00\x00\x00\x00", rnd: int = 4) -> bytes:
    return wire.pack(kind, RUN, rnd, SERVER_ID, 7, payload)


def _open(data: bytes, **overrides: object) -> wire.Envelope:
    kw: dict[str, object] = {
        "kind": Kind.UNMASK_REQUEST,
        "run_id": RUN,
        "round_number": 4,
        "recipient": 7,
        "sender": SERVER_ID,
    }
    kw.update(overrides)
    return wire.unpack(data, **kw)  # type: ignore[arg-type]


def test_header_layout_is_as_documented() -> None:
    data = _msg(payload=b"abcd")
    assert wire.HEADER_BYTES == 52 and len(data) == 56
    assert data[:4] == b"FMSA" and data[4] == 1 and data[5] == Kind.UNMASK_REQUEST
    assert data[8:24] == RUN and struct.unpack_from("<QQQI", data, 24) == (4, SERVER_ID, 7, 4)
    env = _open(data)
    assert env.payload == b"abcd" and env.sender == SERVER_ID


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\x00", "trailing"),
        (lambda d: d[:30], "truncated header"),
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x02" + d[5:], "version"),
        (lambda d: d[:5] + bytes([Kind.SHARE_KEYS]) + d[6:], "expected a UNMASK_REQUEST"),
        (lambda d: d[:6] + b"\x01\x00" + d[8:], "reserved"),
        (lambda d: d[:8] + bytes(16) + d[24:], "bound to run"),
        (lambda d: d[:24] + struct.pack("<Q", 3) + d[32:], "bound to round 3"),
        (lambda d: d[:40] + struct.pack("<Q", 8) + d[48:], "addressed to 8"),
        (lambda d: d[:32] + struct.pack("<Q", 99) + d[40:], "claims sender 99"),
    ],
)
def test_bad_envelopes_are_rejected(mutate, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MessageRejected, match=match):
        _open(mutate(_msg()))


UNMASK_REQUEST_PAYLOAD = wire.encode_unmask_request((1, 2), {2: bytes(range(64))})


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, wire.HEADER_BYTES + len(UNMASK_REQUEST_PAYLOAD) - 1))
def test_any_truncation_is_rejected(cut: int) -> None:
    data = _msg(payload=UNMASK_REQUEST_PAYLOAD)
    assert wire.decode_unmask_request(_open(data).payload) == ((1, 2), {2: bytes(range(64))})
    with pytest.raises(MessageRejected):
        env = _open(data[:cut])
        wire.decode_unmask_request(env.payload)


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, len(UNMASK_REQUEST_PAYLOAD) - 1))
def test_any_payload_truncation_is_rejected(cut: int) -> None:
    """Also when the header's length field is rewritten to match (an attacker who re-frames the message)."""
    with pytest.raises(MessageRejected):
        wire.decode_unmask_request(UNMASK_REQUEST_PAYLOAD[:cut])


def test_replay_guard() -> None:
    guard = wire.ReplayGuard()
    env = _open(_msg())
    guard.accept(env)
    with pytest.raises(MessageRejected, match="replayed"):
        guard.accept(_open(_msg()))


def test_payload_counts_are_checked() -> None:
    good = wire.encode_survivors((3, 5))
    assert wire.decode_survivors(good, "X") == (3, 5)
    with pytest.raises(MessageRejected, match="count"):
        wire.decode_survivors(struct.pack("<I", 3) + good[4:], "X")
    with pytest.raises(MessageRejected, match="twice"):
        wire.decode_survivors(wire.encode_survivors((3, 3)), "X")
    with pytest.raises(MessageRejected, match="count"):
        wire.decode_unmask_request(wire.encode_unmask_request((3, 5)) + b"\x00")
    with pytest.raises(MessageRejected, match="64-byte signature"):
        wire.decode_signature(bytes(63), "X")
    with pytest.raises(MessageRejected, match="must be 128 bytes"):
        wire.decode_key_bundle(bytes(127))
    ct = {4: bytes(wire.SHARE_CIPHERTEXT_BYTES)}
    raw = wire.encode_ciphertexts(ct)
    assert wire.decode_ciphertexts(raw, "X") == ct
    with pytest.raises(MessageRejected, match="count"):
        wire.decode_ciphertexts(raw[:-1], "X")


def test_masked_input_length_and_width_are_checked() -> None:
    words = np.arange(5, dtype=np.uint32)
    raw = wire.encode_masked_input(words, 32)
    assert np.array_equal(wire.decode_masked_input(raw, 5, 32), words)
    with pytest.raises(MessageRejected, match="vector length 5, expected 6"):
        wire.decode_masked_input(raw, 6, 32)
    with pytest.raises(MessageRejected, match="modulus bits"):
        wire.decode_masked_input(raw, 5, 64)
    with pytest.raises(MessageRejected, match="vector bytes"):
        wire.decode_masked_input(raw[:-2], 5, 32)


def test_advertise_request_round_trip_and_server_id_refused() -> None:
    req = wire.AdvertiseRequest((1, 2, 3), bytes(32), 10, 2, 0, 32)
    assert wire.decode_advertise_request(wire.encode_advertise_request(req)) == req
    checked = wire.AdvertiseRequest((1, 2, 3), bytes(32), 10, 2, 0, 32, consistency_check=True)
    raw = wire.encode_advertise_request(checked)
    assert wire.decode_advertise_request(raw) == checked
    flags_at = 4 + 32 + 8 + 4 + 4 + 1
    with pytest.raises(MessageRejected, match="unknown flags"):
        wire.decode_advertise_request(raw[:flags_at] + b"\x03" + raw[flags_at + 1 :])
    bad = wire.AdvertiseRequest((1, SERVER_ID), bytes(32), 10, 2, 0, 32)
    with pytest.raises(MessageRejected, match="server id"):
        wire.decode_advertise_request(wire.encode_advertise_request(bad))
    with pytest.raises(MessageRejected, match="trailing"):
        wire.decode_advertise_request(wire.encode_advertise_request(req) + b"\x00")


def test_secagg_library_never_imports_flwr() -> None:
    import subprocess
    import sys

    code = (
        "import sys, secagg.masking, secagg.ckks, secagg.encoding, secagg.wire; "
        "sys.exit(1 if any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
