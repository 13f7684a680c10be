"""A terminal chat client. Type lines; Ctrl-D quits.

    python example/socketio_chat/chat_client.py NAME [PORT] [--source 127.0.0.N]

``--source`` connects from that local address: on one machine, clients from
127.0.0.2, 127.0.0.3, ... land on different workers and still hear each other.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import socketio


async def main(name: str, port: int, source: str | None) -> None:
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = socketio.AsyncClient(http_session=session)

        @client.on("said")  # type: ignore[untyped-decorator]
        async def said(message: dict[str, str]) -> None:
            print(f"[worker {message['worker']}] {message['name']}: {message['text']}", flush=True)

        await client.connect(f"http://127.0.0.1:{port}", transports=["polling", "websocket"])
        me = await client.call("whoami")
        print(f"connected from {me['client']} to worker {me['worker']}; type lines, Ctrl-D quits", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            await client.emit("say", {"name": name, "text": line.rstrip("\n")})
        await asyncio.sleep(0.2)  # our own last line comes back before we leave
        await client.disconnect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Chat with everyone on the sticky socket.io example server.")
    parser.add_argument("name")
    parser.add_argument("port", nargs="?", type=int, default=3001)
    parser.add_argument("--source", metavar="ADDRESS", help="connect from this local address, e.g. 127.0.0.2")
    args = parser.parse_args()
    asyncio.run(main(args.name, args.port, args.source))
