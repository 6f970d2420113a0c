"""Ask a Kafka broker which release it runs, from the broker's own ApiVersions answer.

Kafka puts no version string on the wire. Since KRaft, though, every broker reports the
finalized ``metadata.version`` feature in ApiVersions v3, and each level belongs to one
release. librdkafka does not expose features, so this speaks the request itself (one
request, one response, no state).
"""

from __future__ import annotations

import socket
import struct

# metadata.version feature level -> release, from org.apache.kafka.server.common.MetadataVersion
# (levels 22-25 are 4.0-IV0..IV3, 26-27 are 4.1-IV0..IV1, 28-29 are 4.2-IV0..IV1).
_FIRST_LEVEL_OF_RELEASE = [
    (28, "4.2"),
    (26, "4.1"),
    (22, "4.0"),
    (21, "3.9"),
    (20, "3.8"),
    (15, "3.7"),
    (12, "3.6"),
    (9, "3.5"),
    (8, "3.4"),
    (4, "3.3"),
]


def release_of_metadata_level(level: int) -> str:
    for first, release in _FIRST_LEVEL_OF_RELEASE:
        if level >= first:
            return release if level < 30 else f">{release}"
    return "<3.3"


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def metadata_version_level(host: str, port: int, timeout: float = 5.0) -> int | None:
    """The broker's finalized metadata.version level, or None if it reports none."""
    client = b"stormline"
    body = bytes([len(client) + 1]) + client + bytes([2]) + b"1" + b"\x00"
    header = struct.pack(">hhih", 18, 3, 1, len(client)) + client + b"\x00"
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _recv(s, 4))[0]
        buf = _recv(s, size)
    pos = 4  # correlation id (ApiVersions responses keep header v0)
    (error,) = struct.unpack_from(">h", buf, pos)
    if error:
        raise RuntimeError(f"ApiVersions failed with Kafka error code {error}")
    pos += 2
    n, pos = _uvarint(buf, pos)
    for _ in range(n - 1):
        pos += 6
        pos = _skip_tags(buf, pos)
    pos += 4  # throttle time
    ntags, pos = _uvarint(buf, pos)
    for _ in range(ntags):
        tag, pos = _uvarint(buf, pos)
        length, pos = _uvarint(buf, pos)
        if tag == 2:  # FinalizedFeatures
            return _find_level(buf[pos : pos + length], "metadata.version")
        pos += length
    return None


def _find_level(buf: bytes, feature: str) -> int | None:
    n, pos = _uvarint(buf, 0)
    for _ in range(n - 1):
        name_len, pos = _uvarint(buf, pos)
        name = buf[pos : pos + name_len - 1].decode()
        pos += name_len - 1
        max_level, _min_level = struct.unpack_from(">hh", buf, pos)
        pos = _skip_tags(buf, pos + 4)
        if name == feature:
            return int(max_level)  # struct's results are typed Any; ">h" is an int
    return None


def _skip_tags(buf: bytes, pos: int) -> int:
    ntags, pos = _uvarint(buf, pos)
    for _ in range(ntags):
        _, pos = _uvarint(buf, pos)
        length, pos = _uvarint(buf, pos)
        pos += length
    return pos


def _recv(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        out += chunk
    return bytes(out)
