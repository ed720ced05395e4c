"""The targets' HTTP transport (adapter/http_transport.py) against real sockets, on asyncio's loop and on uvloop
(the delivery workers'): TLS, kept-alive connections the server closes, timeouts, refusals, large bodies."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
import trustme
import uvloop
from pytest_httpserver import HTTPServer

from adapter.config import TargetSettings
from adapter.http_transport import AsyncioBackend, asyncio_transport
from adapter.targets import build_target

T = TypeVar("T")
LIMITS = httpx.Limits(max_connections=2, max_keepalive_connections=2)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a test's coroutine on one of the two event loops Homeward delivers on."""
    if request.param == "uvloop":
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


def client(verify: ssl.SSLContext | bool = True, read: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=asyncio_transport(verify, LIMITS), timeout=httpx.Timeout(read, connect=5.0))


@contextlib.asynccontextmanager
async def server(handle: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw HTTP/1.1 server on a free port: its URL, and the client ports of the connections it accepted."""
    peers: list[int] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[1])
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(accepted, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/fhir", peers
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    return await reader.readexactly(length)


def response(body: bytes, close: bool = False) -> bytes:
    connection = b"close" if close else b"keep-alive"
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s" % (len(body), connection, body)


def test_requests_share_a_kept_alive_connection(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """Three POSTs in a row: each answered with its own body, all over one connection."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(response(b"got " + await read_request(reader)))
            await writer.drain()

    async def body() -> None:
        async with server(echo) as (url, peers), client() as http:
            for n in range(3):
                answer = await http.post(url, content=b"bundle %d" % n)
                assert (answer.status_code, answer.content) == (200, b"got bundle %d" % n)
            assert len(peers) == 1

    run(body())


def test_a_connection_the_server_closed_while_idle_is_not_reused(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """The server closes each kept-alive connection once it has answered (as a load balancer's idle timeout
    does): the next POST goes over a new connection and succeeds, rather than failing on the dead one."""

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"ok"))  # says keep-alive, then closes anyway
        await writer.drain()

    async def body() -> None:
        async with server(once) as (url, peers), client() as http:
            for _ in range(3):
                assert (await http.post(url, content=b"x")).content == b"ok"
                await asyncio.sleep(0.05)  # the close reaches the client while the connection is idle
            assert len(set(peers)) == 3

    run(body())


def test_large_bodies_both_ways(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """A 3 MB request and a 3 MB answer arrive whole (the write hold, the transport's back-pressure and the
    read high-water mark are all crossed)."""
    big = bytes(range(256)) * (3 * 4096)

    async def mirror(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(response(await read_request(reader)))
            await writer.drain()

    async def body() -> None:
        async with server(mirror) as (url, _), client() as http:
            answer = await http.post(url, content=big)
            assert answer.content == big
            assert (await http.post(url, content=b"small")).content == b"small"

    run(body())


def test_timeouts_and_refusals_are_httpx_errors(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """A server that never answers is a ReadTimeout; a port nobody listens on is a ConnectError; a server that
    hangs up mid-answer is a RemoteProtocolError: the errors the targets map to a retryable failure."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async def body() -> None:
        async with server(silent) as (url, _), client(read=0.2) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(url, content=b"x")
        async with server(hang_up) as (url, _), client() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(url, content=b"x")
        async with server(silent) as (url, _):
            pass  # closed: its port now refuses
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.post(url, content=b"x")

    run(body())


def test_tls_with_the_servers_ca_and_not_without(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """Over TLS, with the server's CA trusted, the POST is answered; with the system's CAs only, it fails the
    handshake as a ConnectError."""
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    tls = HTTPServer(host="127.0.0.1", port=0, ssl_context=context)
    tls.expect_request("/fhir", method="POST", data=b"over tls").respond_with_data("ok")
    tls.start()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)

    async def body() -> None:
        async with client(trusting) as http:
            assert (await http.post(tls.url_for("/fhir"), content=b"over tls")).content == b"ok"
        async with client(True) as http:
            with pytest.raises(httpx.ConnectError):
                await http.post(tls.url_for("/fhir"), content=b"over tls")

    try:
        run(body())
    finally:
        tls.clear()
        tls.stop()


def test_fhir_targets_send_over_this_transport() -> None:
    """httpx has no parameter for httpcore's network backend, so asyncio_transport swaps the pool httpx made:
    this fails if a new httpx stops keeping it where the swap puts it (the speed-up would be lost silently)."""

    async def body() -> None:
        target = build_target(TargetSettings(name="t", base_url="http://127.0.0.1:9/fhir"))
        try:
            transport = target.client._transport  # type: ignore[attr-defined]
            assert isinstance(transport._pool._network_backend, AsyncioBackend)
        finally:
            await target.aclose()

    asyncio.run(body())
