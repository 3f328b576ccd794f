"""Models of ws2_32.dll (and wsock32.dll): the byte-order functions, which touch no socket.

``htonl``/``ntohl`` swap the four bytes of a 32-bit value and ``htons``/``ntohs``
the two bytes of a 16-bit one (x64 Windows is little-endian, the network is
big-endian); only the low bits of the argument count, and the result is
zero-extended, as ws2_32 returns a u_long/u_short. Sockets are not modelled.
"""

from __future__ import annotations

from .machine import ModelCall
from .models import model

__all__: list[str] = []

WINSOCK = ("ws2_32",)


@model("htonl", "ntohl", families=WINSOCK)
def _swap32(c: ModelCall) -> int:
    return int.from_bytes(c.arg32(0).to_bytes(4, "little"), "big")


@model("htons", "ntohs", families=WINSOCK)
def _swap16(c: ModelCall) -> int:
    return int.from_bytes((c.arg(0) & 0xFFFF).to_bytes(2, "little"), "big")
