"""``bench serve``: one policy answering ``remote`` clients over TCP.

The simulator needs CPUs and the model an accelerator; a server lets env workers on one
machine (``bench run --policy remote --policy-arg address=HOST:PORT``) drive a model on
another. Each connection gets a thread; calls into the policy are serialised by a lock (one
model, one device), and queries waiting together are answered by one call. Requests and their
replies (``policies/wire.py``):

- ``{"op": "hello", "protocol", "token"}``: the policy's traits, identity and provenance;
- ``{"op": "select_suite", "suite"}``, ``{"op": "reset", "episode"}``, ``{"op": "end", "episode"}``;
- ``{"op": "act", "observations"}``: ``{"outputs": [{"actions", "stats"}]}``, each query's stats
  with ``served_ms``, the time the policy's call took, and ``served_batch``, the observations
  it answered.

A failing call is answered ``{"error": {"type", "message"}}`` and the connection stays open.

Started with a token (``--token-file``), the server answers a connection only after a hello
that carries it, and closes one that does not. With a certificate (``--tls-cert``,
``--tls-key``) every connection is TLS, so the token and the observations cannot be read on
the way; clients then trust that certificate (``--policy-arg tls_ca=FILE``). Without both,
serve on localhost or a network you trust.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from bench.provenance import code_revision, host_info, package_versions
from policies.base import EpisodeInfo, Observation, Policy, PolicyOptionError
from policies.wire import PROTOCOL, ProtocolError, receive, send

log = logging.getLogger(__name__)  # who connects, what fails; bench serve prints it


class AuthenticationError(PermissionError):
    """A client without the server's token."""


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The TLS context of a server with this certificate (chain) and private key (PEM files)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS certificate {cert} and key {key} cannot be used: {exc}") from None
    return context


@dataclass
class _Request:
    """One client's ``act`` request, waiting for the batch it joins."""

    observations: list[Observation]
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[dict] | None = None
    error: Exception | None = None


class PolicyServer:
    """What ``bench serve`` runs: the policy, its lock, who evaluates which suite, and the
    batcher. ``act`` requests that arrive while the policy is busy are answered together by
    its next call (at most ``max_batch`` observations, 0: no limit; a request is never split),
    as the worker pool batches its workers' queries."""

    def __init__(self, policy: Policy, policy_args: dict[str, str], max_batch: int = 0, token: str | None = None):
        self.policy = policy
        self.token = token
        self.policy_args = dict(policy_args)
        self.max_batch = max_batch
        self.lock = threading.Lock()  # one call into the policy at a time
        self.suites: dict[int, str] = {}  # connection id -> the suite it selected
        self.provenance = {"host": host_info(), "versions": package_versions(), "code": code_revision()}
        self._waiting: deque[_Request] = deque()
        self._arrived = threading.Condition()
        self._closed = False
        threading.Thread(target=self._answer_batches, daemon=True).start()

    def close(self) -> None:
        """Stop the batcher; requests still waiting fail."""
        with self._arrived:
            self._closed = True
            for request in self._waiting:
                request.error = ConnectionError("the policy server is stopping")
                request.done.set()
            self._waiting.clear()
            self._arrived.notify()

    def hello(self, protocol, token=None) -> dict:
        if self.token is not None and not hmac.compare_digest(str(token or "").encode(), self.token.encode()):
            raise AuthenticationError("this server needs its token: give the client --policy-arg token_file=FILE"
                                      if not token else "the token is not this server's")
        if protocol != PROTOCOL:
            raise ProtocolError(f"the client speaks protocol {protocol}, this server {PROTOCOL}: update one of them")
        policy = self.policy
        return {
            "protocol": PROTOCOL,
            "policy": policy.name,
            "policy_args": self.policy_args,
            "identity": policy.identity(),
            "caveat": policy.caveat,
            "needs_images": policy.needs_images,
            "needs_privileged": policy.needs_privileged,
            "chunk_length": policy.chunk_length,
            "provenance": self.provenance,
        }

    def select_suite(self, connection: int, suite: str) -> None:
        # One policy holds one suite's settings (a checkpoint's statistics): a client may not
        # change them under another that is still evaluating.
        with self.lock:
            others = {s for c, s in self.suites.items() if c != connection}
            if others and suite not in others:
                raise PolicyOptionError(f"this server's policy is evaluating {others.pop()} for another client; "
                                        f"serve {suite} from a server of its own")
            self.policy.select_suite(suite)
            self.suites[connection] = suite

    def reset(self, episode: EpisodeInfo) -> None:
        with self.lock:
            self.policy.reset(episode)

    def end(self, episode: EpisodeInfo) -> None:
        with self.lock:
            self.policy.end(episode)

    def disconnected(self, connection: int, open_episodes) -> None:
        """Free what a client that went away left: its unfinished episodes' state, its suite."""
        with self.lock:
            for episode in open_episodes:
                _quietly(self.policy.end, episode)
            self.suites.pop(connection, None)

    def act(self, observations: list[dict]) -> dict:
        request = _Request([Observation(**obs) for obs in observations])
        with self._arrived:
            if self._closed:
                raise ConnectionError("the policy server is stopping")
            self._waiting.append(request)
            self._arrived.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return {"outputs": request.outputs}

    def waiting(self) -> int:
        """Observations waiting for the policy's next call."""
        with self._arrived:
            return sum(len(request.observations) for request in self._waiting)

    def _answer_batches(self) -> None:
        while True:
            with self._arrived:
                self._arrived.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                batch = [self._waiting.popleft()]
                size = len(batch[0].observations)
                while self._waiting and self._fits(size + len(self._waiting[0].observations)):
                    batch.append(self._waiting.popleft())
                    size += len(batch[-1].observations)
            self._answer(batch, size)

    def _fits(self, size: int) -> bool:
        return not self.max_batch or size <= self.max_batch

    def _answer(self, batch: list[_Request], size: int) -> None:
        observations = [obs for request in batch for obs in request.observations]
        try:
            with self.lock:
                start = time.perf_counter()
                outputs = self.policy.act(observations)
                self.policy.synchronize()
                served_ms = (time.perf_counter() - start) * 1000.0
            if len(outputs) != size:
                raise RuntimeError(f"the policy returned {len(outputs)} outputs for {size} observations")
        except Exception as exc:  # noqa: BLE001 - a failure of the call is each waiting request's error
            for request in batch:
                request.error = exc
                request.done.set()
            return
        answers = iter(outputs)
        for request in batch:
            request.outputs = [{"actions": out.actions, "stats": {**out.stats, "served_ms": served_ms,
                                                                  "served_batch": size}}
                               for out in itertools.islice(answers, len(request.observations))]
            request.done.set()


class _Connection(socketserver.BaseRequestHandler):
    server: "_TCPServer"

    def setup(self) -> None:
        self.client = "%s:%s" % self.client_address[:2]
        with self.server.connections_lock:
            self.server.connections.add(self.request)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.request)

    def handle(self) -> None:
        state = self.server.state
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small replies go out at once
        open_episodes: dict[str, EpisodeInfo] = {}
        client = self.client
        log.info("%s connected", client)
        ending = "disconnected"
        self.authenticated = state.token is None
        try:
            if self.server.tls is not None:  # the handshake runs here, not in the accepting thread
                sock = self.server.tls.wrap_socket(sock, server_side=True)
                with self.server.connections_lock:  # the wrapper now owns the connection
                    self.server.connections.discard(self.request)
                    self.server.connections.add(sock)
                self.request = sock
            while (request := receive(sock)) is not None:
                reply = self.answer(state, request, open_episodes)
                try:
                    send(sock, reply)
                except TypeError as exc:  # packed before anything is written: the connection is intact
                    reply = {"error": {"type": "TypeError", "message": f"the answer cannot be sent: {exc}"}}
                    send(sock, reply)
                if "error" in reply:
                    log.warning("%s: %s failed: %s: %s", client, request.get("op"), reply["error"]["type"],
                                reply["error"]["message"])
                if not self.authenticated:
                    ending = "refused (no token, or a wrong one)"
                    break
        except (ConnectionError, ProtocolError, OSError) as exc:
            ending = f"dropped ({type(exc).__name__}: {exc})"  # went away, or spoke another protocol
        finally:
            state.disconnected(id(self), list(open_episodes.values()))
            log.info("%s %s; %d episode(s) left unfinished", client, ending, len(open_episodes))

    def answer(self, state: PolicyServer, request: dict, open_episodes: dict) -> dict:
        op = request.get("op")
        try:
            if op == "hello":
                reply = state.hello(request.get("protocol"), request.get("token"))
                self.authenticated = True
                return reply
            if not self.authenticated:
                raise AuthenticationError("this server needs a hello with its token first")
            if op == "select_suite":
                state.select_suite(id(self), request["suite"])
                log.info("%s evaluates %s", self.client, request["suite"])
            elif op == "reset":
                episode = EpisodeInfo(**request["episode"])
                open_episodes[episode.episode_id] = episode
                state.reset(episode)
            elif op == "end":
                episode = EpisodeInfo(**request["episode"])
                open_episodes.pop(episode.episode_id, None)
                state.end(episode)
            elif op == "act":
                return state.act(request["observations"])
            else:
                raise ProtocolError(f"unknown request {op!r}")
            return {}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client that caused it
            return {"error": {"type": type(exc).__name__, "message": str(exc)}}


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, state: PolicyServer, tls: ssl.SSLContext | None = None):
        super().__init__(address, _Connection)
        self.state = state
        self.tls = tls
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_connections(self) -> None:
        """End every client's connection, as the end of the process would."""
        with self.connections_lock:
            for sock in self.connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone


def serve(state: PolicyServer, host: str, port: int, on_ready: Callable[[tuple[str, int]], None] | None = None,
          stop: threading.Event | None = None, tls: ssl.SSLContext | None = None) -> None:
    """Answer clients until interrupted (or ``stop`` is set); ``on_ready`` gets the address
    bound (port 0 picks a free one). ``tls``: every connection is TLS (``server_tls``)."""
    try:
        with _TCPServer((host, port), state, tls) as server:
            if on_ready is not None:
                on_ready(server.server_address[:2])
            if stop is not None:
                threading.Thread(target=lambda: (stop.wait(), server.shutdown()), daemon=True).start()
            try:
                server.serve_forever(poll_interval=0.2)
            finally:
                server.close_connections()
    finally:
        state.close()


class ServerThread:
    """``serve`` in a thread of this process on a free port (or ``port``), for scripts and tests:
    ``with ServerThread(policy) as server: make_policy("remote", {"address": server.address})``."""

    def __init__(self, policy: Policy, policy_args: dict[str, str] | None = None, port: int = 0,
                 max_batch: int = 0, token: str | None = None, tls: ssl.SSLContext | None = None):
        ready, self._stop = threading.Event(), threading.Event()
        bound = []
        self.state = PolicyServer(policy, policy_args or {}, max_batch, token)
        self._thread = threading.Thread(
            target=serve, args=(self.state, "127.0.0.1", port),
            kwargs={"on_ready": lambda address: (bound.append(address), ready.set()), "stop": self._stop, "tls": tls},
            daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the policy server did not start within 30 s")
        self.port = bound[0][1]
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - freeing state of a client that left: nothing to report to
        pass
