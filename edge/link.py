"""The edge's gRPC link to the cloud: Info, and one Session stream with a per-message deadline.

A reader thread moves replies into a queue, so each request waits at most `deadline_s` for its reply. A missed
deadline, a broken connection or an UNAVAILABLE status raises CloudUnavailable (the edge then continues
standalone); any other status raises CloudError with the server's message. Byte counts are protobuf message
sizes (request.ByteSize() up, reply.ByteSize() down), the same numbers the server counts.
"""

from __future__ import annotations

import queue
import threading

import grpc

from coexit.errors import CoexitError
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc

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
    return (CloudUnavailable if code in _OUTAGE_CODES else CloudError)(code, details or "", address)


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

    def stream(self) -> SessionStream:
        return SessionStream(self)

    def close(self) -> None:
        self.channel.close()


class SessionStream:
    """One Session stream: request(msg) sends a SessionRequest and returns its SessionReply. send() and recv()
    split the two for pipelining (lossless mode keeps several Appends in flight; replies come back in order)."""

    def __init__(self, link: CloudLink) -> None:
        self.link = link
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._call = link.stub.Session(iter(self._requests.get, _END), metadata=link.metadata)
        self._reader = threading.Thread(target=self._read, daemon=True, name="coexit-edge-reader")
        self._reader.start()
        self.bytes_up = self.bytes_down = 0
        self.broken = False

    def _read(self) -> None:
        try:
            for reply in self._call:
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
        self.bytes_up += msg.ByteSize()
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
        self.bytes_down += reply.ByteSize()
        return reply

    def cancel(self) -> None:
        self.broken = True
        self._call.cancel()
        self._requests.put(_END)

    def close(self) -> pb.CloseReply | None:
        if self.broken:
            return None
        try:
            reply = self.request(pb.SessionRequest(close=pb.CloseRequest()))
        except CloudError:
            return None
        self._requests.put(_END)
        return reply.closed
