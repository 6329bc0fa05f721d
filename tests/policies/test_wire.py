import socket
import struct

import msgpack
import numpy as np
import pytest

from policies.wire import MAX_FRAME_BYTES, ProtocolError, pack, receive, send, unpack


def test_arrays_and_plain_data_cross_unchanged():
    image = np.arange(256 * 256 * 3, dtype=np.uint8).reshape(256, 256, 3)
    message = {
        "image": image,
        "strided": image[::2, 1::3, 0],  # not contiguous
        "floats": np.linspace(-1, 1, 7, dtype=np.float32),
        "doubles": np.array([[np.pi, -0.0], [1e300, -1e-300]]),
        "mask": np.array([True, False, True]),
        "ids": np.array([2**40, -3], dtype=np.int64),
        "big_endian": np.array([1.5, 2.5], dtype=">f8"),
        "scalar_array": np.array(3.25),
        "empty": np.zeros((0, 7)),
        "nested": [{"a": None, "b": "text", 3: [1, 2.5, True]}],
    }
    back = unpack(pack(message))
    for key, value in message.items():
        if isinstance(value, np.ndarray):
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            np.testing.assert_array_equal(back[key], value)
            back[key][...] = 0  # a writable copy, not a view of the frame
    assert back["nested"] == [{"a": None, "b": "text", 3: [1, 2.5, True]}]


def test_numpy_scalars_arrive_as_plain_numbers():
    back = unpack(pack({"f": np.float32(0.5), "i": np.int64(-7), "b": np.bool_(True)}))
    assert back == {"f": 0.5, "i": -7, "b": True}
    assert type(back["i"]) is int and type(back["b"]) is bool


@pytest.mark.parametrize("value, named", [(np.array([object()], dtype=object), "Python objects"),
                                          ({1, 2}, "set"), (object(), "object")])
def test_what_cannot_be_sent_is_refused_by_name(value, named):
    with pytest.raises(TypeError, match=named):
        pack({"value": value})


def test_frames_cross_a_socket_and_an_orderly_close_reads_as_none():
    a, b = socket.socketpair()
    with a, b:
        send(a, {"op": "act", "x": np.ones((2, 7))})
        send(a, {"op": "end"})
        first = receive(b)
        assert first["op"] == "act" and first["x"].shape == (2, 7)
        assert receive(b) == {"op": "end"}
        a.close()
        assert receive(b) is None


def test_a_connection_closed_inside_a_message_is_an_error():
    a, b = socket.socketpair()
    with a, b:
        data = pack({"op": "act", "x": np.ones(100)})
        a.sendall(struct.pack(">Q", len(data)) + data[:10])
        a.close()
        with pytest.raises(ConnectionError, match="middle of a message"):
            receive(b)


def test_what_is_not_a_message_of_the_protocol_is_refused():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">Q", MAX_FRAME_BYTES + 1))
        with pytest.raises(ProtocolError, match="frame of"):
            receive(b)
    with pytest.raises(ProtocolError, match="must be a map"):
        unpack(msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="extension type 9"):
        unpack(msgpack.packb({"x": msgpack.ExtType(9, b"")}))
    with pytest.raises(ProtocolError, match="not a message"):
        unpack(b"\xc1")
