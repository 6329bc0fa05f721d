"""Messages between a policy server (``bench serve``) and its clients (the ``remote`` policy).

A message is a msgpack map sent as one frame: its length as 8 bytes (big-endian), then its
bytes. numpy arrays travel as msgpack extensions holding their dtype, shape and raw bytes, so
images and action chunks cross without conversion; numpy scalars become plain numbers.
msgpack carries data only, so a message cannot make its reader run code (unlike pickle).
"""

from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np

PROTOCOL = 1  # raised when a message's meaning changes; client and server must agree
MAX_FRAME_BYTES = 1 << 30
_ARRAY = 1  # msgpack extension type of a numpy array
_LENGTH = struct.Struct(">Q")


class ProtocolError(RuntimeError):
    """A peer sent something that is not a message of this protocol."""


def _encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"an array of Python objects cannot be sent (dtype {obj.dtype})")
        # A binary header (dtype string, then the shape): a scene's state holds hundreds of
        # small arrays, and a text header took as long to read as the arrays themselves.
        dtype = obj.dtype.str.encode()
        header = struct.pack(f"<B{len(dtype)}sB{obj.ndim}q", len(dtype), dtype, obj.ndim, *obj.shape)
        return msgpack.ExtType(_ARRAY, header + obj.tobytes())  # in C order, whatever the strides
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"a value of type {type(obj).__name__} cannot be sent in a message")


def _decode(code: int, data: bytes):
    if code != _ARRAY:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    size = data[0]
    dtype = np.dtype(data[1:1 + size].decode())
    ndim = data[1 + size]
    start = 2 + size + 8 * ndim
    shape = struct.unpack_from(f"<{ndim}q", data, 2 + size)
    # A copy: arrays viewing the frame would be read-only.
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape).copy()


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def unpack(data: bytes) -> dict:
    try:
        message = msgpack.unpackb(data, ext_hook=_decode, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"not a message of this protocol: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, got {type(message).__name__}")
    return message


def send(sock: socket.socket, message: dict) -> None:
    data = pack(message)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def receive(sock: socket.socket) -> dict | None:
    """The next message, or None when the peer closed the connection between messages."""
    head = _read(sock, _LENGTH.size, allow_end=True)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {size} bytes announced (at most {MAX_FRAME_BYTES}): not this protocol")
    return unpack(_read(sock, size))


def _read(sock: socket.socket, size: int, allow_end: bool = False) -> bytes | None:
    parts, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            if allow_end and left == size:
                return None
            raise ConnectionError(f"the connection closed in the middle of a message ({size - left} of {size} bytes)")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
