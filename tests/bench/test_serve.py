import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.analysis import load_results
from bench.config import RunConfig
from bench.records import EPISODES, RunDirError, read_episodes, read_manifest
from bench.runner import execute
from bench.serve import ServerThread
from policies import EpisodeInfo, Observation, make_policy
from policies.base import PolicyOptionError
from policies.remote import RemotePolicyError
from tests.fakes import CountingPolicy, FakeEnv, fake_env

REPO = Path(__file__).resolve().parents[2]


class ActionLog:
    """An env factory whose envs note every episode's actions, in the order episodes run."""

    def __init__(self):
        self.episodes: list[list[np.ndarray]] = []

    def __call__(self, task):
        log = self

        class Env(FakeEnv):
            def reset(self, init_state):
                super().reset(init_state)
                log.episodes.append(self.actions)

        return Env(task, succeed_after=10 + 12 + 3 * task.index)


def config(**overrides):
    base = dict(suite="libero_goal", policy="random", policy_args={"scale": "0.5"}, tasks=[0, 1],
                episodes_per_task=2, max_steps=40, workers=1)
    base.update(overrides)
    return RunConfig(**base)


def remote(address: str, **overrides) -> RunConfig:
    return config(policy="remote", policy_args={"address": address}, **overrides)


def outcomes(run_dir):
    return sorted((r["key"], r["outcome"], r["steps"]) for r in read_episodes(run_dir))


def episode(key: str) -> EpisodeInfo:
    return EpisodeInfo(key, "libero_goal", 0, "task", "do it", 0, seed=3)


def test_a_served_policy_plays_the_episodes_a_local_one_plays(tmp_path):
    local, served = ActionLog(), ActionLog()
    execute(config(), tmp_path / "local", env_factory=local, progress=False)
    policy = make_policy("random", {"scale": "0.5"})
    with ServerThread(policy, {"scale": "0.5"}) as server:
        execute(remote(server.address), tmp_path / "served", env_factory=served, progress=False)
    assert outcomes(tmp_path / "served") == outcomes(tmp_path / "local")
    assert len(served.episodes) == 4
    for a, b in zip(served.episodes, local.episodes, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    manifest = read_manifest(tmp_path / "served")
    assert manifest["policy"] == {"name": "remote", "served": policy.identity()}
    assert manifest["policy_provenance"]["served"] == {"policy": "random", "policy_args": {"scale": "0.5"},
                                                       "address": server.address}
    assert "torch" in manifest["policy_provenance"]["versions"]
    assert read_manifest(tmp_path / "local")["policy_provenance"] is None
    df = load_results(tmp_path / "served")
    assert set(df.policy) == {"random"} and set(df.policy_label) == {"random scale=0.5 (served)"}
    assert all(r["policy_stats"]["served_ms"] >= 0 for r in read_episodes(tmp_path / "served"))


def test_a_served_vla_answers_as_the_same_vla_here():
    pytest.importorskip("torch")
    from tests.tiny_vla import fake_observation

    args = {"size": "tiny"}  # LightVLA on random weights drawn from the seed
    here = make_policy("lightvla", args, seed=3)
    observations = [fake_observation(1), fake_observation(2)]
    with ServerThread(make_policy("lightvla", args, seed=3), args) as server:
        client = make_policy("remote", {"address": server.address})
        answers = {}
        for name, policy in (("served", client), ("here", here)):
            policy.select_suite("libero_spatial")
            for obs in observations:
                policy.reset(EpisodeInfo(obs.episode_id, "libero_spatial", 0, "task", obs.instruction, 0, 0))
            answers[name] = policy.act(observations)
    assert client.identity() == {"name": "remote", "served": here.identity()}
    assert client.needs_images and client.chunk_length == here.chunk_length
    for served, local in zip(answers["served"], answers["here"], strict=True):
        np.testing.assert_array_equal(served.actions, local.actions)
        assert served.stats["visual_tokens_llm"] == local.stats["visual_tokens_llm"]
        assert served.stats["served_batch"] == 2


def test_a_worker_pool_runs_through_the_server(tmp_path):
    execute(config(tasks=[0, 1, 2]), tmp_path / "local", env_factory=fake_env, progress=False)
    with ServerThread(make_policy("random", {"scale": "0.5"})) as server:
        execute(remote(server.address, tasks=[0, 1, 2], workers=2), tmp_path / "pool", env_factory=fake_env,
                progress=False)
    assert outcomes(tmp_path / "pool") == outcomes(tmp_path / "local")


def test_a_batch_of_observations_is_one_call_of_the_served_policy():
    policy = Noting()
    calls = []
    act = policy.act
    policy.act = lambda observations: calls.append(len(observations)) or act(observations)
    with ServerThread(policy) as server:
        client = make_policy("remote", {"address": server.address})
        for key in ("a", "b"):
            client.reset(episode(key))
        outputs = client.act([Observation(np.full(8, i), "do it", key) for i, key in enumerate("ab")])
    assert calls == [2] and [obs.episode_id for obs in policy.seen] == ["a", "b"]
    assert [out.actions[0, 0] for out in outputs] == [0, 10]  # each its own chunk, in order
    np.testing.assert_array_equal(policy.seen[1].proprio, np.full(8, 1))


def test_a_run_resumes_only_with_the_policy_it_was_recorded_with(tmp_path):
    run = tmp_path / "run"

    def stop_after_two_episodes():
        lines = (run / EPISODES).read_text().splitlines(keepends=True)
        (run / EPISODES).write_text("".join(lines[:2]))

    with ServerThread(make_policy("random", {"scale": "0.5"})) as server:
        execute(remote(server.address), run, env_factory=fake_env, progress=False)
        stop_after_two_episodes()
        execute(remote(server.address), run, resume=True, env_factory=fake_env, progress=False)
    assert len(read_episodes(run)) == 4
    (resumed,) = read_manifest(run)["resumes"]
    assert resumed["policy_provenance"]["served"]["policy_args"] == {}
    stop_after_two_episodes()
    with ServerThread(make_policy("random", {"scale": "0.25"})) as server:
        with pytest.raises(RunDirError, match="policy identity"):
            execute(remote(server.address), run, resume=True, env_factory=fake_env, progress=False)
    assert len(read_episodes(run)) == 2


def test_a_server_outage_costs_errors_that_a_retry_runs_again(tmp_path):
    execute(config(), tmp_path / "local", env_factory=fake_env, progress=False)
    server = ServerThread(make_policy("random", {"scale": "0.5"}))
    started = []

    def outage_at_the_third_episode(task):
        class Env(FakeEnv):
            def reset(self, init_state):
                super().reset(init_state)
                started.append(task.index)
                if len(started) == 3:
                    server.stop()  # mid-run: its connections end with it

        return Env(task, succeed_after=10 + 12 + 3 * task.index)

    run = tmp_path / "served"
    execute(remote(server.address), run, env_factory=outage_at_the_third_episode, progress=False)
    records = read_episodes(run)
    assert [r["outcome"] for r in records] == ["success", "success", "error", "error"]
    assert "closed the connection" in records[2]["error"] and "no policy server answers" in records[3]["error"]
    with ServerThread(make_policy("random", {"scale": "0.5"}), port=server.port):
        execute(remote(server.address), run, resume=True, env_factory=fake_env, progress=False, retry_errors=True)
    assert outcomes(run) == outcomes(tmp_path / "local")


class FailsOnEpisode(CountingPolicy):
    def act(self, observations):
        if any(obs.episode_id == "libero_goal/1/0" for obs in observations):
            raise RuntimeError("out of GPU memory")
        return super().act(observations)


def test_a_failing_served_policy_is_that_episodes_error_and_the_run_goes_on(tmp_path):
    with ServerThread(FailsOnEpisode(needs_images=False)) as server:
        execute(remote(server.address), tmp_path / "run", env_factory=fake_env, progress=False)
    records = {r["key"]: r for r in read_episodes(tmp_path / "run")}
    assert records["libero_goal/1/0"]["outcome"] == "error"
    assert "served policy: RuntimeError: out of GPU memory" in records["libero_goal/1/0"]["error"]
    assert sorted(k for k, r in records.items() if r["outcome"] == "success") == [
        "libero_goal/0/0", "libero_goal/0/1", "libero_goal/1/1"]


def test_no_server_and_a_bad_address_are_clear_errors():
    with pytest.raises(PolicyOptionError, match="HOST:PORT"):
        make_policy("remote", {"address": "gpu-box"})
    with ServerThread(CountingPolicy()) as server:
        port = server.port
    with pytest.raises(ConnectionError, match=f"no policy server answers at 127.0.0.1:{port}"):
        make_policy("remote", {"address": f"127.0.0.1:{port}"})


class Noting(CountingPolicy):
    def __init__(self):
        super().__init__(chunk=4, needs_images=False)
        self.suites: list[str] = []

    def select_suite(self, suite):
        self.suites.append(suite)


def test_a_lost_connection_fails_the_episode_under_way_and_the_next_one_reconnects():
    policy = Noting()
    with ServerThread(policy) as server:
        client = make_policy("remote", {"address": server.address})
        assert client.chunk_length == 4 and client.needs_images is False
        client.select_suite("libero_goal")
        client.reset(episode("a"))
        client.close()  # as a network failure would
        with pytest.raises(ConnectionError, match="lost during episode a"):
            client.act([Observation(np.zeros(8), "do it", "a")])
        client.reset(episode("b"))
        (out,) = client.act([Observation(np.zeros(8), "do it", "b")])
        assert out.actions.shape == (4, 7) and "served_ms" in out.stats
        client.end(episode("a"))  # nothing to tell: the server dropped it
        client.end(episode("b"))
        deadline = time.time() + 5
        while "a" not in policy.ended and time.time() < deadline:  # freed when the connection closed
            time.sleep(0.01)
    assert policy.suites == ["libero_goal", "libero_goal"]  # chosen again on the new connection
    assert policy.ended == ["a", "b"]


def test_a_server_restarted_with_another_policy_is_refused():
    with ServerThread(make_policy("random", {"scale": "0.5"})) as first:
        client = make_policy("remote", {"address": first.address})
        port = first.port
    client.close()
    with ServerThread(make_policy("random", {"scale": "0.25"}), port=port):
        with pytest.raises(ConnectionError, match="now serves"):
            client.reset(episode("a"))


def test_clients_evaluating_different_suites_do_not_share_a_server():
    with ServerThread(Noting()) as server:
        first, second = (make_policy("remote", {"address": server.address}) for _ in range(2))
        first.select_suite("libero_10")
        second.select_suite("libero_10")  # the same suite is fine
        with pytest.raises(PolicyOptionError, match="evaluating libero_10 for another client"):
            second.select_suite("libero_goal")
        first.close()
        deadline = time.time() + 5
        while True:  # once the first client is gone, its suite is free
            try:
                second.select_suite("libero_goal")
                break
            except PolicyOptionError:
                assert time.time() < deadline
                time.sleep(0.01)


def test_a_served_policy_error_on_a_call_keeps_the_connection():
    with ServerThread(FailsOnEpisode(needs_images=False)) as server:
        client = make_policy("remote", {"address": server.address})
        client.reset(EpisodeInfo("libero_goal/1/0", "libero_goal", 1, "t", "do it", 0, 0))
        with pytest.raises(RemotePolicyError, match="out of GPU memory"):
            client.act([Observation(np.zeros(8), "do it", "libero_goal/1/0")])
        client.reset(episode("fine"))
        assert len(client.act([Observation(np.zeros(8), "do it", "fine")])) == 1


class Gated(Noting):
    """Its first call waits for the gate, so that other clients' queries queue up meanwhile."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.calls: list[list[str]] = []

    def act(self, observations):
        self.calls.append([obs.episode_id for obs in observations])
        if len(self.calls) == 1:
            self.gate.wait(10)
        return super().act(observations)


@pytest.mark.parametrize("max_batch", [0, 1])
def test_queries_that_wait_together_are_answered_by_one_call(max_batch):
    policy = Gated()
    answers = {}
    with ServerThread(policy, max_batch=max_batch) as server:
        clients = {key: make_policy("remote", {"address": server.address}) for key in "abc"}
        for key, client in clients.items():
            client.reset(episode(key))

        def query(key):
            answers[key] = clients[key].act([Observation(np.zeros(8), "do it", key)])[0]

        threads = {key: threading.Thread(target=query, args=(key,)) for key in "abc"}
        threads["a"].start()
        deadline = time.time() + 5
        while not policy.calls and time.time() < deadline:
            time.sleep(0.01)
        threads["b"].start()
        threads["c"].start()
        deadline = time.time() + 5
        while server.state.waiting() < 2 and time.time() < deadline:  # b and c wait while a is answered
            time.sleep(0.01)
        assert server.state.waiting() == 2
        policy.gate.set()
        for thread in threads.values():
            thread.join(10)
    calls = [sorted(call) for call in policy.calls]
    assert calls[0] == ["a"]
    assert sorted(calls[1:]) == ([["b", "c"]] if max_batch == 0 else [["b"], ["c"]])
    order = [obs.episode_id for obs in policy.seen]
    for key, answer in answers.items():  # each client its own chunk
        assert answer.actions[0, 0] == 10 * order.index(key)
        assert answer.stats["served_batch"] == (2 if max_batch == 0 and key != "a" else 1)


class OddStats(CountingPolicy):
    def act(self, observations):
        outputs = super().act(observations)
        if observations[0].instruction == "odd":
            outputs[0].stats["handle"] = object()
        return outputs


def test_what_cannot_cross_is_an_error_of_that_call_and_the_connection_stays():
    with ServerThread(OddStats(chunk=4, needs_images=False)) as server:
        client = make_policy("remote", {"address": server.address})
        client.reset(episode("a"))
        with pytest.raises(RemotePolicyError, match="answer cannot be sent: a value of type object"):
            client.act([Observation(np.zeros(8), "odd", "a")])
        with pytest.raises(TypeError, match="type set cannot be sent"):
            client.act([Observation(np.zeros(8), "do it", "a", privileged={"ids": {1, 2}})])
        assert client.act([Observation(np.zeros(8), "do it", "a")])[0].actions.shape == (4, 7)


def test_bench_serve_on_every_network_names_this_machine_to_its_clients(monkeypatch, capsys):
    import bench.serve
    from bench.cli import main

    monkeypatch.setattr(bench.serve, "serve", lambda *args, on_ready, **kwargs: on_ready(("0.0.0.0", 8765)))
    assert main(["serve", "--policy", "noop", "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert f"--policy-arg address={socket.gethostname()}:8765" in out and "on 0.0.0.0:8765" in out


def test_bench_serve_answers_a_run_and_stops_on_ctrl_c(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A shell's background jobs inherit an ignored SIGINT, and Python then never raises
    # KeyboardInterrupt: give the server the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "bench", "serve", "--policy", "random", "--policy-arg", "scale=0.5",
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving random scale=0.5 on 127.0.0.1:"), line
        address = line.split(" on ")[1].split(";")[0]
        execute(remote(address, tasks=[0], episodes_per_task=1), tmp_path / "run", env_factory=fake_env,
                progress=False)
        assert [r["outcome"] for r in read_episodes(tmp_path / "run")] == ["success"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        log = proc.stderr.read()
        assert "evaluates libero_goal" in log and " connected" in log and "server stopped" in log
    finally:
        proc.kill()
        proc.wait()


def test_a_server_with_a_token_answers_only_clients_that_give_it(tmp_path):
    from policies.wire import PROTOCOL, receive, send

    secret = tmp_path / "token"
    secret.write_text("s3cret-7f1c\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("guess")
    policy = Noting()
    with ServerThread(policy, token="s3cret-7f1c") as server:
        with pytest.raises(RemotePolicyError, match="needs its token: give the client --policy-arg token_file"):
            make_policy("remote", {"address": server.address})
        with pytest.raises(RemotePolicyError, match="the token is not this server's"):
            make_policy("remote", {"address": server.address, "token_file": str(wrong)})
        client = make_policy("remote", {"address": server.address, "token_file": str(secret)})
        client.select_suite("libero_goal")
        client.reset(episode("a"))
        (out,) = client.act([Observation(np.zeros(8), "do it", "a")])
        assert out.actions.shape == (4, 7)
        # a connection that skips the hello is answered once, then closed
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            send(raw, {"op": "select_suite", "suite": "libero_10"})
            assert "hello with its token first" in receive(raw)["error"]["message"]
            assert receive(raw) is None
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            send(raw, {"op": "hello", "protocol": PROTOCOL, "token": "guess"})
            assert receive(raw)["error"]["type"] == "AuthenticationError" and receive(raw) is None
    assert policy.suites == ["libero_goal"]  # the refused connections reached nothing
    with pytest.raises(PolicyOptionError, match="token file .*missing cannot be read"):
        make_policy("remote", {"address": "127.0.0.1:1", "token_file": str(tmp_path / "missing")})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made by the openssl tool."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_a_tls_server_answers_clients_that_trust_its_certificate(certificate, tmp_path):
    from bench.serve import server_tls

    cert, key = certificate
    with ServerThread(Noting(), tls=server_tls(str(cert), str(key))) as server:
        client = make_policy("remote", {"address": server.address, "tls_ca": str(cert)})
        client.select_suite("libero_goal")
        client.reset(episode("a"))
        (out,) = client.act([Observation(np.zeros(8), "do it", "a")])
        assert out.actions.shape == (4, 7)
        with pytest.raises(ConnectionError, match="if it serves TLS, give --policy-arg tls_ca=FILE"):
            make_policy("remote", {"address": server.address})
        with pytest.raises(ConnectionError, match="no TLS connection .*certificate verify failed"):
            make_policy("remote", {"address": server.address, "tls_ca": "system"})
    with ServerThread(Noting()) as plain:
        with pytest.raises(ConnectionError, match="no TLS connection"):
            make_policy("remote", {"address": plain.address, "tls_ca": str(cert)})
    with pytest.raises(ValueError, match="cannot be used"):
        server_tls(str(cert), str(tmp_path / "no-key.pem"))


def test_bench_serve_refuses_half_a_tls_setting(capsys):
    from bench.cli import main

    assert main(["serve", "--policy", "noop", "--tls-cert", "cert.pem"]) == 2
    assert "TLS needs both --tls-cert and --tls-key" in capsys.readouterr().err
