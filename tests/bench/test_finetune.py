"""Fine-tuning: the loss falls, the checkpoint loads and acts as the trained model, runs resume exactly."""

import json

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.finetune import FinetuneConfig, Trainer, finetune
from policies import make_policy
from policies.base import Observation
from tests.fakes import write_demo_file


def learnable_episodes(count=3, length=14):
    """Each step's first action value is shown by the third-person image's brightness."""
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(count):
        first = rng.uniform(-0.9, 0.9, length)
        episodes.append([[x, 0.5 * x, -0.2, 0.01, 0.0, 0.02, -1.0 if t < length // 2 else 1.0]
                         for t, x in enumerate(first)])
    return episodes


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demo_file(tmp_path_factory.mktemp("demos") / "demos.hdf5", learnable_episodes())


def config(demos, **changes):
    settings = dict(demos=[str(demos)], steps=6, batch_size=2, lora_rank=4, log_every=2)
    policy_args = {"size": "tiny", **changes.pop("policy_args", {})}  # random weights, asked for by name
    return FinetuneConfig(**{**settings, **changes, "policy_args": policy_args})


def observation(demos):
    from bench.demos import read_demos

    demo = read_demos(demos)[0]
    proprio = np.concatenate([demo.obs[k][3] for k in ("ee_pos", "ee_ori", "gripper_states")])
    return Observation(images={"agentview": demo.obs["agentview_rgb"][3], "wrist": demo.obs["eye_in_hand_rgb"][3]},
                       proprio=proprio, instruction=demo.attrs["instruction"], episode_id="e")


def test_the_loss_falls_and_the_run_is_recorded(demos, tmp_path):
    summary = finetune(config(demos, steps=24), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(2, 25, 2))
    assert np.mean([e["loss"] for e in log[-3:]]) < 0.7 * np.mean([e["loss"] for e in log[:3]])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"] == {"demonstrations": 3, "kept_steps": 42, "dropped_noops": 0, "samples": 21,
                                "suites": ["libero_spatial"], "val_demonstrations": 0, "val_samples": 0}
    assert len(manifest["demos"][0]["sha256"]) == 64 and manifest["versions"]["torch"]
    stats = json.loads((summary.checkpoint / "dataset_statistics.json").read_text())
    assert list(stats) == ["libero_spatial_no_noops"]


def test_the_checkpoint_acts_as_the_trained_model(demos, tmp_path):
    trainer_out = tmp_path / "run"
    summary = finetune(config(demos), trainer_out, progress=False)
    policy = make_policy("oft", {"checkpoint": str(summary.checkpoint)})
    policy.select_suite("libero_spatial")
    loaded = policy.act([observation(demos)])[0].actions

    # the same model with its adapters, from the saved training state
    trainer = Trainer(config(demos), trainer_out)
    trainer.load_state()
    trainer.model.eval()
    pixels, proprio, prompts = policy.prepare([observation(demos)])
    with torch.no_grad():
        normalized = trainer.model(pixels, proprio, prompts, policy.tokenizer.stop_id)
    trainer.close()
    from policies.vla.postprocess import gripper_to_env, unnormalize_actions

    expected = gripper_to_env(unnormalize_actions(normalized[0].numpy(), policy.stats["action"]))
    np.testing.assert_allclose(loaded, expected, rtol=1e-4, atol=1e-5)
    untrained = make_policy("oft", {"size": "tiny"})
    assert policy.identity()["weights"] != untrained.identity()["weights"]


def test_the_learning_rate_warms_up_as_ofts_and_then_decays(demos, tmp_path):
    finetune(config(demos, learning_rate=1e-3, lr_warmup=4, decay_at=4, log_every=1), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # step s (from 0) at 0.1 + 0.9 min((s + 1) / 4, 1) of the rate, a tenth of that from step 4
    np.testing.assert_allclose([e["lr"] for e in log], [3.25e-4, 5.5e-4, 7.75e-4, 1e-3, 1e-4, 1e-4], rtol=1e-12)
    plain = finetune(config(demos, log_every=1), tmp_path / "plain", progress=False)
    assert plain.steps == 6 and {json.loads(line)["lr"] for line in (tmp_path / "plain" / "log.jsonl").open()} == {5e-4}


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(demos, tmp_path, monkeypatch):
    whole = finetune(config(demos, save_every=3, lr_warmup=4, decay_at=5), tmp_path / "whole", progress=False)

    original = Trainer.train_step

    def stop_at_step_4(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(demos, save_every=3, lr_warmup=4, decay_at=5), tmp_path / "cut", progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = finetune(None, tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == whole.steps == 6
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert [r["at_step"] for r in manifest["resumed"]] == [3]
    log = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log == [2, 4, 6]  # step 4's line, written after the saved state, was dropped and written again


def test_kept_checkpoints_are_each_saved_steps_model_and_checkpoint_links_to_the_latest(demos, tmp_path):
    out = tmp_path / "run"
    summary = finetune(config(demos, save_every=2, keep_checkpoints=True), out, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint", "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint").is_symlink() and (out / "checkpoint").resolve() == (out / "checkpoint-6").resolve()
    assert summary.checkpoint == out / "checkpoint"
    steps = [json.loads((out / f"checkpoint-{s}" / "finetune.json").read_text())["step"] for s in (2, 4, 6)]
    assert steps == [2, 4, 6]
    actions = {}
    for name in ("checkpoint-2", "checkpoint-6", "checkpoint"):
        policy = make_policy("oft", {"checkpoint": str(out / name)})
        policy.select_suite("libero_spatial")
        actions[name] = policy.act([observation(demos)])[0].actions
    assert np.array_equal(actions["checkpoint"], actions["checkpoint-6"])
    assert not np.array_equal(actions["checkpoint-2"], actions["checkpoint-6"])


def test_only_adapters_and_the_heads_change(demos, tmp_path):
    trainer = Trainer(config(demos), tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    trainer.close()
    assert changed and all(".lora_" in n or n.startswith(("action_head.", "proprio_projector.")) for n in changed)
    # gradients reached the adapters of the vision towers and of the LLM's first layer
    assert any(n.startswith("vision_backbone.") and n.endswith("lora_b") for n in changed)
    assert any(n.startswith("language_model.model.layers.0.") and n.endswith("lora_b") for n in changed)


def test_a_bf16_model_trains_with_float32_adapters_and_its_checkpoint_acts(demos, tmp_path):
    # as on a GPU: the base weights (and the heads, as OFT's) in bfloat16, the adapters in float32
    summary = finetune(config(demos, steps=24, policy_args={"dtype": "bf16"}), tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    trained = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["trainable"]
    assert {v.dtype for n, v in trained.items() if ".lora_" in n} == {torch.float32}
    policy = make_policy("oft", {"checkpoint": str(summary.checkpoint), "dtype": "bf16"})
    policy.select_suite("libero_spatial")
    actions = policy.act([observation(demos)])[0].actions
    assert actions.shape == (8, 7) and np.isfinite(actions).all()


def test_lightvla_trains_through_its_selection_with_annealed_noise(demos, tmp_path):
    summary = finetune(config(demos, policy="lightvla"), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # the noise of the last step of each logged interval: 1 - step / steps
    np.testing.assert_allclose([e["noise_scale"] for e in log], [1 - 1 / 6, 1 - 3 / 6, 1 - 5 / 6])
    assert all(0 < e["selected_tokens"] <= 512 for e in log)
    policy = make_policy("lightvla", {"checkpoint": str(summary.checkpoint)})
    policy.select_suite("libero_spatial")
    output = policy.act([observation(demos)])[0]
    assert 0 < output.stats["visual_tokens"] < 512  # inference keeps the union of argmax


def test_lightvla_star_saves_its_trained_queries(demos, tmp_path):
    args = {"queries": "16", "placement": "llm:1"}
    summary = finetune(config(demos, policy="lightvla_star", policy_args=args), tmp_path / "run", progress=False)
    from policies.pruning.lightvla_star import QUERIES_FILE

    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0 < e["selected_tokens"] <= 16 for e in log)  # at most one token per query
    (saved,) = summary.checkpoint.glob(QUERIES_FILE.format(step="*"))
    trained = torch.load(saved, weights_only=True)["queries"]
    untrained = make_policy("lightvla_star", {**args, "size": "tiny"}).hooks().queries.detach()
    assert trained.shape == untrained.shape and not torch.equal(trained, untrained)
    policy = make_policy("lightvla_star", {**args, "checkpoint": str(summary.checkpoint)})
    torch.testing.assert_close(policy.hooks().queries.detach(), trained)


def test_bad_settings_are_refused_and_nothing_is_overwritten(demos, tmp_path):
    with pytest.raises(ValueError, match="fastv cannot be fine-tuned"):
        finetune(config(demos, policy="fastv"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        finetune(config(demos, steps=0), tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="no fine-tuning run to resume"):
        finetune(None, tmp_path / "c", resume=True, progress=False)
    done = tmp_path / "done"
    finetune(config(demos, steps=2), done, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        finetune(config(demos, steps=2), done, progress=False)


def test_resume_refuses_changed_demonstrations(tmp_path):
    path = write_demo_file(tmp_path / "demos.hdf5", learnable_episodes())
    finetune(config(path, steps=2), tmp_path / "run", progress=False)
    path.unlink()
    write_demo_file(path, learnable_episodes(count=2))
    with pytest.raises(ValueError, match="changed since the run began"):
        finetune(None, tmp_path / "run", resume=True, progress=False)


def test_the_cli(demos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--demos", str(demos), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--lora-rank", "2", "--policy-arg", "size=tiny", "--no-image-aug", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 steps on 21 samples; L1 loss" in printed and str(out / "checkpoint") in printed
    assert "held out" not in printed
    recorded = json.loads((out / "manifest.json").read_text())["config"]
    assert recorded["lora_rank"] == 2 and recorded["image_aug"] is False and recorded["lora_alpha"] == 0.0
    assert main(["finetune", "--out", str(tmp_path / "x")]) == 2
    assert "--demos is required" in capsys.readouterr().err
    assert main(["finetune", "--out", str(out), "--resume", "--steps", "5", "--lr", "1e-3"]) == 2
    assert "recorded settings: leave out --lr, --steps" in capsys.readouterr().err
    assert main(["finetune", "--out", str(out), "--resume", "--no-progress"]) == 0  # nothing left to train
    assert "2 steps on 21 samples" in capsys.readouterr().out


def test_validation_queries_as_evaluation_does_and_leaves_training_unchanged(demos, tmp_path):
    held_out = write_demo_file(tmp_path / "held_out.hdf5", learnable_episodes(count=2), seed=5)
    plain = finetune(config(demos, policy="lightvla"), tmp_path / "plain", progress=False)
    checked = finetune(config(demos, policy="lightvla", val_demos=[str(held_out)], val_every=3, val_samples=5),
                       tmp_path / "checked", progress=False)
    log = [json.loads(line) for line in (tmp_path / "checked" / "log.jsonl").read_text().splitlines()]
    vals = [e for e in log if "val_loss" in e]
    assert [e["step"] for e in vals] == [3, 6] and all(e["val_samples"] == 5 for e in vals)
    # LightVLA's inference selection: kept tokens enter the LLM, not 512 slots
    assert all(0 < e["val_visual_tokens"] < 512 for e in vals) and checked.val_loss == vals[-1]["val_loss"]
    # validating draws nothing from the training's random streams
    a = torch.load(tmp_path / "plain" / "state.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "checked" / "state.pt", weights_only=True)["trainable"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert plain.last_loss == checked.last_loss
    manifest = json.loads((tmp_path / "checked" / "manifest.json").read_text())
    assert manifest["data"]["val_demonstrations"] == 2 and len(manifest["demos"]) == 2


def test_validation_on_a_training_file_is_refused(demos, tmp_path):
    with pytest.raises(ValueError, match="also a training file"):
        finetune(config(demos, val_demos=[str(demos)]), tmp_path / "run", progress=False)


def test_gradient_accumulation_takes_the_same_steps_in_micro_batches(demos, tmp_path):
    val = write_demo_file(tmp_path / "val.hdf5", learnable_episodes(count=1), seed=1)
    settings = dict(batch_size=4, val_demos=[str(val)], val_every=3, val_samples=5)
    whole = finetune(config(demos, **settings), tmp_path / "whole", progress=False)
    split = finetune(config(demos, grad_accumulation=2, **settings), tmp_path / "split", progress=False)
    assert whole.steps == split.steps == 6
    one = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [sorted(e) for e in one] == [sorted(e) for e in two]
    for key in ("loss", "val_loss"):  # validation runs in micro-batches too, to the same values
        np.testing.assert_allclose([e[key] for e in two if key in e], [e[key] for e in one if key in e], rtol=1e-5)
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "split" / "state.pt", weights_only=True)["trainable"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="--batch-size 4 does not divide into 3 micro-batches"):
        finetune(config(demos, batch_size=4, grad_accumulation=3), tmp_path / "bad", progress=False)


def test_fine_tuning_logs_load_as_one_frame(demos, tmp_path):
    from bench.analysis import load_finetune_logs

    val = write_demo_file(tmp_path / "val.hdf5", learnable_episodes(count=1), seed=1)
    finetune(config(demos, steps=4, val_demos=[str(val)], val_every=2, val_samples=4), tmp_path / "runs" / "a",
             progress=False)
    finetune(config(demos, steps=2, policy="lightvla"), tmp_path / "runs" / "b", progress=False)
    frame = load_finetune_logs(tmp_path / "runs")
    a, b = frame[frame.run_id == "a"], frame[frame.run_id == "b"]
    assert a.step.tolist() == [2, 4] and a.loss.notna().all() and a.val_loss.notna().all()
    assert set(a.policy) == {"oft"} and (a.val_samples == 4).all()
    assert b.step.tolist() == [2] and b.val_loss.isna().all() and b.noise_scale.notna().all()
    with pytest.raises(FileNotFoundError, match="no fine-tuning run"):
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "manifest.json").write_text("{}")
        load_finetune_logs(tmp_path / "eval")
