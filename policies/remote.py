"""``remote``: a policy answered by ``bench serve`` on this or another machine.

The client asks the server what its policy reads and how long its chunks are, forwards every
call, and reports the served policy's identity as its own part, so a run records, and a
resumed run checks, what actually answered. A lost connection is made again at the next call;
an episode under way then fails (the server has dropped its state), and later ones go on.

``token_file`` holds the secret a server started with ``--token-file`` asks for (the file's
name, not the secret, is what a run records); ``tls_ca`` makes the connection TLS, trusting
that certificate file (a self-signed server's own certificate), or ``system`` for the system's
certificate authorities.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Sequence

from policies.base import EpisodeInfo, Observation, Policy, PolicyOptionError, PolicyOutput
from policies.wire import PROTOCOL, receive, send


class RemotePolicyError(RuntimeError):
    """The served policy failed on a call; the server's error type and message."""


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 host in brackets: '[::1]:8765') -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PolicyOptionError(f"remote: address must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class RemotePolicy(Policy):
    name = "remote"

    @dataclass
    class Options:
        address: str = "127.0.0.1:8765"
        timeout_s: float = 600.0  # longest wait for one answer (a first query may build CUDA graphs)
        token_file: str = ""  # a file holding the server's token ("": the server needs none)
        tls_ca: str = ""  # TLS, trusting this certificate file or "system" ("": plain TCP)

    def __init__(self, options: Options, seed: int = 0):
        super().__init__(options, seed)
        if not options.timeout_s > 0:
            raise PolicyOptionError(f"remote: timeout_s must be positive, got {options.timeout_s}")
        self.host, self.port = parse_address(options.address)
        self._token = read_token(options.token_file) if options.token_file else None
        self._tls = _client_tls(options.tls_ca) if options.tls_ca else None
        self._sock: socket.socket | None = None
        self._suite: str | None = None
        self._episodes: set[str] = set()  # episodes reset over the current connection
        self.served = self._connect()
        self.needs_images = self.served["needs_images"]
        self.needs_privileged = self.served["needs_privileged"]
        self.caveat = self.served["caveat"]

    @property
    def chunk_length(self) -> int:
        return self.served["chunk_length"]

    def identity(self) -> dict[str, Any]:
        # The address is left out: the same policy served from elsewhere gives the same episodes.
        return {"name": self.name, "served": self.served["identity"]}

    def provenance(self) -> dict[str, Any]:
        served = self.served
        return {"served": {"policy": served["policy"], "policy_args": served["policy_args"],
                           "address": self.options.address}, **served["provenance"]}

    def select_suite(self, suite: str) -> None:
        self._call({"op": "select_suite", "suite": suite})
        self._suite = suite

    def reset(self, episode: EpisodeInfo) -> None:
        self._call({"op": "reset", "episode": dataclasses.asdict(episode)})
        self._episodes.add(episode.episode_id)

    def end(self, episode: EpisodeInfo) -> None:
        if episode.episode_id in self._episodes:  # else the server dropped it with a lost connection
            self._call({"op": "end", "episode": dataclasses.asdict(episode)})
            self._episodes.discard(episode.episode_id)

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        for obs in observations:
            if obs.episode_id not in self._episodes:
                raise ConnectionError(f"the connection to the policy server at {self.options.address} was lost "
                                      f"during episode {obs.episode_id}: the server no longer holds its state")
        reply = self._call({"op": "act", "observations": [dataclasses.asdict(obs) for obs in observations]})
        return [PolicyOutput(out["actions"], out["stats"]) for out in reply["outputs"]]

    def close(self) -> None:
        """Drop the connection; the server then drops the state of the episodes under way."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._episodes = set()

    def _connect(self) -> dict:
        address = self.options.address
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.options.timeout_s)
        except OSError as exc:
            raise ConnectionError(f"no policy server answers at {address} ({exc.strerror or exc}); "
                                  "start one there with 'bench serve --policy NAME'") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                self._sock = self._tls.wrap_socket(self._sock, server_hostname=self.host)
            except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                self.close()
                raise ConnectionError(f"no TLS connection to the policy server at {address}: {exc}") from None
        try:
            hello = self._exchange({"op": "hello", "protocol": PROTOCOL, "token": self._token})
        except ConnectionError as exc:
            if self._tls is not None:
                raise
            raise ConnectionError(f"{exc} (if it serves TLS, give --policy-arg tls_ca=FILE)") from None
        previous = getattr(self, "served", None)
        if previous is not None and hello["identity"] != previous["identity"]:
            self.close()
            raise ConnectionError(f"the server at {address} now serves {hello['identity']}, "
                                  f"not {previous['identity']} as when this run started")
        return hello

    def _call(self, request: dict) -> dict:
        if self._sock is None:  # lost at an earlier call: connect again, with the suite chosen then
            self._connect()
            if self._suite is not None:
                self._exchange({"op": "select_suite", "suite": self._suite})
        return self._exchange(request)

    def _exchange(self, request: dict) -> dict:
        address = self.options.address
        try:
            send(self._sock, request)
            reply = receive(self._sock)
        except TypeError:  # the request cannot be packed; nothing was sent
            raise
        except socket.timeout:
            self.close()
            raise TimeoutError(f"the policy server at {address} did not answer a {request['op']!r} request "
                               f"within {self.options.timeout_s:g} s") from None
        except BaseException:  # a broken connection, or a watchdog cutting an exchange short
            self.close()
            raise
        if reply is None:
            self.close()
            raise ConnectionError(f"the policy server at {address} closed the connection")
        error = reply.get("error")
        if error is not None:
            kind = PolicyOptionError if error["type"] == "PolicyOptionError" else RemotePolicyError
            raise kind(f"served policy: {error['type']}: {error['message']}")
        return reply


def read_token(path: str) -> str:
    """A token file's secret: its text without surrounding whitespace (client and server)."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise PolicyOptionError(f"token file {path} cannot be read ({exc.strerror or exc})") from None
    if not token:
        raise PolicyOptionError(f"token file {path} is empty")
    return token


def _client_tls(ca: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=None if ca == "system" else ca)
    except (OSError, ssl.SSLError) as exc:
        raise PolicyOptionError(f"remote: TLS certificate file {ca} cannot be used ({exc})") from None
