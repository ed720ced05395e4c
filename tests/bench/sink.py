"""A fast local FHIR sink for the benchmark: HTTP/1.1 keep-alive, answers every POST with a transaction-response.

Run: python tests/bench/sink.py PORT_FILE  (it writes its port to PORT_FILE). `GET /count` returns
"<posts> <monotonic time of the last post>", so the benchmark can read delivery progress.
Hand-written on asyncio, run on uvloop's loop, on purpose: it must cost the machine as little as possible.
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

RESPONSE = b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}'
state = {"posts": 0, "last": 0.0}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            if head.startswith(b"GET /count"):
                body = f"{state['posts']} {state['last']}".encode()
                ctype = b"text/plain"
            else:
                state["posts"] += 1
                state["last"] = time.monotonic()
                body, ctype = RESPONSE, b"application/fhir+json"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port_file: str) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    with open(port_file, "w") as out:
        out.write(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
