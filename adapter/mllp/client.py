"""A small blocking MLLP client: send framed messages and read each ACK (`homeward send`, tests)."""

from __future__ import annotations

import socket
import ssl

from adapter.mllp.framing import Frame, FrameReader, wrap


class MllpClient:
    """One connection; send() one message at a time and wait for its ACK, as a PAS does."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None):
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock: socket.socket = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context else raw
        self.reader = FrameReader()
        self._pending: list[bytes] = []

    def send(self, message: bytes) -> bytes:
        """Send one message (CR-separated) and return the payload of the ACK frame."""
        self.sock.sendall(wrap(message))
        return self.read_frame()

    def read_frame(self) -> bytes:
        """Block until one complete frame arrives; raise ConnectionError if the peer closes first."""
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the listener closed the connection without an ACK")
            self._pending.extend(e.payload for e in self.reader.feed(data) if isinstance(e, Frame))
        return self._pending.pop(0)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
