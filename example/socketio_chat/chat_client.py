"""A terminal chat client: python example/socketio_chat/chat_client.py NAME [PORT]. Type lines; Ctrl-D quits."""

from __future__ import annotations

import asyncio
import sys

import socketio


async def main(name: str, port: int) -> None:
    client = socketio.AsyncClient()

    @client.on("said")  # type: ignore[untyped-decorator]
    async def said(message: dict[str, str]) -> None:
        print(f"[worker {message['worker']}] {message['name']}: {message['text']}")

    await client.connect(f"http://127.0.0.1:{port}", transports=["polling", "websocket"])
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        await client.emit("say", {"name": name, "text": line.rstrip("\n")})
    await client.disconnect()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "anonymous", int(sys.argv[2]) if len(sys.argv) > 2 else 3001)
    )
