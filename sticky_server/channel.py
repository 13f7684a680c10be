"""Messages between the master and its workers: encoding, size limits, envelopes, routing.

Messages are JSON values (dicts, lists, str, int, float, bool, None), never
pickles: a worker must not be able to make the master run code. A value that
cannot be encoded (a set, NaN or Infinity, nesting too deep) raises TypeError in
the caller; one over ``max_message_size`` raises ValueError. Bytes that are not a
valid message, from a worker (not UTF-8 JSON, NaN, an integer past Python's digit
limit, nesting too deep, over ``max_message_size``), are a protocol error: the master
kills and replaces that worker.

Envelopes (the payload of the frames in ``frames``):
  SEND     worker -> master   the JSON text
  PUBLISH  worker -> master   u8 include-sender flag, then the JSON text; the
                              master checks it and relays the text unchanged
  MESSAGE  master -> worker   u16 sender (``FROM_MASTER`` or a worker slot), then the JSON text

Routing: a worker's messages go to the master through its ``WorkerChannel``; the
master's ``MessageRouter`` hands SEND to the master's handlers, relays PUBLISH to
every current worker (the sender too if it asked), and queues the master's own
``send``/``broadcast`` for one worker or all. Every queue drops its oldest messages
past ``MAX_QUEUED_MESSAGE_BYTES`` (logged, throttled) rather than block anyone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ProtocolError
from .frames import Frame, FrameKind, encode_joined
from .outbox import Outbox
from .throttle import ThrottledLog
from .waker import Waker

if TYPE_CHECKING:
    from .link import Link

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EARLY_FLUSH_BYTES",
    "FROM_MASTER",
    "MAX_QUEUED_MESSAGE_BYTES",
    "MessageRouter",
    "WorkerChannel",
    "decode",
    "encode",
    "pack_delivery",
    "pack_publish",
    "sender_prefix",
    "unpack_delivery",
    "unpack_publish",
]

logger = logging.getLogger("sticky_server.channel")

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
# Messages queued for one receiver beyond this many bytes push out the oldest ones.
MAX_QUEUED_MESSAGE_BYTES = 16 * 1024 * 1024
# Dropped messages are logged at most once per this many seconds.
DROP_LOG_INTERVAL = 10.0
# A worker's messages queued beyond this many bytes are written by the sender's own call.
EARLY_FLUSH_BYTES = 64 * 1024
# Looked up once: on Python 3.11 each FrameKind.NAME runs a Python-level descriptor.
_MESSAGE = FrameKind.MESSAGE
FROM_MASTER = 0xFFFF
_SENDER = struct.Struct(">H")
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=True, allow_nan=False)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# NaN and Infinity are Python's extension, not JSON: refused both ways.
_decoder = json.JSONDecoder(parse_constant=_not_json)
# What JSONDecoder.raw_decode calls (the C scanner); typeshed does not declare the attribute.
_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def encode(message: Any, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """The JSON bytes of ``message``; TypeError if it is not JSON, ValueError if it is too big."""
    try:
        data = _encoder.encode(message).encode()
    except RecursionError:
        raise TypeError("message cannot be sent: it is nested too deeply to encode as JSON") from None
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message cannot be sent: {exc}. Send JSON values: dict (str keys), list, str, int, float, bool, None"
        ) from None
    if len(data) > max_size:
        raise ValueError(
            f"message is {len(data)} bytes as JSON, over the {max_size} byte limit; "
            "send less, or raise StickyServer(max_message_size=...)"
        )
    return data


def decode(data: bytes) -> Any:
    """The value of a message's JSON bytes; ProtocolError if they are not JSON."""
    try:
        text = data.decode()
        # What encode() writes has no whitespace around the value, so the C scanner alone
        # reads it (JSONDecoder.decode wraps it in two regex matches and Python calls:
        # 2 us of a small message's 2.5). Anything else takes the full path and its errors.
        try:
            value, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            end = -1
        if end == len(text):
            return value
        return _decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON, NaN/Infinity and integers past
        # Python's digit limit; RecursionError, nesting past the interpreter's.
        raise ProtocolError(f"message is not valid JSON ({str(exc)[:200]})") from None


def sender_prefix(sender: int | None) -> bytes:
    """The start of a MESSAGE payload: who sent it (the JSON text follows)."""
    return _SENDER.pack(FROM_MASTER if sender is None else sender)


def pack_delivery(sender: int | None, body: bytes) -> bytes:
    return sender_prefix(sender) + body


def unpack_delivery(payload: bytes) -> tuple[int | None, Any]:
    if len(payload) < _SENDER.size:
        raise ProtocolError("message frame too short for its sender")
    (sender,) = _SENDER.unpack_from(payload)
    return (None if sender == FROM_MASTER else sender), decode(payload[_SENDER.size :])


def pack_publish(include_sender: bool, body: bytes) -> bytes:
    return bytes([include_sender]) + body


def unpack_publish(payload: bytes) -> tuple[bool, bytes]:
    """The include-sender flag and the JSON text, checked to be a valid message."""
    if not payload or payload[0] > 1:
        raise ProtocolError("publish frame without a valid include-sender flag")
    body = payload[1:]
    decode(body)
    return bool(payload[0]), body


class MessageRouter:
    """The master's side: messages to one worker, to all, from workers to the master's handlers, and relays.

    ``current`` maps each slot to its current worker's link (the master's loop keeps
    it up to date); queued frames go out when the loop flushes the links in
    ``touched``. Call on the loop's thread.
    """

    def __init__(
        self,
        current: Mapping[int, Link],
        touched: set[Link],
        on_message: Callable[[int, Any], None],
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._current = current
        self._touched = touched
        self._on_message = on_message
        self._max_message_size = max_message_size
        self._dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d oldest message(s) queued for slow workers (latest: worker %d, over %d bytes waiting)",
            DROP_LOG_INTERVAL,
        )

    def send(self, slot: int, body: bytes, sender: int | None = None) -> bool:
        """Queue an encoded message for the current worker of ``slot``; False if the slot has none now."""
        return self._queue(slot, encode_joined(_MESSAGE, sender_prefix(sender), body))

    def broadcast(self, body: bytes, sender: int | None = None, skip: int | None = None) -> None:
        """Queue an encoded message for the current worker of every slot but ``skip``."""
        frame = encode_joined(_MESSAGE, sender_prefix(sender), body)  # built once for every receiver
        for slot in list(self._current):
            if slot != skip:
                self._queue(slot, frame)

    def on_send(self, link: Link, frame: Frame) -> None:
        """A worker's SEND: to the master's handlers."""
        self._check_size(len(frame.payload))
        self._on_message(link.worker.slot, decode(frame.payload))

    def on_publish(self, link: Link, frame: Frame) -> None:
        """A worker's PUBLISH: checked, then relayed unchanged to the others (and the sender if it asked)."""
        self._check_size(len(frame.payload) - 1)
        include_sender, body = unpack_publish(frame.payload)
        slot = link.worker.slot
        self.broadcast(body, sender=slot, skip=None if include_sender else slot)

    def _queue(self, slot: int, frame: bytes) -> bool:
        link = self._current.get(slot)
        if link is None or not link.connected:
            return False
        dropped = link.outbox.put_message_frame(frame, MAX_QUEUED_MESSAGE_BYTES)
        if dropped:
            self._dropped_log.note(dropped, slot, MAX_QUEUED_MESSAGE_BYTES)
        self._touched.add(link)
        return True

    def _check_size(self, body_size: int) -> None:
        if body_size > self._max_message_size:
            raise ProtocolError(f"a message of {body_size} bytes (max_message_size is {self._max_message_size})")


class WorkerChannel:
    """The worker's side of its control socket: every write goes through here, from any thread.

    Writes are queued (control frames before messages, see ``Outbox``) and written
    by the worker loop; another thread that queues a message wakes the loop. So
    ``send``/``publish`` never block the caller and never interleave bytes.
    """

    def __init__(self, control: socket.socket) -> None:
        control.setblocking(False)
        self.control = control
        self.handlers: list[Callable[[int | None, Any], object]] = []
        self.closed = False
        self._outbox = Outbox()
        self._flush_early_at = EARLY_FLUSH_BYTES
        self._lock = threading.Lock()
        self.waker = Waker()  # other threads' messages wake the worker loop
        self._dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d oldest message(s) for the master: over %d bytes were waiting (is the master stuck?)",
            DROP_LOG_INTERVAL,
        )

    def send(self, body: bytes) -> None:
        """Queue an encoded message for the master's handlers."""
        self.put_message(FrameKind.SEND, body)

    def publish(self, body: bytes, include_self: bool) -> None:
        """Queue an encoded message for the master to relay to the other workers (and this one)."""
        self.put_message(FrameKind.PUBLISH, pack_publish(include_self, body))

    def put_control(self, kind: FrameKind, payload: bytes = b"") -> None:
        with self._lock:
            self._outbox.put(kind, payload)

    def put_message(self, kind: FrameKind, payload: bytes) -> None:
        """Queue a message frame for the master and wake the loop."""
        if self.closed:
            raise RuntimeError("this worker has stopped: it can no longer send messages")
        with self._lock:
            outbox = self._outbox
            dropped = outbox.put_message(kind, payload, MAX_QUEUED_MESSAGE_BYTES)
            if outbox.message_bytes >= self._flush_early_at:
                # A burst of sends (say, a loop publishing thousands of messages in one
                # handler) starts going out now rather than when the loop next turns, so
                # the master relays while this process is still producing.
                with contextlib.suppress(OSError):  # the loop sees a gone master
                    outbox.flush(self.control)
                self._flush_early_at = outbox.message_bytes + EARLY_FLUSH_BYTES
        if dropped:
            self._dropped_log.note(dropped, MAX_QUEUED_MESSAGE_BYTES)
        self.waker.wake()

    def pending(self) -> bool:
        """True while anything is queued for the master (a hint: another thread may be queueing now)."""
        return bool(self._outbox)

    def flush(self) -> bool:
        """Write what the socket takes; True when nothing is left. Raises when the master is gone."""
        with self._lock:
            drained = self._outbox.flush(self.control)
            self._flush_early_at = self._outbox.message_bytes + EARLY_FLUSH_BYTES
            return drained

    def close(self) -> None:
        self.closed = True
        self.waker.close()
