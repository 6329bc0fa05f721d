"""Jobs on a pool of env worker processes: episodes, with the policy answering in batches, or
other work on an env (replaying demonstrations).

Each worker owns one MuJoCo env at a time (reused across the jobs of its task) and runs each
job's ``work`` on it. For an episode (``EpisodeWork``) that is the same episode loop as the
serial runner, with a stand-in policy that forwards each query to the main process. The main
process holds the real policy and answers every worker waiting at a query step with one batched
``act`` call. A worker that dies or hangs is killed and replaced; its job is recorded as an error.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Sequence

from bench.episode import (ERROR, SUCCESS, DescribedError, EpisodeResult, EpisodeSettings, describe_error,
                           end_episode, held_watchdog, run_episode)
from bench.video import EpisodeVideo, finish_video, video_stem
from policies.base import EpisodeInfo, Observation, Policy, PolicyOutput
from suites import TaskSpec

HANG_GRACE_S = 60.0  # beyond the episode watchdog, before a silent worker is killed


def _proc_status_mb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory. (getrusage's figure would include what a forked
    parent had used before the exec.)"""
    return _proc_status_mb("VmHWM")


def rss_mb() -> float:
    return _proc_status_mb("VmRSS")


@dataclass
class Job:
    key: str
    task: TaskSpec
    resets: int  # the resets its env has had before it (see bench.runner.TaskEnv)
    episode: EpisodeInfo | None = None  # an episode's, answered by the pool's policy
    init_state: object = None
    data: object = None  # what other work needs


class WorkerStandIn(Policy):
    """Stands in for the real policy inside a worker: forwards each query to the main process."""

    name = "stand-in"

    def __init__(self, conn, needs_images: bool, needs_privileged: bool, chunk_length: int):
        super().__init__(Policy.Options(chunk_length=chunk_length))
        self.conn = conn
        self.needs_images = needs_images
        self.needs_privileged = needs_privileged

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        with held_watchdog():
            self.conn.send(("query", observations[0]))
            answer = self.conn.recv()
        if isinstance(answer, BaseException):  # the real policy failed on this observation
            raise answer
        return [answer]


class EpisodeWork:
    """A job of ``bench run`` and ``bench record-demos``: one episode. In a worker the policy's
    answers come from the main process; ``here``: the policy is called in this process.
    The job's output: with ``keep_recording``, a successful episode's recorded steps (the env is
    a ``bench.demos.RecordingEnv``); with ``video_dir``, the file name of its video there."""

    def __init__(self, settings: EpisodeSettings, policy: Policy, keep_recording: bool = False, here: bool = False,
                 video_dir: Path | None = None):
        self.settings = settings
        self.traits = (policy.needs_images, policy.needs_privileged, settings.chunk_length)
        self.keep_recording = keep_recording
        self.video_dir = video_dir
        self.policy = policy if here else None  # a worker gets no copy of the policy

    def __call__(self, env, job: Job, conn) -> tuple[EpisodeResult, object]:
        policy = self.policy if self.policy is not None else WorkerStandIn(conn, *self.traits)
        video = EpisodeVideo(self.video_dir, video_stem(job.episode)) if self.video_dir else None
        result = run_episode(env, policy, job.episode, job.init_state, self.settings,
                             on_frame=video.add if video else None)
        if video is not None:
            return result, finish_video(video, result.outcome)
        return result, (env.steps if self.keep_recording and result.outcome == SUCCESS else None)


def _run_job(envs, work: Callable, job: Job, conn) -> tuple[EpisodeResult, object]:
    """``work`` on the job's env, brought to the job's resets; a failure is the job's error."""
    try:
        result, output = work(envs.get(job.task, job.resets), job, conn)
    except Exception as exc:  # noqa: BLE001 - env construction (or the work) failed
        result, output = EpisodeResult(outcome=ERROR, error=describe_error(exc)), None
    if result.outcome == ERROR:
        envs.discard()
    return result, output


def run_here(jobs: list[Job], env_factory: Callable, work: Callable,
             on_result: Callable[[Job, EpisodeResult, object], None]) -> None:
    """The jobs one after another in this process, as a pool's worker runs them."""
    from bench.runner import TaskEnv

    envs = TaskEnv(env_factory)
    try:
        for job in jobs:
            on_result(job, *_run_job(envs, work, job, None))
    finally:
        envs.discard()


def _worker_main(conn, env_factory, work: Callable) -> None:
    from bench.runner import TaskEnv

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    envs = TaskEnv(env_factory)
    conn.send(("ready",))
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            result, output = _run_job(envs, work, job, conn)
            conn.send(("done", result, output, (rss_mb(), peak_rss_mb())))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        envs.discard()


@dataclass
class _Worker:
    process: mp.Process
    conn: object
    job: Job | None = None
    ready: bool = False  # the process got as far as waiting for episodes
    started: float = 0.0
    latencies: list = field(default_factory=list)
    task_key: str | None = None


class PoolStartError(RuntimeError):
    pass


class WorkerPool:
    """``work(env, job, conn) -> (result, output)`` runs in the workers (picklable, as is
    ``env_factory``); ``policy``, where the work queries one, answers in this process.
    ``hang_limit_s``: the work's own time limit, after which (and a grace) a silent worker is killed."""

    def __init__(self, workers: int, env_factory: Callable, work: Callable, policy: Policy | None = None,
                 max_batch: int = 0, hang_limit_s: float | None = None):
        self.size = workers
        self.env_factory = env_factory
        self.work = work
        self.policy = policy
        self.max_batch = max_batch or workers
        self.hang_limit_s = hang_limit_s
        self._ctx = mp.get_context("spawn")  # no inherited GL contexts or simulator state
        self.workers: list[_Worker] = []
        self.start_failures = 0
        self.peak_rss_mb: dict[int, float] = {}
        self.rss_after_episode_mb: dict[int, list[float]] = {}  # per worker pid, for leak checks
        self._answered = False  # whether the policy has answered a query yet

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, args=(child, self.env_factory, self.work), daemon=True
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def run(self, jobs: list[Job], on_result: Callable[[Job, EpisodeResult, object], None]) -> None:
        """Run every job; ``on_result(job, result, output)`` is called in the main process as each ends
        (``output``: what the work gave besides its result; None for an error)."""
        queues: dict[str, deque] = {}
        for job in jobs:
            queues.setdefault(job.task.key, deque()).append(job)
        self.workers = [self._spawn() for _ in range(min(self.size, len(jobs)) or 1)]
        try:
            while any(queues.values()) or any(w.job for w in self.workers):
                for worker in self.workers:
                    if worker.job is None:
                        self._assign(worker, queues, on_result)
                busy = [w for w in self.workers if w.job is not None]
                if not busy:
                    break
                ready = wait([w.conn for w in busy], timeout=1.0)
                queries = []
                for worker in busy:
                    if worker.conn not in ready:
                        continue
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        if worker.ready:
                            self._replace(worker, on_result, "worker process died")
                        else:
                            self._start_failed(worker, queues)
                        continue
                    if message[0] == "ready":
                        worker.ready = True
                    elif message[0] == "query":
                        queries.append((worker, message[1]))
                    else:
                        self._finish(worker, *message[1:], on_result)
                self._answer(queries)
                self._kill_hung(on_result)
        finally:
            self.close()

    def _assign(self, worker: _Worker, queues: dict[str, deque], on_result) -> None:
        while (job := self._next_job(worker, queues)) is not None:
            try:
                if self.policy is not None:
                    self.policy.reset(job.episode)
            except Exception as exc:  # noqa: BLE001 - as in the serial loop: that episode's error
                result = EpisodeResult(outcome=ERROR, error=describe_error(exc))
                end_episode(self.policy, job.episode, result)
                on_result(job, result, None)
                continue
            worker.job, worker.task_key, worker.started, worker.latencies = job, job.task.key, time.monotonic(), []
            worker.conn.send(job)
            return

    def _next_job(self, worker: _Worker, queues: dict[str, deque]) -> Job | None:
        # Stay on the worker's task while it has episodes (its env is built); else take the
        # task with most episodes left that no other worker is on.
        key = worker.task_key if queues.get(worker.task_key) else None
        if key is None:
            taken = {w.task_key for w in self.workers if w is not worker and w.job is not None}
            candidates = [k for k, q in queues.items() if q]
            if not candidates:
                return None
            key = max(candidates, key=lambda k: (k not in taken, len(queues[k])))
        return queues[key].popleft()

    def _answer(self, queries: list) -> None:
        for start in range(0, len(queries), self.max_batch):
            batch = queries[start : start + self.max_batch]
            t0 = time.perf_counter()
            try:
                outputs = self.policy.act([obs for _, obs in batch])
                self.policy.synchronize()
                if len(outputs) != len(batch):
                    raise ValueError(f"policy returned {len(outputs)} outputs for {len(batch)} observations")
            except Exception as exc:  # noqa: BLE001 - a policy failure is each waiting episode's error
                outputs = [exc] * len(batch)
            latency_ms = (time.perf_counter() - t0) * 1000.0
            # The run's first answer pays the policy's lazy initialisation; it is kept out of the
            # latency summary of whichever episode it went to.
            first = not self._answered and any(isinstance(o, PolicyOutput) for o in outputs)
            self._answered = self._answered or first
            for (worker, _), output in zip(batch, outputs):
                if isinstance(output, PolicyOutput):
                    output.stats = {**output.stats, "batch_size": len(batch), **({"warmup": True} if first else {})}
                worker.latencies.append(latency_ms)
                self._send_answer(worker, output)

    def _send_answer(self, worker: _Worker, output) -> None:
        if isinstance(output, BaseException):  # sent as text: not every exception pickles
            output = DescribedError(describe_error(output))
        try:
            worker.conn.send(output)
        except (BrokenPipeError, OSError):
            pass  # a dead worker is noticed and replaced on the next receive

    def _finish(self, worker: _Worker, result: EpisodeResult, output, memory: tuple, on_result) -> None:
        job, worker.job = worker.job, None
        if self.policy is not None:
            end_episode(self.policy, job.episode, result)  # the real policy lives here; the worker's stand-in has no state
            result.query_latency_ms = worker.latencies  # the policy's own time, not the round trip
        current, peak = memory
        self.peak_rss_mb[worker.process.pid] = peak
        self.rss_after_episode_mb.setdefault(worker.process.pid, []).append(current)
        on_result(job, result, output)

    def _start_failed(self, worker: _Worker, queues: dict[str, deque]) -> None:
        """A worker died before it could run anything: its episode goes back in the queue,
        and if that keeps happening the run stops with an explanation instead of recording
        every episode as an error."""
        self.start_failures += 1
        code = worker.process.exitcode
        if worker.job is not None:
            queues[worker.job.task.key].appendleft(worker.job)
            worker.job = None
        if self.start_failures > 2 * self.size:
            raise PoolStartError(
                f"env worker processes exit before they start (exit code {code}, {self.start_failures} times). "
                "A script that runs episodes with workers must guard its entry point with "
                "`if __name__ == \"__main__\":`, because workers are started with 'spawn'."
            )
        self._replace(worker, on_result=None, reason="")

    def _replace(self, worker: _Worker, on_result, reason: str) -> None:
        job = worker.job
        worker.process.kill()
        worker.process.join(timeout=10)
        reason = f"{reason} (exit code {worker.process.exitcode})"
        index = self.workers.index(worker)
        self.workers[index] = self._spawn()
        if job is not None and on_result is not None:
            result = EpisodeResult(outcome=ERROR, error=reason, wall_s=time.monotonic() - worker.started)
            if self.policy is not None:
                end_episode(self.policy, job.episode, result)
            on_result(job, result, None)

    def _kill_hung(self, on_result) -> None:
        limit = (self.hang_limit_s or float("inf")) + HANG_GRACE_S
        for worker in list(self.workers):
            if worker.job is not None and time.monotonic() - worker.started > limit:
                self._replace(worker, on_result, f"worker hung for more than {limit:g} s and was killed")

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.workers = []

