"""The ``oft`` policy: OpenVLA-OFT on LIBERO observations, from a local checkpoint.

Given a ``size`` instead of a checkpoint it runs that preset with random weights (cost figures
and smoke runs; asked for by name, so that a forgotten checkpoint is an error). Their actions
are meaningless and no unnormalisation statistics exist, so outputs pass through unscaled.
Plug-in adapters (LightVLA, FastV, ...) subclass this and supply hooks.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from policies.base import EpisodeInfo, Observation, Policy, PolicyOptionError, PolicyOutput

CAMERAS = ("agentview", "wrist")  # third-person first, as in training


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise PolicyOptionError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PolicyOptionError(f"device {name!r} requested but torch sees no CUDA device")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in table:
        raise PolicyOptionError(f"unknown dtype {name!r}; valid: auto, {', '.join(table)}")
    return table[name]


def random_model(config, device: str, dtype, seed: int):
    """A model of ``config`` with random weights, created directly on ``device``."""
    import torch

    from policies.vla.model import OFTModel

    with torch.device("meta"):
        params = sum(p.numel() for p in OFTModel(config).parameters())
    need = params * torch.empty((), dtype=dtype).element_size()
    if device == "cpu":
        available = _available_memory()
        if available is not None and need > 0.8 * available:
            raise PolicyOptionError(
                f"a model of {params / 1e9:.2f} B parameters in {dtype} needs {need / 2**30:.1f} GiB; this machine "
                f"has {available / 2**30:.1f} GiB available. Use size=tiny on the CPU, or a GPU."
            )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of 7.7 B parameters
    try:
        with torch.device(device):
            model = OFTModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype=dtype).eval()


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class OFTPolicy(Policy):
    name = "oft"
    keep_option: str | None = None  # the option that forces a visual-token count (bench profile --keep)

    @dataclass
    class Options(Policy.Options):
        checkpoint: str = ""  # OpenVLA-OFT checkpoint directory or cached Hub repository id
        size: str = ""  # instead of a checkpoint: random weights of this preset, full or tiny
        unnorm_key: str = ""  # dataset statistics entry (needed when the checkpoint has several)
        device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1 ...
        dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
        action_slice: str = "train"  # train: hidden[T-58:T-2] (OFT); release: hidden[-56:] (LightVLA code)
        center_crop: bool = True  # the LIBERO checkpoints were trained with crop augmentation
        cuda_graphs: bool = True  # on a GPU, replay the fixed-shape parts of a query as CUDA graphs
        # at most this many shapes captured; later new shapes run eagerly (marked `over_graph_limit`)
        graph_limit: int = 64
        # auto (all on a GPU, none on a CPU), none, all, or comma-separated: compile_kernels,
        # compile_towers, parallel_towers, fuse_gate_up
        speedups: str = "auto"

    def __init__(self, options: Options, seed: int = 0):
        super().__init__(options, seed)
        from policies.vla import flops
        from policies.vla.model import ACTION_SLICES, Speedups

        if options.action_slice not in ACTION_SLICES:
            raise PolicyOptionError(f"action_slice must be one of {', '.join(ACTION_SLICES)}, got {options.action_slice!r}")
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self._load()
        try:
            speedups = Speedups.parse(options.speedups, self.device)
        except ValueError as error:
            raise PolicyOptionError(str(error)) from None
        self.model.use_speedups(speedups)
        if options.graph_limit < 1:
            raise PolicyOptionError(f"graph_limit must be at least 1, got {options.graph_limit}")
        if options.cuda_graphs and self.device.startswith("cuda"):
            self.model.use_cuda_graphs(limit=options.graph_limit)
        if options.chunk_length > self.config.chunk_length:
            raise PolicyOptionError(
                f"chunk_length {options.chunk_length} exceeds the model's chunk of {self.config.chunk_length}"
            )
        self.dims = flops.model_dims(self.model)
        self._prompts: dict[str, list[int]] = {}
        self._threads: ThreadPoolExecutor | None = None  # image preprocessing, made at the first query
        self._hooks = self.plugin(options, self.config)

    def _load(self) -> None:
        from policies.vla.checkpoint import CheckpointError, load_checkpoint
        from policies.vla.config import preset
        from policies.vla.tokenizer import ByteTokenizer, checkpoint_tokenizer

        opts = self.options
        if opts.checkpoint and opts.size:
            raise PolicyOptionError(f"{self.name}: give a checkpoint or a size for random weights, not both "
                                    f"(checkpoint={opts.checkpoint!r}, size={opts.size!r})")
        if not opts.checkpoint and not opts.size:
            raise PolicyOptionError(
                f"{self.name} needs a checkpoint: --checkpoint DIR (or --policy-arg checkpoint=DIR or a cached Hub "
                f"repository id); for random weights (smoke runs and cost figures, no real success rate) "
                f"give --policy-arg size=tiny or size=full")
        if opts.checkpoint:
            try:
                ckpt = load_checkpoint(opts.checkpoint, self.device, self.dtype)
            except CheckpointError as exc:
                raise PolicyOptionError(str(exc)) from None
            self.model, self.config, self.weights = ckpt.model, ckpt.config, ckpt.identity
            self.checkpoint_directory = ckpt.directory  # where a Hub repository id led
            self.tokenizer = checkpoint_tokenizer(ckpt.directory)
            self.stats = self._select_stats(ckpt.norm_stats)
        else:
            self.config = preset(opts.size)
            self.model = random_model(self.config, self.device, self.dtype, self.seed)
            self.weights = {"random": True, "size": opts.size, "seed": self.seed}
            self.tokenizer = ByteTokenizer()
            self.stats, self.norm_stats, self.unnorm_key = None, None, ""
            self.checkpoint_directory = None
        if self.tokenizer.vocab_size > self.config.llm.vocab_size:
            raise PolicyOptionError(
                f"tokenizer has {self.tokenizer.vocab_size} pieces but the model's vocabulary is {self.config.llm.vocab_size}"
            )

    def _select_stats(self, norm_stats: dict) -> dict | None:
        """The statistics the options name, or the checkpoint's only ones; with several and none
        named, ``select_suite`` chooses (None until then)."""
        self.norm_stats = norm_stats
        key = self.options.unnorm_key or (next(iter(norm_stats)) if len(norm_stats) == 1 else "")
        if key and key not in norm_stats:
            raise PolicyOptionError(f"unnorm_key {key!r} not in the checkpoint's statistics ({', '.join(sorted(norm_stats))})")
        self.unnorm_key = key
        return norm_stats[key] if key else None

    def select_suite(self, suite: str) -> None:
        """Statistics for the suite, as OpenVLA-OFT's evaluation chooses them: ``{suite}``, else
        ``{suite}_no_noops``. Statistics named by the options are used whatever the suite (a
        deliberate cross-suite evaluation); a checkpoint's only statistics must fit it."""
        if self.norm_stats is None or self.options.unnorm_key:
            return
        for key in (suite, f"{suite}_no_noops"):
            if key in self.norm_stats:
                self.unnorm_key, self.stats = key, self.norm_stats[key]
                return
        raise PolicyOptionError(
            f"the checkpoint has no statistics for {suite} (it has {', '.join(sorted(self.norm_stats))}): "
            f"it was not trained on this suite. To run it anyway, name the statistics with --unnorm-key"
        )

    @classmethod
    def build_hooks(cls, options: "OFTPolicy.Options", config):
        """The plug-in acting on the model core (none for plain OFT); adapters override this and
        raise ValueError for options that cannot work."""
        return None

    @classmethod
    def plugin(cls, options: "OFTPolicy.Options", config):
        """``build_hooks``, its ValueError named as this policy's option error."""
        try:
            return cls.build_hooks(options, config)
        except PolicyOptionError:
            raise
        except ValueError as exc:
            raise PolicyOptionError(f"{cls.name}: {exc}") from None

    def hooks(self):
        return self._hooks

    def reset(self, episode: EpisodeInfo) -> None:
        hooks = self.hooks()
        if hooks is not None:
            hooks.reset()

    def prompt_ids(self, instruction: str) -> list[int]:
        if instruction not in self._prompts:
            self._prompts[instruction] = self.tokenizer.prompt_ids(instruction)
        return self._prompts[instruction]

    def prepare(self, observations: Sequence[Observation]):
        """Observations -> (pixel_values, proprio, prompts) tensors on the model's device."""
        import torch

        from policies.vla.preprocess import normalize_proprio, pixel_values, prepare_image

        if self.norm_stats is not None and self.stats is None:
            raise PolicyOptionError(f"the checkpoint has statistics for {', '.join(sorted(self.norm_stats))}: "
                                    "choose one with --unnorm-key (a run chooses by its suite)")

        for obs in observations:
            if not obs.images or any(c not in obs.images for c in CAMERAS):
                have = sorted(obs.images or {})
                raise ValueError(f"oft needs camera images {CAMERAS}; the observation has {have}")
        # Every camera image of the batch at once: JPEG coding and numpy release the GIL.
        size, crop = self.config.image_sizes[0], self.options.center_crop
        images = list(self._image_threads().map(lambda image: prepare_image(image, size, crop),
                                                [obs.images[c] for obs in observations for c in CAMERAS]))
        pixels, proprios = [], []
        for i, obs in enumerate(observations):
            mine = images[i * len(CAMERAS):(i + 1) * len(CAMERAS)]
            pixels.append(pixel_values(mine, self.config.image_means, self.config.image_stds))
            proprio = np.asarray(obs.proprio, np.float64)
            proprios.append(normalize_proprio(proprio, self.stats["proprio"]) if self.stats else proprio)
        pixel_tensor = torch.from_numpy(np.stack(pixels)).to(self.device)
        proprio_tensor = torch.from_numpy(np.stack(proprios).astype(np.float32)).to(self.device)
        return pixel_tensor, proprio_tensor, [self.prompt_ids(o.instruction) for o in observations]

    def _image_threads(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="images")
        return self._threads

    def act(self, observations: Sequence[Observation]) -> list[PolicyOutput]:
        prepared, preprocess_ms = self.timed_prepare(observations)
        outputs = self.run(*prepared)
        for output in outputs:
            output.stats["preprocess_ms"] = preprocess_ms
        return outputs

    def timed_prepare(self, observations: Sequence[Observation]):
        """``prepare``'s tensors and the milliseconds it took."""
        start = time.perf_counter()
        prepared = self.prepare(observations)
        return prepared, (time.perf_counter() - start) * 1e3

    def run(self, pixels, proprio, prompts) -> list[PolicyOutput]:
        """The model on prepared inputs -> env action chunks with per-query stats."""
        import torch

        from policies.vla import flops
        from policies.vla.hooks import QueryTrace
        from policies.vla.postprocess import gripper_to_env, unnormalize_actions

        traces = [QueryTrace() for _ in prompts]
        graphs = self.model.graphs
        captures, eager_calls = (graphs.captures, graphs.eager_calls) if graphs is not None else (0, 0)
        start = time.perf_counter()
        with torch.inference_mode():
            normalized = self.model(pixels, proprio, prompts, self.tokenizer.stop_id, self.hooks(),
                                    self.options.action_slice, traces)
        normalized = normalized.cpu().numpy()  # waits for the device
        model_ms = (time.perf_counter() - start) * 1e3
        captured = graphs is not None and graphs.captures > captures  # a one-time cost of a new shape
        # a shape past the limit ran eagerly: slower, and each new one will (its mean: their share)
        over_limit = graphs is not None and graphs.eager_calls > eager_calls
        outputs = []
        for chunk, trace in zip(normalized, traces):
            actions = unnormalize_actions(chunk, self.stats["action"]) if self.stats else chunk.astype(np.float64)
            actions = gripper_to_env(actions)[: self.chunk_length]
            stats: dict[str, Any] = trace.as_stats()
            stats["visual_tokens"] = trace.llm_visual_tokens[0]
            stats["tflops"] = flops.query_flops(self.dims, trace)["total"] / 1e12
            stats["batch_size"] = len(prompts)
            stats["warmup"] = captured
            if graphs is not None:
                stats["over_graph_limit"] = over_limit
            stats["model_ms"] = model_ms  # the model's forward for the whole batch, inputs on the device
            outputs.append(PolicyOutput(actions, stats))
        return outputs

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def identity(self) -> dict[str, Any]:
        """Weights, tokenizer, dtype, options and the device the model runs on: its latencies are
        recorded, so a run does not resume on another kind of device (the option, ``auto`` or
        ``cuda:1``, is left out: what it resolved to counts)."""
        ident = super().identity()
        ident["options"] = {k: v for k, v in ident["options"].items() if k != "device"}
        ident.update(weights=self.weights, tokenizer=self.tokenizer.identity, unnorm_key=self.unnorm_key or None,
                     dtype=str(self.dtype).removeprefix("torch."), device=device_name(self.device))
        return ident


def device_name(device: str) -> str:
    """The GPU's model name, or the device itself (cpu, meta)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return device
