"""The typed protocol messages: round trips, the exact bytes on the wire, and refusals."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import tracemalloc

import numpy as np
import pytest

from dllama_py.cluster import protocol as p
from dllama_py.cluster.protocol import LogitsMode, MsgType, ProtocolError
from dllama_py.engine.exchange import Readout, Segment

DIM = 8
NONCE = bytes(range(16))
SPEED = struct.Struct("<fQ")  # the end of WELCOME: matmul speed (GB/s), available RAM (bytes)


def pack(kind: MsgType, body: bytes = b"") -> bytes:
    """A payload built by hand, as root.py and worker.py built them before the typed messages."""
    return struct.pack("<4sHB", b"DLPY", 4, int(kind)) + body

PROOF = bytes(range(100, 132))


def setup_message(**changes) -> p.Setup:
    fields = dict(session="0123456789abcdef" * 2, node_index=1, addresses=["root", "10.0.0.2:9998"],
                  header=[(0, 1), (1, 4096), (2, -7)], buffer_type="q80", seq_len=64, max_batch=4,
                  kv_storage="ram", timeout_ms=2000, model_id="abc123", shares=[1.0, 2.5])
    fields.update(changes)
    return p.Setup(**fields)


def step_message(rows: int = 3, mode: LogitsMode = LogitsMode.FULL, all_logits: bool = True,
                 x: np.ndarray | None = None, slot: int = 2) -> p.Step:
    """One segment of `rows` rows in KV slot `slot` at position 12345."""
    if x is None:
        x = np.arange(rows * DIM, dtype=np.float32).reshape(rows, DIM) / 7
    readout = Readout(mode, all_logits and mode == LogitsMode.FULL, 0.5, 32000)
    return p.Step([Segment(slot, 12345, x.shape[0], readout)], x)


MESSAGES = [
    p.HelloWorker(NONCE),
    p.HelloRoot(NONCE, PROOF),
    p.Welcome(p.WelcomeStatus.OK, PROOF, 1.5, 8 << 30),
    p.Welcome(p.WelcomeStatus.AUTH_FAILED),
    p.Welcome(p.WelcomeStatus.BUSY),
    setup_message(),
    setup_message(shares=None, addresses=[], header=[]),
    p.MeshHello(NONCE, 3, PROOF),
    p.Ready(True),
    p.Ready(False),
    p.Error("no room for the KV cache: 3.2 GiB needed, 1.1 GiB available – é"),
    p.End(),
    p.SendLogits(),
    p.Loaded(),
    p.Loading(),
]


def payload(kind: MsgType, body: bytes = b"") -> bytes:
    return struct.pack("<4sHB", b"DLPY", p.VERSION, int(kind)) + body


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_reads_back_equal(message):
    assert p.read(message.encode(), type(message)) == message
    assert p.read(message.encode()) == message  # any type
    assert type(message).decode(message.encode()[p.HEADER.size:]) == message


def test_every_message_type_has_a_class():
    assert set(p.MESSAGES) == set(MsgType)
    assert all(cls.kind == kind for kind, cls in p.MESSAGES.items())
    assert list(p._SETUP_TYPES) == [f.name for f in dataclasses.fields(p.Setup)]


@pytest.mark.parametrize("mode", list(LogitsMode))
@pytest.mark.parametrize("rows", [1, 5])
def test_step_reads_back_equal_with_a_read_only_view_of_the_payload(mode, rows):
    step = step_message(rows, mode=mode, all_logits=rows > 1)
    data = step.encode()
    back = p.read(data, p.Step, dim=DIM)
    assert isinstance(back, p.Step) and back == step and back.batch == rows
    (segment,) = back.segments
    assert (segment.slot, segment.position, segment.rows) == (2, 12345, rows)
    assert segment.readout == Readout(mode, rows > 1 and mode == LogitsMode.FULL, 0.5, 32000)
    assert back.x.shape == (rows, DIM) and back.x.dtype == np.float32
    np.testing.assert_array_equal(back.x, step.x)
    assert not back.x.flags.writeable and not back.x.flags.owndata
    assert np.shares_memory(back.x, np.frombuffer(data, dtype=np.uint8))  # no copy of the payload
    assert back != step_message(rows, mode=mode, all_logits=rows > 1, x=step.x + 1)


def test_step_from_a_writable_buffer_is_still_read_only():
    buf = bytearray(step_message().encode())
    back = p.read(buf, p.Step, dim=DIM)
    assert not back.x.flags.writeable
    with pytest.raises(ValueError):
        back.x[0, 0] = 1.0


def test_step_encodes_any_float_array_and_strided_rows():
    x = np.arange(4 * 2 * DIM, dtype=np.float64).reshape(4, 2 * DIM)[:, ::2]  # not contiguous, not f32
    data = step_message(x=x).encode()
    np.testing.assert_array_equal(p.read(data, p.Step, dim=DIM).x, x.astype(np.float32))


def test_step_encode_copies_x_once():
    """The payload is built in one go: no x.tobytes() that is then copied again."""
    x = np.ones((64, 32768), dtype=np.float32)  # 8 MiB
    tracemalloc.start()
    try:
        data = step_message(x=x).encode()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == p.HEADER.size + p.STEP.size + p.SEGMENT.size + x.nbytes
    assert peak < 1.25 * x.nbytes, peak  # the payload itself, and nothing of its size besides


def test_error_is_cut_to_4000_bytes_at_a_character_boundary():
    data = p.Error("é" * 3000).encode()  # 6000 bytes of utf-8
    assert len(data) == p.HEADER.size + 4000
    assert p.read(data, p.Error).reason == "é" * 2000
    odd = p.Error("x" + "é" * 2500).encode()  # 4000 would cut an é in two
    assert len(odd) == p.HEADER.size + 3999 and p.read(odd, p.Error).reason == "x" + "é" * 1999
    assert p.read(p.Error("bad \udcff name").encode(), p.Error).reason == "bad \\udcff name"


def test_error_replaces_bad_utf8():
    assert p.read(payload(MsgType.ERROR, b"caf\xe9 \xff"), p.Error).reason == "caf\ufffd \ufffd"


def test_read_accepts_any_of_the_expected_types():
    data = p.Ready(False).encode()
    assert p.read(data, p.Ready, p.Error) == p.Ready(False)
    assert p.read(p.Error("no").encode(), p.Ready, p.Error) == p.Error("no")


def test_setup_decodes_header_as_pairs_and_shares_as_floats():
    message = p.read(setup_message(shares=[1, 2]).encode(), p.Setup)
    assert message.header == [(0, 1), (1, 4096), (2, -7)] and all(type(h) is tuple for h in message.header)
    assert message.shares == [1.0, 2.0] and all(type(s) is float for s in message.shares)


# ---- the bytes on the wire are today's --------------------------------------------------------

def test_typed_encodings_are_the_hand_made_bytes():
    assert p.HelloWorker(NONCE).encode() == pack(MsgType.HELLO_WORKER, NONCE)
    assert p.HelloRoot(NONCE, PROOF).encode() == pack(MsgType.HELLO_ROOT, NONCE + PROOF)
    assert p.Welcome(p.WelcomeStatus.OK, PROOF, 2.25, 123456789).encode() == \
        pack(MsgType.WELCOME, bytes([0]) + PROOF + SPEED.pack(2.25, 123456789))
    for status in (p.WelcomeStatus.AUTH_FAILED, p.WelcomeStatus.BUSY):
        assert p.Welcome(status).encode() == pack(MsgType.WELCOME, bytes([status]) + bytes(32 + SPEED.size))
    setup = setup_message()
    assert setup.encode() == pack(MsgType.SETUP, json.dumps(setup.__dict__).encode("utf-8"))
    hello = NONCE + struct.pack("<I", 3) + PROOF
    assert p.MeshHello(NONCE, 3, PROOF).encode() == pack(MsgType.MESH_HELLO, hello)
    assert p.Ready(True).encode() == pack(MsgType.READY, bytes([p.READY_HAS_WEIGHTS]))
    assert p.Ready(False).encode() == pack(MsgType.READY, bytes([0]))
    assert p.Error("why").encode() == pack(MsgType.ERROR, "why".encode("utf-8")[:4000])
    step = step_message()
    header = p.STEP.pack(1) + p.SEGMENT.pack(2, p.STEP_ALL_LOGITS, int(LogitsMode.FULL), 3, 12345, 0.5, 32000)
    assert step.encode() == pack(MsgType.STEP, header + step.x.tobytes())
    two = p.Step([Segment(0, 7, 2, Readout(LogitsMode.ARGMAX)), Segment(5, 0, 1, Readout(LogitsMode.NONE))],
                 np.zeros((3, DIM), np.float32))
    header = p.STEP.pack(2) + p.SEGMENT.pack(0, 0, int(LogitsMode.ARGMAX), 2, 7, 1.0, 0) + \
        p.SEGMENT.pack(5, 0, int(LogitsMode.NONE), 1, 0, 1.0, 0)
    assert two.encode() == pack(MsgType.STEP, header + two.x.tobytes())
    assert p.read(two.encode(), p.Step, dim=DIM) == two
    assert p.End().encode() == pack(MsgType.END)
    assert p.SendLogits().encode() == pack(MsgType.LOGITS)
    assert p.Loaded().encode() == pack(MsgType.LOADED)
    assert p.Loading().encode() == pack(MsgType.LOADING)
    assert p.VERSION == 4 and p.HelloWorker(NONCE).encode()[:7] == b"DLPY\x04\x00\x01"


def test_logits_mode_is_the_engines():
    assert p.LogitsMode is LogitsMode


# ---- refusals ---------------------------------------------------------------------------------

def refused(data: bytes, *expected: type, match: str, dim: int | None = DIM) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.read(data, *expected, dim=dim)


@pytest.mark.parametrize("data, match", [
    (b"DLPY\x04\x00", "too short"),
    (b"XXXX\x02\x00\x01" + NONCE, "wrong magic"),
    (b"DLPY\x63\x00\x01" + NONCE, "protocol version 99, this node speaks 4"),
    (b"DLPY\x04\x00\x63", "unknown message type 99"),
    (b"DLPY\x04\x00\x00", "unknown message type 0"),
])
def test_header_refusals_say_what_is_wrong(data, match):
    refused(data, match=match)


def test_an_unexpected_type_is_refused():
    refused(p.End().encode(), p.Ready, p.Error, match="^expected READY/ERROR, got END$")
    refused(p.Loading().encode(), p.Loaded, match="^expected LOADED, got LOADING$")


@pytest.mark.parametrize("kind, body", [
    (MsgType.HELLO_WORKER, NONCE[:15]),
    (MsgType.HELLO_WORKER, NONCE + b"x"),
    (MsgType.HELLO_ROOT, NONCE + PROOF[:31]),
    (MsgType.HELLO_ROOT, NONCE + PROOF + b"x"),
    (MsgType.WELCOME, bytes([0]) + PROOF),  # version 1 had no speed
    (MsgType.WELCOME, bytes([1])),
    (MsgType.WELCOME, bytes(46)),
    (MsgType.MESH_HELLO, NONCE + struct.pack("<I", 1) + PROOF[:-1]),
    (MsgType.MESH_HELLO, b""),
    (MsgType.READY, b""),
    (MsgType.READY, b"\x00\x00"),
    (MsgType.ERROR, b"x" * 4001),
    (MsgType.END, b"\x00"),
    (MsgType.LOGITS, b"x"),
    (MsgType.LOADED, b"\x01"),
    (MsgType.LOADING, b"\x00" * 8),
])
def test_wrong_lengths_are_refused(kind, body):
    refused(payload(kind, body), match=f"malformed {kind.name}: {len(body)} bytes")


@pytest.mark.parametrize("message", [m for m in MESSAGES if m.encode()[p.HEADER.size:]] + [step_message()],
                         ids=lambda m: type(m).__name__)
def test_every_truncation_is_refused(message):
    data = message.encode()
    for n in range(p.HEADER.size, len(data)):
        if isinstance(message, p.Error):
            assert p.read(data[:n], p.Error).reason == data[p.HEADER.size:n].decode("utf-8", "replace")
        else:
            refused(data[:n], match="malformed")


@pytest.mark.parametrize("body, match", [
    (bytes([3]) + bytes(44), "unknown status 3"),
    (bytes([0]) + PROOF + SPEED.pack(float("nan"), 0), "speed nan"),
    (bytes([0]) + PROOF + SPEED.pack(float("inf"), 0), "speed inf"),
    (bytes([0]) + PROOF + SPEED.pack(-1.0, 0), "speed -1.0"),
    (bytes([1]) + PROOF + SPEED.pack(0.0, 0), "AUTH_FAILED refusal carries"),
    (bytes([2]) + bytes(32) + SPEED.pack(1.0, 0), "BUSY refusal carries"),
    (bytes([2]) + bytes(32) + SPEED.pack(0.0, 5), "BUSY refusal carries"),
])
def test_bad_welcome_values_are_refused(body, match):
    refused(payload(MsgType.WELCOME, body), p.Welcome, match=match)


def test_unknown_ready_flags_are_refused():
    refused(payload(MsgType.READY, b"\x02"), p.Ready, match="unknown flags 0x02")


def setup_body(**changes) -> bytes:
    fields = dict(setup_message().__dict__)
    fields.update(changes)
    for name in [name for name, value in changes.items() if value is DROP]:
        del fields[name]
    return json.dumps(fields).encode("utf-8")


DROP = object()


@pytest.mark.parametrize("changes, match", [
    (dict(addresses=5), "addresses must be a list of strings, got 5"),
    (dict(addresses=["a", 1]), "addresses must be a list of strings"),
    (dict(addresses="root"), "addresses must be a list of strings"),
    (dict(header="x"), "header must be a list of \\[integer, integer\\] pairs, got 'x'"),
    (dict(header=[[1, 2, 3]]), "header must be"),
    (dict(header=[[1, "2"]]), "header must be"),
    (dict(header=[[1, 2.5]]), "header must be"),
    (dict(header=[[True, 2]]), "header must be"),
    (dict(header=[5]), "header must be"),
    (dict(node_index="1"), "node_index must be an integer, got '1'"),
    (dict(node_index=True), "node_index must be an integer, got True"),
    (dict(node_index=1.0), "node_index must be an integer, got 1.0"),
    (dict(node_index=None), "node_index must be an integer, got None"),
    (dict(seq_len="64"), "seq_len must be an integer"),
    (dict(max_batch=[4]), "max_batch must be an integer"),
    (dict(timeout_ms=False), "timeout_ms must be an integer"),
    (dict(shares=["a"]), "shares must be null or a list of finite numbers"),
    (dict(shares=[True, 1]), "shares must be null"),
    (dict(shares=1.0), "shares must be null"),
    (dict(shares=[float("nan")]), "shares must be null"),
    (dict(shares=[float("inf"), 1]), "shares must be null"),
    (dict(shares=[10 ** 400]), "shares must be null"),
    (dict(session=5), "session must be a string of 32 hex digits"),
    (dict(session="ab" * 15), "session must be a string of 32 hex digits"),
    (dict(session="zz" * 16), "session must be a string of 32 hex digits"),
    (dict(session="ab " * 10 + "ab"), "session must be"),
    (dict(buffer_type=1), "buffer_type must be a string"),
    (dict(kv_storage=None), "kv_storage must be a string"),
    (dict(model_id={}), "model_id must be a string"),
    (dict(session=DROP), "no session"),
    (dict(shares=DROP), "no shares"),
    (dict(node_index=DROP, model_id=DROP), "no node_index, model_id"),
    (dict(extra=1), "unknown field 'extra'"),
])
def test_setup_fields_of_the_wrong_type_are_refused_by_name(changes, match):
    refused(payload(MsgType.SETUP, setup_body(**changes)), p.Setup, match=f"malformed SETUP: {match}")


@pytest.mark.parametrize("body, match", [
    (b"", "not UTF-8 JSON"),
    (b"{", "not UTF-8 JSON"),
    (b"\xff{}", "not UTF-8 JSON"),
    (b"[" * 100_000, "not UTF-8 JSON"),
    (b"1" * 5000, "not UTF-8 JSON"),  # beyond Python's int digit limit
    (b"[1, 2]", "a JSON list, not an object"),
    (b"null", "a JSON NoneType, not an object"),
])
def test_setup_that_is_not_a_json_object_is_refused(body, match):
    refused(payload(MsgType.SETUP, body), p.Setup, match=match)


def step_body(flags=1, mode=int(LogitsMode.FULL), batch=2, position=0, temperature=1.0, vocab_limit=100,
              floats: int | None = None, segments: int = 1) -> bytes:
    n = batch * DIM * segments if floats is None else floats
    head = p.STEP.pack(segments) + p.SEGMENT.pack(0, flags, mode, batch, position, temperature, vocab_limit) * segments
    return head + np.ones(n, np.float32).tobytes()


@pytest.mark.parametrize("body, match", [
    (step_body(temperature=float("nan")), "temperature nan"),
    (step_body(temperature=float("inf")), "temperature inf"),
    (step_body(temperature=0.0), "temperature 0.0"),
    (step_body(temperature=-1.0), "temperature -1.0"),
    (step_body(batch=0), "a segment without rows"),
    (step_body(mode=4), "unknown logits mode 4"),
    (step_body(mode=255), "unknown logits mode 255"),
    (step_body(flags=2), "unknown flags 0x02"),
    (step_body(flags=1, mode=int(LogitsMode.TOPK)), "every row travel only in full"),
    (step_body(segments=0, floats=0), "0 segments"),
    (p.STEP.pack(p.MAX_SEGMENTS + 1), f"{p.MAX_SEGMENTS + 1} segments"),
    (p.STEP.pack(2) + p.SEGMENT.pack(0, 0, 0, 1, 0, 1.0, 0), "shorter than its 2 segments"),
    (step_body(floats=2 * DIM - 1), f"expected {p.STEP.size + p.SEGMENT.size + 2 * DIM * 4} for 2 rows of {DIM}"),
    (step_body(floats=2 * DIM + 1), "for 2 rows of 8"),
    (step_body(floats=3 * DIM), "for 2 rows of 8"),
    (step_body(floats=0), "for 2 rows of 8"),
    (step_body()[:-1], "for 2 rows of 8"),
    (p.STEP.pack(1)[:-1], f"shorter than its {p.STEP.size}-byte header"),
    (b"", f"shorter than its {p.STEP.size}-byte header"),
])
def test_bad_steps_are_refused(body, match):
    refused(payload(MsgType.STEP, body), p.Step, match=match)
    with pytest.raises(ProtocolError, match=match):
        p.Step.decode(body, DIM)


def test_a_step_for_another_model_width_is_refused():
    data = step_message(rows=2).encode()
    refused(data, p.Step, match="for 2 rows of 4", dim=4)  # twice the floats for width 4: still refused
    refused(data, p.Step, match="for 2 rows of 16", dim=16)


def test_read_needs_a_width_for_steps_and_message_classes():
    with pytest.raises(TypeError, match="dim="):
        p.read(step_message().encode(), p.Step)
    with pytest.raises(TypeError, match="message classes"):
        p.read(p.End().encode(), MsgType.END)
    refused(step_message().encode(), match="no model width", dim=None)  # any type, but no width


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ValueError, match="nonce must be 16 bytes"):
        p.HelloWorker(b"short").encode()
    with pytest.raises(ValueError, match="proof must be 32 bytes"):
        p.HelloRoot(NONCE, b"").encode()
    with pytest.raises(ValueError, match="session must be 16 bytes"):
        p.MeshHello(b"", 1, PROOF).encode()
    with pytest.raises(ValueError, match="BUSY Welcome carries no proof"):
        p.Welcome(p.WelcomeStatus.BUSY, PROOF).encode()
    with pytest.raises(ValueError, match="speed_gbps"):
        p.Welcome(p.WelcomeStatus.OK, PROOF, float("nan")).encode()
    with pytest.raises(ValueError, match="holding the 3 rows"):
        p.Step([Segment(0, 0, 2, Readout(LogitsMode.NONE))], np.zeros((3, DIM), np.float32)).encode()
    with pytest.raises(ValueError, match="1 to 1024"):
        p.Step([], np.zeros((3, DIM), np.float32)).encode()
    with pytest.raises(ValueError, match="1 to 65535 rows"):
        step_message(x=np.zeros((0, DIM), np.float32)).encode()
    with pytest.raises(ValueError, match="1 to 65535 rows"):
        step_message(x=np.zeros(DIM, np.float32)).encode()
    with pytest.raises(ValueError):
        step_message(mode=9).encode()


# ---- fuzz: random bytes only ever raise ProtocolError -----------------------------------------

def read_anything(data: bytes) -> None:
    try:
        p.read(data, dim=DIM)
    except ProtocolError:
        pass


def test_random_and_mutated_payloads_only_raise_protocol_errors():
    rng = random.Random(1234)
    seeds = [m.encode() for m in MESSAGES] + [step_message().encode()]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op, at = rng.randrange(3), rng.randrange(len(data) + 1)
            if op == 0 and at < len(data):
                data[at] = rng.randrange(256)
            elif op == 1:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            else:
                del data[at:at + rng.randint(1, 8)]
        read_anything(bytes(data))
    for _ in range(500):
        kind = rng.choice(list(MsgType))
        read_anything(payload(kind, rng.randbytes(rng.randint(0, 80))))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # an optional test dependency
    given = None

if given is not None:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(list(MsgType)), st.binary(max_size=200))
    def test_any_body_of_any_type_only_raises_protocol_errors(kind, body):
        read_anything(payload(kind, body))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=64))
    def test_any_bytes_only_raise_protocol_errors(data):
        read_anything(data)

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                               lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(p.Setup)] + ["x"]), json_values))
    def test_any_json_setup_only_raises_protocol_errors(changes):
        fields = dict(setup_message().__dict__)
        fields.update(changes)
        read_anything(payload(MsgType.SETUP, json.dumps(fields).encode("utf-8")))
