"""Closing a listening socket without resetting the connections the kernel has already accepted for it.

Linux completes TCP handshakes on its own and parks the connections in the listener's accept queue until the
server calls accept(). Closing the listener resets every connection still parked there, and their clients, which
already sent a request, see "connection reset" with no answer: the requests lost at the end of a drain. So:
1. attach a socket filter that drops every packet to the listener: new SYNs go unanswered (the client retransmits
   in a second, when the listener is gone, and gets a clean refusal), and the accept queue stops growing;
2. let the event loop accept what is parked (the accept queue length is read with TCP_INFO) and serve it;
3. then close the listener: nothing is left to reset.
Elsewhere than Linux the filter is skipped and the listener closes as before.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["accept_queue_length", "refuse_new_connections"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SO_ATTACH_FILTER = 26
# One classic-BPF instruction: BPF_RET | BPF_K with 0, "keep 0 bytes" = drop the packet.
_DROP_ALL = (ctypes.c_ubyte * 8).from_buffer_copy(struct.pack("HBBI", 0x06, 0, 0, 0))


def _on_socket(sock: Any, fn: Callable[[socket.socket], T]) -> T:
    """Run fn on sock; uvloop hands out pseudo-sockets, so use a dup of the descriptor (the same kernel socket)."""
    if isinstance(sock, socket.socket):
        return fn(sock)
    dup = socket.socket(fileno=socket.dup(sock.fileno()))
    try:
        return fn(dup)
    finally:
        dup.close()  # closes the dup's descriptor only


def refuse_new_connections(sock: Any) -> bool:
    """Drop new handshakes to this listener from now on; True when the filter is in place."""
    if not sys.platform.startswith("linux"):
        return False
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (native alignment pads the pointer)
    prog = struct.pack("HP", 1, ctypes.addressof(_DROP_ALL))
    try:
        _on_socket(sock, lambda s: s.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog))
        return True
    except OSError as exc:  # pragma: no cover - a kernel without socket filters
        logger.debug("could not filter the listener: %s", exc)
        return False


def accept_queue_length(sock: Any) -> int | None:
    """Connections waiting in the listener's accept queue (Linux TCP_INFO tcpi_unacked), or None if unknown."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        info = _on_socket(sock, lambda s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104))
    except OSError:
        return None
    return struct.unpack_from("I", info, 24)[0]  # 8 bytes of u8 fields, then rto, ato, snd_mss, rcv_mss, unacked
