"""The targets' HTTP transport: httpx and httpcore as they are, over asyncio's own sockets instead of anyio.

Why (tests/bench/bench_http.py, README "Design notes"): httpcore reaches asyncio through anyio, which
costs a cancel scope and a timer per read and write, a checkpoint per send and a poll() of every
pooled connection per request: about a quarter of httpx's CPU a POST to a local sink (httpx issue #3215;
httpcore declined a native asyncio backend, PR #930). HTTP itself stays
httpx + httpcore + h11; this module only moves bytes, through httpcore's public network_backend API.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Iterable
from typing import Any, cast

import httpcore
import httpx

# Reading stops while this much of a response waits unread (a large body), and resumes below a quarter.
_READ_HIGH_WATER = 256 * 1024
# Writes are held until the next read or this much is held: a request's head and body go in one send
# (one syscall, one TCP segment) instead of two.
_WRITE_HOLD = 64 * 1024

# What httpcore asks get_extra_info() for, as asyncio's transports name it.
_EXTRA_INFO = {"ssl_object": "ssl_object", "socket": "socket", "client_addr": "sockname", "server_addr": "peername"}


class _Connection(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection: asyncio's protocol callbacks on one side, httpcore's stream on the other."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._held: list[bytes] = []  # written by httpcore, not yet sent (see _WRITE_HOLD)
        self._held_size = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._reading_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None  # set while the transport's buffer is full

    # -- asyncio's side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _READ_HIGH_WATER and not self._reading_paused and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        _settle(self._data_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _settle(self._data_waiter)
        return False  # close our side too: HTTP/1.1 has nothing to say after the server's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        _settle(self._data_waiter)
        _settle(self._drain_waiter)

    def pause_writing(self) -> None:
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        _settle(waiter)

    # -- httpcore's side ------------------------------------------------------------------------

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._send_held()
        if not self._chunks and not self._eof:
            self._data_waiter = self._loop.create_future()
            try:
                if not await _wait(self._loop, self._data_waiter, timeout):
                    raise httpcore.ReadTimeout(f"no data within {timeout} s")
            finally:
                self._data_waiter = None
        if self._chunks:
            chunk = self._chunks.popleft()
            if len(chunk) > max_bytes:
                self._chunks.appendleft(chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            self._buffered -= len(chunk)
            if self._reading_paused and self._buffered < _READ_HIGH_WATER // 4 and self._transport is not None:
                self._transport.resume_reading()
                self._reading_paused = False
            return chunk
        if self._lost is not None:
            raise httpcore.ReadError(f"connection lost ({type(self._lost).__name__}: {self._lost})")
        return b""  # the server closed the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport is None or self._transport.is_closing():
            raise httpcore.WriteError("connection closed")
        self._held.append(bytes(buffer))
        self._held_size += len(buffer)
        if self._held_size >= _WRITE_HOLD:
            self._send_held()
        waiter = self._drain_waiter
        if waiter is not None and not await _wait(self._loop, waiter, timeout):
            raise httpcore.WriteTimeout(f"the server took nothing within {timeout} s")
        if self._lost is not None:
            raise httpcore.WriteError(f"connection lost ({type(self._lost).__name__})")

    def _send_held(self) -> None:
        if self._held and self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._held[0] if len(self._held) == 1 else b"".join(self._held))
        self._held.clear()
        self._held_size = 0

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()
        await asyncio.sleep(0)  # let the close reach the socket before the caller goes on

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        assert self._transport is not None
        try:
            async with asyncio.timeout(timeout):
                tls = await self._loop.start_tls(self._transport, self, ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no TLS handshake within {timeout} s") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            raise httpcore.ConnectError(f"TLS handshake failed: {exc}") from exc
        self._transport = cast(asyncio.Transport, tls)
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks of an idle pooled connection: has the server closed it (or said something)?
            # Reading never stops while idle, so that is already known here without a poll().
            return bool(self._chunks) or self._eof
        if self._transport is None:
            return None
        name = _EXTRA_INFO.get(info)
        return None if name is None else self._transport.get_extra_info(name)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on the running asyncio loop (asyncio's own or uvloop)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local_addr = (local_address, 0) if local_address else None
        connection = await _connect(
            timeout, loop.create_connection(lambda: _Connection(loop), host, port, local_addr=local_addr)
        )
        sock = connection.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return connection

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        return await _connect(timeout, loop.create_unix_connection(lambda: _Connection(loop), path))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def asyncio_transport(verify: ssl.SSLContext | bool, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (its request and response handling, its exception mapping) over AsyncioBackend."""
    context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
    transport = httpx.AsyncHTTPTransport(verify=context, limits=limits)
    # httpx has no parameter for httpcore's network_backend: the pool it made is replaced by the same
    # pool on this backend (tests/integration/test_http_transport.py fails if httpx stops using _pool).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return transport


async def _connect(timeout: float | None, connecting: Awaitable[tuple[Any, _Connection]]) -> _Connection:
    """Await a loop.create_*connection() within `timeout`, its failures as httpcore's exceptions."""
    try:
        async with asyncio.timeout(timeout):
            _, connection = await connecting
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"no connection within {timeout} s") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    return connection


def _settle(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _wait(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], timeout: float | None) -> bool:
    """Wait for `waiter`; False if `timeout` seconds passed first. A plain timer, not a cancel scope."""
    if timeout is None:
        await waiter
        return True
    expired = False

    def expire() -> None:
        nonlocal expired
        if not waiter.done():
            expired = True
            waiter.set_result(None)

    timer = loop.call_later(timeout, expire)
    try:
        await waiter
    finally:
        timer.cancel()
    return not expired
