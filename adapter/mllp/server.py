"""The asyncio MLLP listener: per connection, read frames, await the handler, write its ACK.

A sender waits for each ACK before the next message, so frames on one connection are handled
one at a time, in order. On shutdown the listener stops accepting, lets each connection finish
the frame it is handling, and closes idle connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Protocol

import structlog

from adapter.config import MllpSettings
from adapter.errors import ConfigError
from adapter.mllp.framing import Frame, FrameReader, Junk, OversizeFrame, UnterminatedFrame, wrap

log = structlog.get_logger("homeward.mllp")

READ_CHUNK = 65536
# Intake workers share one listening socket (adapter/workers.py), and the kernel wakes every worker for
# each new connection: the first to call accept() takes it, so one worker would take a whole burst of
# connections while the other idles (8 of 8, measured). A worker first waits this long for each
# connection it already serves, so the less busy worker takes the next one.
ACCEPT_DELAY_SECONDS = 0.002


class FrameHandler(Protocol):
    """What the listener needs from intake."""

    async def frame(self, payload: bytes, peer: str) -> bytes: ...

    async def oversize(self, head: bytes, size: int, peer: str) -> bytes: ...

    async def incomplete(self, partial: bytes, peer: str, reason: str) -> None: ...


class MllpServer:
    """Listens on host:port (port 0 picks a free one; read `.port` after start())."""

    def __init__(
        self,
        handler: FrameHandler,
        host: str,
        port: int,
        *,
        max_frame_bytes: int,
        idle_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 64,
        sock: socket.socket | None = None,
    ):
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        # An intake worker accepts on a socket its serve process bound (adapter/workers.py).
        self.sock = sock
        self._server: asyncio.Server | None = None
        self._accepting: asyncio.Task[None] | None = None  # a worker's accept loop (given `sock`)
        self._connections: dict[asyncio.Task[None], bool] = {}  # task -> busy with a frame
        self._closing = False

    @property
    def port(self) -> int:
        if self.sock is not None:
            return int(self.sock.getsockname()[1])
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        """Bound and accepting connections (for /readyz)."""
        if self._accepting is not None:
            return not self._accepting.done() and not self._closing
        return self._server is not None and self._server.is_serving() and not self._closing

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self.sock is not None:
            self.sock.setblocking(False)
            self._accepting = asyncio.create_task(self._accept_shared(self.sock))
        elif self.ssl_context is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.requested_port, limit=READ_CHUNK)
        else:
            # The handshake is run per connection (_tls) rather than by the server, so a failed one
            # (no or wrong client certificate) is logged here; asyncio would only debug-log it.
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _TlsGate(self), self.host, self.requested_port)
        log.info("mllp.listening", host=self.host, port=self.port, tls=self.ssl_context is not None)

    async def _accept_shared(self, sock: socket.socket) -> None:
        """Accept on a socket other workers accept on too, one connection at a time, the less busy first."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _settle_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(sock.fileno())
            if self._connections:
                await asyncio.sleep(ACCEPT_DELAY_SECONDS * len(self._connections))
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            except OSError as exc:  # out of descriptors, say: logged, and tried again shortly
                log.warning("mllp.accept_failed", error=type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if self.ssl_context is None:
                await loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=READ_CHUNK), self._serve), conn
                )
            else:
                await loop.connect_accepted_socket(lambda: _TlsGate(self), conn)

    async def stop(self, grace: float) -> None:
        """Stop accepting; give busy connections `grace` seconds to finish their frame."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        pending = list(self._connections)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("mllp.stopped")

    async def _tls(self, transport: asyncio.BaseTransport) -> None:
        """Handshake on a new connection (reading paused since it was made), then serve it as streams."""
        assert self.ssl_context is not None and isinstance(transport, asyncio.Transport)
        loop = asyncio.get_running_loop()
        info = transport.get_extra_info("peername")
        peer = f"{info[0]}:{info[1]}" if isinstance(info, tuple) else str(info)
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            tls = await asyncio.wait_for(
                loop.start_tls(transport, protocol, self.ssl_context, server_side=True), self.idle_timeout
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            log.warning("mllp.tls_refused", peer=peer, reason=str(getattr(exc, "reason", None) or type(exc).__name__))
            transport.close()
            return
        if tls is None:  # the peer went away during the handshake
            transport.close()
            return
        protocol.connection_made(tls)
        await self._serve(reader, asyncio.StreamWriter(tls, protocol, reader, loop))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            # Bounded work: the sender reconnects later; this is logged, never silent.
            log.warning("mllp.connection_refused", peer=_peer(writer), reason="mllp.max_connections reached")
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._connections[task] = False
        try:
            await self._connection(task, reader, writer)
        finally:
            self._connections.pop(task, None)

    async def _connection(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = _peer(writer)
        bound = log.bind(peer=peer)
        if self.ssl_context is not None:
            cert = writer.get_extra_info("peercert") or {}
            subject = dict(pair[0] for pair in cert.get("subject", ()))
            bound = bound.bind(tls=True, client_cn=subject.get("commonName"))
        bound.info("mllp.connected")
        frames = FrameReader(self.max_frame_bytes)
        reason = "closed by peer"
        try:
            while not self._closing:
                try:
                    # asyncio.timeout, not wait_for: wait_for wraps every read in a Task of its own.
                    async with asyncio.timeout(self.idle_timeout):
                        data = await reader.read(READ_CHUNK)
                except TimeoutError:
                    reason = "idle timeout"
                    break
                if not data:
                    break
                self._connections[task] = True
                try:
                    for event in frames.feed(data):
                        await self._dispatch(event, peer, writer, bound)
                finally:
                    self._connections[task] = False
        except (ConnectionError, ssl.SSLError) as exc:
            reason = f"connection error ({type(exc).__name__})"
        except asyncio.CancelledError:
            reason = "shutdown"
        finally:
            if frames.in_frame and frames.pending_bytes:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.handler.incomplete(frames.take_partial(), peer, reason))
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            bound.info("mllp.disconnected", reason=reason)

    async def _dispatch(self, event: object, peer: str, writer: asyncio.StreamWriter, bound: object) -> None:
        if isinstance(event, Frame):
            ack = await self.handler.frame(event.payload, peer)
        elif isinstance(event, OversizeFrame):
            ack = await self.handler.oversize(event.head, event.size, peer)
        elif isinstance(event, UnterminatedFrame):
            await self.handler.incomplete(event.payload, peer, "missing end block")
            return
        elif isinstance(event, Junk):
            log.warning("mllp.junk_skipped", peer=peer, bytes=event.size)
            return
        else:
            return
        writer.write(wrap(ack))
        await writer.drain()


def _settle_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _TlsGate(asyncio.Protocol):
    """A new TLS connection: stop reading at once (the ClientHello must reach the handshake, not a
    stream buffer) and hand the transport to MllpServer._tls."""

    def __init__(self, server: MllpServer):
        self.server = server
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self.server._tls(transport))


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    return f"{info[0]}:{info[1]}" if isinstance(info, tuple) else str(info)


def server_ssl_context(settings: MllpSettings) -> ssl.SSLContext | None:
    """TLS for the listener from mllp.tls_*; with a client CA, clients must present a certificate (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
        if settings.tls_client_ca_file is not None:
            context.load_verify_locations(cafile=str(settings.tls_client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mllp.tls_*: cannot load the certificate files ({exc})") from exc
    return context
