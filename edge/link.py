"""The edge's gRPC link to the cloud: Info, and one Session stream with a per-message deadline.

A reader thread moves replies into a queue, so each request waits at most `deadline_s` for its reply. A missed
deadline, a broken connection or an UNAVAILABLE status raises CloudUnavailable (the edge then continues
standalone); any other status raises CloudError with the server's message. Byte counts are protobuf message
sizes (request.ByteSize() up, reply.ByteSize() down), the same numbers the server counts.

Behind a load balancer: every stream carries the generation's session key in the `x-coexit-session` metadata
(the balancer's stickiness key), and with `heartbeat_s` a stream that has carried no message for that long sends
a Heartbeat (feature "heartbeat"), whose reply the reader drops: proxies cut idle streams and do not forward
HTTP/2 PINGs, so only in-stream messages keep them open.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc

from coexit.errors import CoexitError
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc
from coexit.wire import SESSION_KEY_HEADER

_END = object()
_OUTAGE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                 grpc.StatusCode.ABORTED}


class CloudError(CoexitError):
    """A status from the cloud (or a local stand-in for one); `address` is the cloud's when known."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.address = code, details, address


class CloudUnavailable(CloudError):
    """The cloud did not answer in time or the connection broke."""


def _wrap(exc: grpc.RpcError, address: str | None = None) -> CloudError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    # a stream reset by the transport (a proxy whose upstream replica died resets it with INTERNAL_ERROR) is an
    # outage, not the server's answer: coexit's server ends streams with a status, never with a reset
    reset = code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (details or "")
    return (CloudUnavailable if code in _OUTAGE_CODES or reset else CloudError)(code, details or "", address)


class CloudLink:
    def __init__(self, address: str, token: str | None = None, deadline_s: float = 5.0,
                 root_cert: bytes | None = None) -> None:
        self.address, self.deadline_s = address, deadline_s
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.root_cert = root_cert
        self._connect()

    def _connect(self) -> None:
        address, root_cert = self.address, self.root_cert
        opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
                # reconnect quickly once a restarted cloud is back. Not grpc.min_reconnect_backoff_ms: gRPC also
                # takes it as the minimum connect timeout, and at 100 ms no handshake over a far link finished
                # (tests/edge/test_far_cloud.py); the default (20 s) bounds each attempt, a refused one fails at once
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        if root_cert is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_cert), opts)
        else:
            self.channel = grpc.insecure_channel(address, opts)
        self.stub = pb_grpc.CoexitStub(self.channel)

    def reconnect(self) -> None:
        """A fresh channel: after an outage it connects at once instead of waiting out the reconnect backoff."""
        self.channel.close()
        self._connect()

    def info(self) -> pb.InfoReply:
        try:
            return self.stub.Info(pb.InfoRequest(), timeout=self.deadline_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc, self.address) from None

    def stream(self, key: str | None = None, heartbeat_s: float | None = None) -> SessionStream:
        """A Session stream; `key` routes every stream of one generation to one replica, `heartbeat_s` keeps it
        open while idle (only for a server that announces "heartbeat")."""
        return SessionStream(self, key, heartbeat_s)

    def close(self) -> None:
        self.channel.close()


class SessionStream:
    """One Session stream: request(msg) sends a SessionRequest and returns its SessionReply. send() and recv()
    split the two for pipelining (lossless mode keeps several Appends in flight; replies come back in order)."""

    def __init__(self, link: CloudLink, key: str | None = None, heartbeat_s: float | None = None) -> None:
        self.link = link
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # byte counts and the idle clock: the heartbeat thread sends too
        metadata = [*link.metadata, *([(SESSION_KEY_HEADER, key)] if key else [])]
        self._call = link.stub.Session(iter(self._requests.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True, name="coexit-edge-reader")
        self._reader.start()
        self.bytes_up = self.bytes_down = 0
        self.heartbeats = 0
        self.broken = False
        self._last = time.monotonic()  # the last message either way
        self._stop = threading.Event()
        if heartbeat_s:
            threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="coexit-edge-heartbeat").start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(min(every_s, max(0.05, every_s - (time.monotonic() - self._last)))):
            if self.broken:
                return
            if time.monotonic() - self._last >= every_s:
                try:
                    self.send(pb.SessionRequest(heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))))
                except CloudUnavailable:  # the stream broke meanwhile: nothing left to keep open
                    return
                self.heartbeats += 1

    def _read(self) -> None:
        try:
            for reply in self._call:
                with self._lock:
                    self._last = time.monotonic()
                if reply.WhichOneof("msg") == "heartbeat":
                    with self._lock:
                        self.bytes_down += reply.ByteSize()
                    continue  # answers nothing the run asked
                self._replies.put(reply)
            self._replies.put(CloudUnavailable(grpc.StatusCode.UNAVAILABLE, "the server ended the stream"))
        except grpc.RpcError as exc:
            self._replies.put(_wrap(exc, self.link.address))
        except Exception as exc:  # channel closed under us
            self._replies.put(CloudUnavailable(grpc.StatusCode.UNAVAILABLE, str(exc)))

    def request(self, msg: pb.SessionRequest, deadline_s: float | None = None) -> pb.SessionReply:
        self.send(msg)
        return self.recv(deadline_s)

    def send(self, msg: pb.SessionRequest) -> None:
        if self.broken:
            raise CloudUnavailable(grpc.StatusCode.UNAVAILABLE, "stream already broken")
        with self._lock:
            self.bytes_up += msg.ByteSize()
            self._last = time.monotonic()
        self._requests.put(msg)

    def recv(self, deadline_s: float | None = None) -> pb.SessionReply:
        """The next reply, in the order the requests were sent."""
        if self.broken:
            raise CloudUnavailable(grpc.StatusCode.UNAVAILABLE, "stream already broken")
        try:
            reply = self._replies.get(timeout=deadline_s or self.link.deadline_s)
        except queue.Empty:
            self.cancel()
            raise CloudUnavailable(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no reply within {deadline_s or self.link.deadline_s:.2f} s") from None
        if isinstance(reply, Exception):
            self.broken = True
            raise reply
        with self._lock:
            self.bytes_down += reply.ByteSize()
        return reply

    def cancel(self) -> None:
        self.broken = True
        self._stop.set()
        self._call.cancel()
        self._requests.put(_END)

    def close(self) -> pb.CloseReply | None:
        self._stop.set()
        if self.broken:
            return None
        try:
            self.send(pb.SessionRequest(close=pb.CloseRequest()))
            self._requests.put(_END)  # Close is the last message: half-close before the reply, as proxies expect
            reply = self.recv()
        except CloudError:
            return None
        return reply.closed
