"""Fine-tune OpenVLA-OFT, LightVLA or LightVLA* on demonstrations, as their reference recipes do.

The recipe (OpenVLA-OFT's ``finetune.py``, which LightVLA's training follows): LoRA adapters of
rank 32 and alpha min(rank, 16) on every linear layer, the action head and proprio projector
trained whole, the L1 loss between the predicted and the demonstrated normalised action chunks,
AdamW at 5e-4 with a tenfold decay after ``decay_at`` steps (and, if asked, OFT's linear warmup
from a tenth of the rate over ``lr_warmup`` steps), camera images augmented
(``policies.vla.augment``). LightVLA trains through its straight-through selection with noise
annealed from 1 to 0 over the run; LightVLA* trains its queries too.

A run directory holds ``manifest.json`` (settings, the base policy, the demonstration files
with their SHA-256, versions), ``log.jsonl`` (loss, learning rate, noise, LightVLA's distinct
selected tokens, time per logged interval), ``state.pt`` (adapters, trained parts, optimiser: what a resumed run continues
from) and ``checkpoint/``, the merged model in the OpenVLA-OFT layout with
``dataset_statistics.json`` under each suite's ``<suite>_no_noops`` key: ``bench run --policy
lightvla --checkpoint OUT/checkpoint`` evaluates it. A run is deterministic given its seed: the
batches, augmentations and selection noise of step s depend on (seed, s) alone, so a resumed
run continues as an uninterrupted one would.

Started by ``torchrun --nproc_per_node N``, the run trains on N processes (one per GPU, see
``bench.distributed``): each computes its share of every step's batch (``batch_size`` is the
whole step's), with the same augmentation as one process would give those samples.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench import distributed
from bench.distributed import Processes
from bench.records import write_json_atomic
from bench.training_data import CAMERA_KEYS, TrainingSet

TRAINABLE_POLICIES = ("oft", "lightvla", "lightvla_star")
MANIFEST = "manifest.json"
LOG = "log.jsonl"
STATE = "state.pt"
CHECKPOINT = "checkpoint"


@dataclass
class FinetuneConfig:
    demos: list[str]
    policy: str = "oft"
    policy_args: dict[str, str] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 8  # samples per step, over all processes
    grad_accumulation: int = 1  # micro-batches each process splits its share into (one optimiser step)
    learning_rate: float = 5e-4
    decay_at: int = 0  # step after which the learning rate is a tenth (0: never)
    lr_warmup: int = 0  # steps over which the rate rises linearly from a tenth to full (0: none)
    lora_rank: int = 32
    lora_alpha: float = 0.0  # 0: min(rank, 16), as OFT
    image_aug: bool = True
    drop_noops: bool = True
    save_every: int = 0  # also write state and checkpoint every N steps (0: at the end only)
    keep_checkpoints: bool = False  # each saved step's checkpoint as checkpoint-STEP (else one, replaced)
    log_every: int = 10
    seed: int = 0
    val_demos: list[str] = field(default_factory=list)  # held-out files: L1 loss with inference's selection
    val_every: int = 0  # validate every N steps too (0: at the end only)
    val_samples: int = 256  # spread evenly over the held-out samples

    def check(self) -> None:
        if self.policy not in TRAINABLE_POLICIES:
            raise ValueError(f"{self.policy} cannot be fine-tuned (trainable: {', '.join(TRAINABLE_POLICIES)}); "
                             "the training-free methods run on a fine-tuned oft checkpoint")
        for name in ("steps", "batch_size", "grad_accumulation", "lora_rank", "log_every", "val_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("decay_at", "lr_warmup", "save_every", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(f"--batch-size {self.batch_size} does not divide into {self.grad_accumulation} "
                             "micro-batches (--grad-accumulation)")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(min(self.lora_rank, 16))


@dataclass
class FinetuneSummary:
    out: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    samples: int
    checkpoint: Path
    val_loss: float | None = None  # the last validation's


class Trainer:
    """One fine-tuning run: the policy's model with adapters, its data and optimiser."""

    def __init__(self, config: FinetuneConfig, out: Path, procs: Processes = Processes(), device: str | None = None):
        """``device``: this process's, where it is not the configured one (one GPU per process)."""
        import torch

        from policies import make_policy
        from policies.vla.lora import add_lora

        config.check()
        self.config, self.out, self.procs = config, Path(out), procs
        args = {**config.policy_args, "cuda_graphs": "false", "speedups": "none"}  # training runs eagerly
        if device is not None:
            args["device"] = device
        self.policy = make_policy(config.policy, args, seed=config.seed)
        self.model = self.policy.model
        self.hooks = self.policy.hooks()
        chunk = self.model.config.chunk_length
        self.data = TrainingSet([Path(p) for p in config.demos], chunk, config.drop_noops)
        self.val = TrainingSet([Path(p) for p in config.val_demos], chunk, config.drop_noops,
                               stats=self.data.stats) if config.val_demos else None
        self.adapted = add_lora(self.model, config.lora_rank, config.alpha, seed=config.seed)
        trained_whole = [self.model.action_head, self.model.proprio_projector]
        if isinstance(self.hooks, torch.nn.Module):  # LightVLA*'s queries
            self.model.add_module("token_queries", self.hooks)
            trained_whole.append(self.hooks)
        for module in trained_whole:
            for p in module.parameters():
                p.requires_grad_(True)
        # LightVLA's selection: straight-through, with noise; LightVLA*'s queries are part of the model now
        self.set_training(True)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # the processes draw the same initial values from the seed; rank 0's make sure of it
        distributed.broadcast(self.trainable.values(), procs)
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step = 0
        self._selected = None  # LightVLA's distinct selected tokens in the last step, mean over its samples
        self.last_lr = None  # the learning rate of the last step
        self._order: tuple[int, np.ndarray] | None = None  # an epoch and its sample order
        self._threads = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="images")
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: tuple[int, Future] | None = None  # the next step's batch, prepared while this one trains

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (from 0), relative to the configured one.
        The warmup is OFT's (step s at 0.1 + 0.9 min((s + 1) / warmup, 1)); OFT's script sets the
        rate outright at every step while warming up, which also undoes its decay: here they multiply."""
        warmup, decay_at = self.config.lr_warmup, self.config.decay_at
        warm = 0.1 + 0.9 * min((step + 1) / warmup, 1.0) if warmup else 1.0
        return warm * (0.1 if decay_at and step >= decay_at else 1.0)

    # --- data ---------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> list[int]:
        """The samples of ``step``: epochs are permutations fixed by (seed, epoch)."""
        n, b = len(self.data), self.config.batch_size
        out = []
        for k in range(step * b, (step + 1) * b):
            epoch, position = divmod(k, n)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([self.config.seed, epoch]).permutation(n))
            out.append(int(self._order[1][position]))
        return out

    def batch(self, step: int):
        """(pixels, proprio, prompts, target actions) of this process's share of ``step`` on the
        model's device. The augmentation draws are the whole step's, so a sample is augmented
        alike whichever process takes it."""
        indices, cameras = self.batch_indices(step), len(CAMERA_KEYS)
        rng = np.random.default_rng([self.config.seed, step, 1])
        draws = [rng.random() if self.config.image_aug else None for _ in range(len(indices) * cameras)]
        mine = self.procs.share(list(range(len(indices))))
        return self.tensors(self.data, [indices[i] for i in mine],
                            [draws[i * cameras + c] for i in mine for c in range(cameras)], crop=False)

    def next_batch(self):
        """``batch(step)``, prepared in the background during the step before; starts the next one's."""
        if self._next is not None and self._next[0] == self.step:
            batch = self._next[1].result()
        else:
            batch = self.batch(self.step)
        following = self.step + 1
        self._next = (following, self._prefetcher.submit(self.batch, following)) if following < self.config.steps else None
        return batch

    def close(self) -> None:
        if self._next is not None:
            self._next[1].cancel()
        self._prefetcher.shutdown(wait=True)
        self._threads.shutdown(wait=True)
        self.data.close()
        if self.val is not None:
            self.val.close()

    def tensors(self, data: TrainingSet, indices: list[int], draws: list[float | None] | None, crop: bool):
        """The samples' (pixels, proprio, prompts, target actions) on the model's device: images
        augmented by their ``draws`` (one per sample and camera), else centre-cropped or not (``crop``)."""
        import torch

        from policies.vla.augment import augment_image
        from policies.vla.preprocess import pixel_values, prepare_image

        cfg = self.model.config
        samples = [data.sample(index) for index in indices]
        cameras = len(CAMERA_KEYS)
        draws = draws or [None] * (len(samples) * cameras)

        def prepared(job):
            image, from_jpeg, u = job
            image = prepare_image(image, cfg.image_sizes[0], crop=crop, from_jpeg=from_jpeg)
            return image if u is None else augment_image(image, u)

        # numpy and JPEG coding release the GIL: the batch's images on several threads
        jobs = zip([i for s in samples for i in s["images"]], [s["from_jpeg"] for s in samples for _ in range(cameras)],
                   draws)
        images = list(self._threads.map(prepared, jobs))
        pixels = [pixel_values(images[i:i + cameras], cfg.image_means, cfg.image_stds)
                  for i in range(0, len(images), cameras)]
        proprio = [s["proprio"] for s in samples]
        prompts = [self.policy.prompt_ids(s["instruction"]) for s in samples]
        actions = [s["actions"] for s in samples]
        device = self.policy.device
        as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32)).to(device)  # noqa: E731
        return as_tensor(pixels), as_tensor(proprio), prompts, as_tensor(actions)

    def validate(self) -> dict:
        """Mean L1 loss on held-out samples as evaluation queries the model: no noise, LightVLA's
        inference selection (kept tokens, not 512 slots), images centre-cropped if trained with
        augmentation. Returns the loss and the mean visual tokens entering the LLM."""
        import torch

        from policies.vla.hooks import QueryTrace

        # validated in micro-batches, the size training computes at once
        n, b = len(self.val), self.config.batch_size // (self.procs.world * self.config.grad_accumulation)
        indices = sorted({int(i) for i in np.linspace(0, n - 1, min(n, self.config.val_samples))})
        mine = indices[self.procs.rank::self.procs.world]
        losses, tokens = [], []
        self.set_training(False)
        try:
            with torch.no_grad():
                for start in range(0, len(mine), b):
                    chunk = mine[start:start + b]
                    pixels, proprio, prompts, target = self.tensors(self.val, chunk, None, crop=self.config.image_aug)
                    traces = [QueryTrace() for _ in chunk]
                    predicted = self.model(pixels, proprio, prompts, self.policy.tokenizer.stop_id, self.hooks,
                                           self.policy.options.action_slice, traces)
                    losses += (predicted - target).abs().mean(dim=(1, 2)).tolist()
                    tokens += [t.llm_visual_tokens[0] for t in traces]
        finally:
            self.set_training(True)
        sums = torch.tensor([sum(losses), sum(tokens)], dtype=torch.float64, device=self.policy.device)
        loss_sum, token_sum = distributed.total(sums, self.procs).tolist()
        return {"val_loss": loss_sum / len(indices), "val_visual_tokens": token_sum / len(indices),
                "val_samples": len(indices)}

    def set_training(self, training: bool) -> None:
        self.model.train(training)
        if self.hooks is not None:
            self.hooks.training = training

    # --- training -----------------------------------------------------------------------------

    def train_step(self) -> float:
        import torch
        import torch.nn.functional as F

        pixels, proprio, prompts, target = self.next_batch()
        if hasattr(self.hooks, "set_progress"):
            self.hooks.set_progress(self.step, self.config.steps)
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = self.config.grad_accumulation
        size = len(prompts) // accumulation
        loss_sum, selected = torch.zeros((), device=target.device), []
        for micro in range(accumulation):  # the mean of the micro-batches' gradients is the share's
            # selection noise of this step, and of this process's samples
            torch.manual_seed(self.config.seed * 1_000_003 + self.step + (self.procs.rank << 40) + (micro << 50))
            part = slice(micro * size, (micro + 1) * size)
            predicted = self.model(pixels[part], proprio[part], prompts[part], self.policy.tokenizer.stop_id,
                                   self.hooks, self.policy.options.action_slice)
            loss = F.l1_loss(predicted, target[part]) / accumulation
            loss.backward()
            loss_sum += loss.detach().float()
            if (picked := getattr(self.hooks, "selected_tokens", None)) is not None:
                selected.append(picked.float().mean())
        self._selected = torch.stack(selected).mean() if selected else None
        step_loss = float(distributed.mean(loss_sum.reshape(1), self.procs))  # the whole batch's
        if not np.isfinite(step_loss):
            raise ValueError(f"the loss is {step_loss} at step {self.step}; nothing of this step is saved")
        distributed.average_gradients(self.trainable.values(), self.procs)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return step_loss

    def selected_tokens(self) -> float | None:
        """LightVLA's and LightVLA*'s distinct selected tokens in the last step, mean over its samples."""
        return None if self._selected is None else float(distributed.mean(self._selected.reshape(1), self.procs))

    # --- saving -------------------------------------------------------------------------------

    def save_state(self) -> None:
        import torch

        path = self.out / STATE
        tmp = path.with_suffix(".tmp")
        torch.save({"step": self.step, "trainable": {n: p.detach().cpu() for n, p in self.trainable.items()},
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, tmp)
        os.replace(tmp, path)

    def load_state(self) -> None:
        import torch

        state = torch.load(self.out / STATE, map_location="cpu", weights_only=True)
        missing = sorted(set(self.trainable) ^ set(state["trainable"]))
        if missing:
            raise ValueError(f"{self.out / STATE} does not fit this model: parameters {missing[:5]} differ")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                self.trainable[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        # (a state saved by the earlier step-decay scheduler holds no lr_lambdas: its schedule is the same)
        self.scheduler.load_state_dict({"lr_lambdas": [None], **state["scheduler"]})
        self.step = int(state["step"])

    def norm_stats(self) -> dict:
        """The statistics under each trained suite's key, as OFT names its LIBERO datasets."""
        suites = self.data.suites or ["demos"]
        suffix = "_no_noops" if self.config.drop_noops else ""
        return {f"{suite}{suffix}": self.data.stats for suite in suites}

    def save_checkpoint(self, manifest: dict) -> Path:
        """The merged model in the OpenVLA-OFT layout, written aside and then put in place: as
        ``checkpoint/``, or with ``keep_checkpoints`` as ``checkpoint-STEP/`` with ``checkpoint``
        a link to the latest (OFT keeps every saved step's, to choose among them by evaluation)."""
        from policies.vla.checkpoint import save_checkpoint
        from policies.vla.lora import merged_state
        from policies.vla.tokenizer import write_tokenizer

        name = f"{CHECKPOINT}-{self.step}" if self.config.keep_checkpoints else CHECKPOINT
        final, tmp = self.out / name, self.out / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        state = {k: v for k, v in merged_state(self.model).items() if not k.startswith("token_queries.")}
        save_checkpoint(self.model, tmp, self.norm_stats(), step=self.step, state=state)
        write_tokenizer(self.policy.tokenizer, tmp)
        if hasattr(self.hooks, "save"):
            self.hooks.save(tmp, self.step)
        write_json_atomic(tmp / "finetune.json", {**manifest, "step": self.step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.config.keep_checkpoints:
            link = self.out / (CHECKPOINT + ".link")
            link.unlink(missing_ok=True)
            link.symlink_to(name, target_is_directory=True)
            os.replace(link, self.out / CHECKPOINT)
        return self.out / CHECKPOINT


def drop_log_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def manifest_for(config: FinetuneConfig, trainer: Trainer) -> dict:
    from bench.provenance import code_revision, file_sha256, host_info, now_iso, package_versions

    data, val = trainer.data, trainer.val
    files = [{"path": str(p), "sha256": file_sha256(p)} for p in data.paths]
    val_files = [{"path": str(p), "sha256": file_sha256(p)} for p in (val.paths if val else [])]
    shared = {f["sha256"] for f in files} & {f["sha256"] for f in val_files}
    if shared:
        raise ValueError("a validation file is also a training file: validation needs held-out demonstrations")
    return {
        "config": asdict(config),
        "policy": trainer.policy.identity(),
        "demos": files + val_files,
        "data": {"demonstrations": len(data.episodes), "kept_steps": data.stats["num_transitions"],
                 "dropped_noops": data.dropped_noops, "samples": len(data), "suites": data.suites,
                 "val_demonstrations": len(val.episodes) if val else 0, "val_samples": len(val) if val else 0},
        "adapted_layers": len(trainer.adapted),
        "trainable_parameters": int(sum(p.numel() for p in trainer.trainable.values())),
        "versions": package_versions(),
        "code": code_revision(),
        "host": host_info(),
        "created_at": now_iso(),
    }


def finetune(config: FinetuneConfig | None, out: Path, resume: bool = False, progress: bool = True) -> FinetuneSummary:
    """Train (or, with ``resume``, continue the run in ``out`` with its recorded config) and
    write its checkpoint."""
    out = Path(out)
    if resume:
        if not (out / MANIFEST).is_file():
            raise FileNotFoundError(f"{out} holds no fine-tuning run to resume ({MANIFEST} missing)")
        recorded = json.loads((out / MANIFEST).read_text())
        config = FinetuneConfig(**recorded["config"])
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose another --out, or continue it with --resume")
    procs, device = distributed.from_environment(), None
    if procs.distributed:
        from policies.vla.policy import resolve_device

        if config.batch_size % (procs.world * config.grad_accumulation):
            raise ValueError(f"--batch-size {config.batch_size} (the whole step's) does not divide among "
                             f"{procs.world} processes x {config.grad_accumulation} micro-batches")
        device = distributed.process_device(resolve_device(config.policy_args.get("device", "auto")), procs)
        distributed.start(procs, device)  # every process has checked --out before any writes to it
    try:
        if procs.main:
            out.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(config, out, procs, device)
        try:
            return _train(trainer, config, out, resume, progress and procs.main)
        finally:
            trainer.close()
    finally:
        distributed.stop()


def _train(trainer: Trainer, config: FinetuneConfig, out: Path, resume: bool, progress: bool) -> FinetuneSummary:
    from tqdm import tqdm

    procs = trainer.procs
    manifest = {**manifest_for(config, trainer), "processes": procs.world}
    if resume:
        recorded = json.loads((out / MANIFEST).read_text())
        changed = [d["path"] for d, old in zip(manifest["demos"], recorded["demos"]) if d["sha256"] != old["sha256"]]
        if changed:
            raise ValueError(f"demonstration files changed since the run began: {', '.join(changed)}")
        if (out / STATE).is_file():
            trainer.load_state()
        if procs.main:
            drop_log_after(out / LOG, trainer.step)  # steps after the saved state are trained again
        manifest = {**recorded, "resumed": recorded.get("resumed", []) + [
            {"at_step": trainer.step, "processes": procs.world, "versions": manifest["versions"],
             "code": manifest["code"], "created_at": manifest["created_at"]}]}
    if procs.main:
        write_json_atomic(out / MANIFEST, manifest)
    first = last = val_loss = None
    window, selected, started = [], [], time.perf_counter()
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not progress, desc="fine-tuning", unit="step")
    # one process writes; every process computes the values (they take part in the averaging)
    with open(out / LOG, "a") if procs.main else open(os.devnull, "w") as log:
        while trainer.step < config.steps:
            loss = trainer.train_step()
            first = loss if first is None else first
            window.append(loss)
            if (picked := trainer.selected_tokens()) is not None:
                selected.append(picked)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if trainer.step % config.log_every == 0 or trainer.step == config.steps:
                elapsed = time.perf_counter() - started
                last = float(np.mean(window))
                entry = {"step": trainer.step, "loss": last, "lr": trainer.last_lr,
                         "step_ms": 1e3 * elapsed / len(window)}
                if hasattr(trainer.hooks, "noise_scale"):
                    entry["noise_scale"] = trainer.hooks.noise_scale
                if selected:
                    entry["selected_tokens"] = float(np.mean(selected))
                log.write(json.dumps(entry) + "\n")
                log.flush()
                window, selected, started = [], [], time.perf_counter()
            if trainer.val is not None and (trainer.step == config.steps or (
                    config.val_every and trainer.step % config.val_every == 0)):
                val = trainer.validate()
                log.write(json.dumps({"step": trainer.step, **val}) + "\n")
                log.flush()
                val_loss = val["val_loss"]
            if config.save_every and trainer.step % config.save_every == 0 and trainer.step < config.steps \
                    and procs.main:
                trainer.save_state()
                trainer.save_checkpoint(manifest)
    bar.close()
    if procs.main:
        trainer.save_state()
        trainer.save_checkpoint(manifest)
    distributed.barrier(procs)  # every process returns once the checkpoint is written
    return FinetuneSummary(out, trainer.step, first, last, len(trainer.data), out / CHECKPOINT, val_loss)
