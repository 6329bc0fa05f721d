"""Fine-tuning on several processes: two CPU processes (gloo) train as one does on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.distributed import Processes, from_environment, process_device
from bench.finetune import FinetuneConfig, finetune
from tests.fakes import write_demo_file

ROOT = Path(__file__).resolve().parents[2]


def episodes(count, length=12, seed=0):
    rng = np.random.default_rng(seed)
    return [[[x, 0.5 * x, -0.2, 0.01, 0.0, 0.02, -1.0 if t < length // 2 else 1.0]
             for t, x in enumerate(rng.uniform(-0.9, 0.9, length))] for _ in range(count)]


def test_each_process_takes_its_share_and_its_gpu():
    assert Processes(1, 1, 2).share(list(range(8))) == [4, 5, 6, 7]
    assert Processes().share([3, 1]) == [3, 1] and Processes().main and not Processes().distributed
    assert process_device("cuda", Processes(3, 1, 4)) == "cuda:1"
    assert process_device("cpu", Processes(3, 1, 4)) == "cpu"
    assert process_device("cuda:0", Processes()) == "cuda:0"
    with pytest.raises(ValueError, match="give --device cuda, not cuda:0"):
        process_device("cuda:0", Processes(0, 0, 2))


def test_the_environment_places_the_process(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert from_environment() == Processes(3, 1, 4)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="must be integers"):
        from_environment()


def test_a_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, monkeypatch):
    demos = write_demo_file(tmp_path / "demos.hdf5", episodes(2))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 4 .the whole step's. does not divide among 3 processes"):
        finetune(FinetuneConfig(demos=[str(demos)], batch_size=4, policy_args={"device": "cpu", "size": "tiny"}), tmp_path / "run",
                 progress=False)


def torchrun(processes, args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "bench.cli", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def log_of(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("policy", ["oft", "lightvla"])
def test_two_processes_train_as_one_does_on_the_whole_batch(tmp_path, policy):
    demos = write_demo_file(tmp_path / "demos.hdf5", episodes(3))
    val = write_demo_file(tmp_path / "val.hdf5", episodes(2, seed=1))
    args = ["finetune", "--policy", policy, "--policy-arg", "size=tiny", "--device", "cpu", "--demos", str(demos),
            "--val-demos", str(val), "--val-every", "2", "--val-samples", "7", "--steps", "4", "--batch-size", "4",
            "--lora-rank", "2", "--log-every", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*args, "--out", str(tmp_path / "two")])

    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [e["step"] for e in two] == [e["step"] for e in one] == [2, 2, 4, 4]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    assert (tmp_path / "two" / "checkpoint" / "dataset_statistics.json").is_file()
    if policy == "lightvla":  # its selection noise is drawn per process: the runs differ, both train
        assert all(np.isfinite(e.get("loss", e.get("val_loss"))) for e in two)
        assert all(0 < e["selected_tokens"] <= 512 for e in two if "loss" in e)
        return
    # the same batches, augmentations, averaged gradients and validation samples
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "val_visual_tokens", "val_samples"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    a = torch.load(tmp_path / "one" / "state.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "two" / "state.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_process_prepares_only_its_share_of_the_batch_augmented_as_one_process_would(tmp_path, monkeypatch):
    import bench.distributed
    from bench.finetune import Trainer

    monkeypatch.setattr(bench.distributed, "broadcast", lambda tensors, procs: None)  # no process group here

    demos = write_demo_file(tmp_path / "demos.hdf5", episodes(3))
    config = FinetuneConfig(demos=[str(demos)], batch_size=4, lora_rank=2, policy_args={"device": "cpu", "size": "tiny"})
    whole = Trainer(config, tmp_path / "one")
    second = Trainer(config, tmp_path / "two", Processes(1, 1, 2))  # no process group: batches need none
    try:
        for step in (0, 5):
            expected, share = whole.batch(step), second.batch(step)
            assert len(share[2]) == 2 and share[2] == expected[2][2:]
            for mine, all_of_them in zip(share[0:2] + share[3:], expected[0:2] + expected[3:]):
                torch.testing.assert_close(mine, all_of_them[2:], rtol=0, atol=0)
    finally:
        whole.close()
        second.close()
