"""A blocking websocket client for the tests that reads and writes on one thread.

websockets' own sync client reads in a background thread while the caller's thread
writes, and on a TLS socket that means SSL_read and SSL_write on one SSL object at
once, which CPython before 3.13 does not serialise: now and then the upgrade
request or the reply is lost and both ends wait for ever (python-socketio #1568,
python-engineio #461). This client drives websockets' Sans-I/O protocol from the
caller's thread only, with a timeout on every read, so a test fails in seconds
and names what it was waiting for.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from types import TracebackType

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri


class BlockingWebSocket:
    """One websocket over ``sock`` (connected; wrapped in TLS when ``tls`` is given)."""

    def __init__(
        self,
        sock: socket.socket,
        uri: str,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        sock.settimeout(timeout)
        self.sock = tls.wrap_socket(sock, server_hostname=server_hostname) if tls is not None else sock
        self.timeout = timeout
        self.protocol = ClientProtocol(parse_uri(uri))
        self._events: deque[object] = deque()
        try:
            self.protocol.send_request(self.protocol.connect())
            self._send_pending()
            response = self._next_event("the handshake response")
            if not isinstance(response, Response) or self.protocol.handshake_exc is not None:
                raise ConnectionError(f"websocket handshake refused: {self.protocol.handshake_exc or response!r}")
        except BaseException:
            self.sock.close()
            raise

    def send(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._send_pending()

    def recv(self, timeout: float | None = None) -> str:
        """The next text message; TimeoutError after ``timeout`` seconds without one."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while True:
            event = self._next_event("a text message")
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                return bytes(event.data).decode()

    def close(self) -> None:
        """Send a close frame and close the socket (without waiting for the server's close frame)."""
        try:
            self.protocol.send_close()
            self._send_pending()
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> BlockingWebSocket:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _send_pending(self) -> None:
        for data in self.protocol.data_to_send():
            if data:  # b"" asks for a half-close; the socket is closed whole in close()
                self.sock.sendall(data)

    def _next_event(self, waiting_for: str) -> object:
        while not self._events:
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise TimeoutError(f"no {waiting_for} within {self.sock.gettimeout()} s") from exc
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            self._send_pending()  # pongs, and the reply to a close frame
            self._events.extend(self.protocol.events_received())
            if not data and not self._events:
                raise ConnectionError(f"the server closed the connection before {waiting_for}")
        return self._events.popleft()
