"""Worker processes' writes, relayed to the serve process: one writer per SQLite file.

With `mllp.workers` or `delivery.workers` on SQLite, each worker does its own work (parse and map;
HTTP) and sends its writes (accept or record; claim_due or record_outcomes) over a socket to the
serve process, whose store commits them in the same group commit as every other worker's. A worker
that wrote the file itself had to take the file's write turn from the others at every commit: with
two intake workers the turn was held ~85% of the time and each worker idled half of it (two workers
took no more than one process). An AA still follows the commit: the worker waits for serve's answer,
which comes once the store has committed. If serve is gone, the write fails with StoreUnavailable
(AE; a delivery waits), and the worker ends with it (adapter/lifeline.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copyreg
import functools
import pickle
import socket
import sqlite3
import struct
import threading
from collections.abc import Callable
from typing import Any

import structlog

from adapter.errors import StoreUnavailable
from adapter.store.base import AcceptResult, AttemptOutcome, Delivery, InboundRecord, OutboxItem, Outcome
from adapter.store.sqlite import Op, SqliteStore

log = structlog.get_logger("homeward.store")

_LENGTH = struct.Struct("!I")
# Pickle: both ends are this program, on a socket pair serve made (no other process can reach it).
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _by_fields(item: Any) -> tuple[type, tuple[Any, ...]]:
    """Pickle a dataclass as its class and field values: the default for slotted dataclasses looks up
    the fields on every dump and load (yappi: ~8% of serve's CPU for a relayed message)."""
    return type(item), tuple(getattr(item, name) for name in item.__match_args__)


for _kind in (InboundRecord, Delivery, AcceptResult, OutboxItem, AttemptOutcome):
    copyreg.pickle(_kind, _by_fields)


def _frame(item: Any) -> bytes:
    body = pickle.dumps(item, _PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(size))


class RelayedStore:
    """In a worker: the intake's or the forwarder's store, whose writes the serve process commits."""

    max_claims = SqliteStore.max_claims

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._broken = ""
        # A turn of the event loop sends its first write at once and the rest together at its end (see _call).
        self._outgoing: list[bytes] = []
        self._turn_started = False

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._reader_task = asyncio.create_task(self._answers(reader))

    async def accept(self, record: InboundRecord, deliveries: list[Delivery], detail: dict[str, Any]) -> AcceptResult:
        return await self._call("accept", (record, deliveries, detail))  # type: ignore[no-any-return]

    async def record(self, record: InboundRecord, outcome: Outcome, ack_code: str, reason: str) -> int:
        return await self._call("record", (record, outcome, ack_code, reason))  # type: ignore[no-any-return]

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        return await self._call("claim_due", (now, limit, lease_seconds))  # type: ignore[no-any-return]

    async def record_outcomes(
        self, outcomes: list[AttemptOutcome], now: float, lease_seconds: float
    ) -> list[OutboxItem | None]:
        return await self._call("record_outcomes", (outcomes, now, lease_seconds))  # type: ignore[no-any-return]

    async def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        if self._broken or self._writer is None:
            raise StoreUnavailable(f"the serve process's store cannot be reached ({self._broken or 'not started'})")
        self._next_id += 1
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[self._next_id] = future
        # The first write of a turn of the loop goes at once, so serve starts committing it; the writes of
        # the other connections that run in the same turn go together at its end, by which time serve's
        # next group commit can take them all (a send to serve was 14% of an intake worker's CPU, one a
        # message; holding the first too made serve wait idle while the worker mapped the rest).
        frame = _frame((self._next_id, method, args))
        if not self._turn_started:
            self._turn_started = True
            loop.call_soon(self._send)
            self._writer.write(frame)
        else:
            self._outgoing.append(frame)
        return await future

    def _send(self) -> None:
        frames, self._outgoing = self._outgoing, []
        self._turn_started = False
        if frames and self._writer is not None and not self._broken:
            self._writer.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def _answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, ok, value = await _read_frame(reader)
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    # Only StoreUnavailable keeps its kind (AE 207 "store"); anything else was a bug in
                    # serve, which the intake answers as an internal error, as it would in-process.
                    kind, text = value
                    future.set_exception(StoreUnavailable(text) if kind == "StoreUnavailable" else RuntimeError(text))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._fail(f"connection to serve lost ({type(exc).__name__})")
        except asyncio.CancelledError:
            self._fail("closing")
            raise

    def _fail(self, why: str) -> None:
        self._broken = why
        for future in self._pending.values():
            if not future.done():
                future.set_exception(StoreUnavailable(f"the serve process's store cannot be reached ({why})"))
        self._pending.clear()

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()


class WriteRelay:
    """In the serve process: commits each worker's relayed writes with this process's SQLite store.

    A thread per worker reads its writes and hands them to the store's writer thread (no event loop
    on the way: these writes are the ACK path, and serve's event loop runs delivery at a lower
    priority, mllp.delivery_nice); the answer is sent from the writer thread once the group is
    committed. `on_accepted` is called on serve's event loop, once per turn of it however many
    messages were committed meanwhile.
    """

    def __init__(self, store: SqliteStore, on_accepted: Callable[[], None]):
        self.store = store
        self.on_accepted = on_accepted
        self._serving_loop: asyncio.AbstractEventLoop | None = None
        self._wake_queued = False
        # Answers settled by the store's writer thread during a group commit, per worker socket: sent
        # together once the group is answered (store.after_group), one send a worker.
        self._answers: dict[socket.socket, tuple[threading.Lock, list[bytes]]] = {}
        store.after_group.append(self._send_answers)

    def start(self) -> None:
        """Call from serve's event loop (where `on_accepted` runs), before the first channel()."""
        self._serving_loop = asyncio.get_running_loop()

    def channel(self, shard: tuple[int, int] | None = None) -> socket.socket:
        """A socket pair for one worker: a thread of the relay serves one end; the worker gets the other.

        `shard` (index, count): a delivery worker's, whose claims are of that shard's queues; the claims
        its predecessor left are freed first (writes are committed in the order submitted).
        Called from the thread that starts workers, which keeps full priority: the relay's thread does too."""
        if shard is not None:
            self.store.submit(self.store.release_claims_op(shard))
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._serve, args=(ours, shard), name="store-relay", daemon=True).start()
        return theirs

    def _op(self, method: str, args: tuple[Any, ...], shard: tuple[int, int] | None) -> Op:
        if method == "accept":
            return self.store.accept_op(*args)
        if method == "record":
            return self.store.record_op(*args)
        if method == "claim_due":
            now, limit, lease_seconds = args
            return self.store.claim_due_op(now, limit, lease_seconds, shard)
        if method == "record_outcomes":
            return self.store.record_outcomes_op(*args)
        raise ValueError(f"no such relayed write: {method}")

    def _serve(self, sock: socket.socket, shard: tuple[int, int] | None) -> None:
        send_lock = threading.Lock()  # answers come from the writer thread, refusals from this one
        try:
            with sock, sock.makefile("rb") as stream:
                while True:
                    head = stream.read(_LENGTH.size)
                    if len(head) < _LENGTH.size:
                        return  # the worker ended: what it was not answered for, it never acknowledged
                    (size,) = _LENGTH.unpack(head)
                    body = stream.read(size)
                    if len(body) < size:
                        return  # killed mid-write: that message was never acknowledged
                    call_id, method, args = pickle.loads(body)
                    try:
                        future = self.store.submit(self._op(method, args, shard))
                    except ValueError as exc:  # answered as a failed write, never left waiting
                        future = concurrent.futures.Future()
                        future.set_exception(exc)
                    future.add_done_callback(functools.partial(self._answer, sock, send_lock, call_id, method))
        except OSError:
            return  # the worker was killed mid-write

    def _answer(
        self,
        sock: socket.socket,
        send_lock: threading.Lock,
        call_id: int,
        method: str,
        future: concurrent.futures.Future[Any],
    ) -> None:
        exc = future.exception()
        if exc is None:
            value = future.result()
            if method == "accept" and not value.duplicate:
                self._wake()
            answer: tuple[Any, ...] = (call_id, True, value)
        elif isinstance(exc, (StoreUnavailable, sqlite3.Error)):
            reason = (
                str(exc) if isinstance(exc, StoreUnavailable) else f"the store could not commit ({type(exc).__name__})"
            )
            answer = (call_id, False, ("StoreUnavailable", reason))
        else:  # a bug in the write: the worker answers AE 207 as it would in-process; serve goes on
            log.error("store.relay_failed", method=method, error=type(exc).__name__)
            answer = (call_id, False, (type(exc).__name__, str(exc)))
        if threading.current_thread() is self.store.writer_thread:
            self._answers.setdefault(sock, (send_lock, []))[1].append(_frame(answer))
            return
        with send_lock, contextlib.suppress(OSError):  # the worker is gone: it never sent the ACK
            sock.sendall(_frame(answer))

    def _send_answers(self) -> None:
        """On the writer thread, after a group commit: each worker's answers in one send."""
        answers, self._answers = self._answers, {}
        for sock, (send_lock, frames) in answers.items():
            with send_lock, contextlib.suppress(OSError):  # the worker is gone: it never sent the ACK
                sock.sendall(b"".join(frames))

    def _wake(self) -> None:
        if self._wake_queued or self._serving_loop is None:
            return
        self._wake_queued = True
        with contextlib.suppress(RuntimeError):  # serve's loop has closed: it is stopping
            self._serving_loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._wake_queued = False
        self.on_accepted()
