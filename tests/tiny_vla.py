"""Tiny VLA models, inputs, observations, tokenizers and checkpoints, written by the tests in
the real formats. Shared by the model-core, plug-in and benchmark tests; torch is imported
only where needed, so importing this module works without the model extra."""

from __future__ import annotations

import numpy as np

INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "turn on the stove and put the moka pot on it",
    "pick up the alphabet soup and place it in the basket",
    "put both the cream cheese box and the butter in the basket",
]


def norm_stats(key: str = "libero_spatial_no_noops") -> dict:
    return {key: {
        "action": {"q01": [-0.5, -0.4, -0.9, -0.1, -0.2, -0.3, 0.0], "q99": [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0],
                   "mask": [True] * 6 + [False]},
        "proprio": {"q01": [-0.2, -0.3, 0.8, 2.0, -1.0, -0.5, 0.0, -0.04],
                    "q99": [0.1, 0.3, 1.3, 3.3, 1.0, 0.5, 0.04, 0.0], "mask": [True] * 8},
    }}


def write_tokenizer(path):
    """Train a 300-piece SentencePiece model on the prompts; returns the ``.model`` file."""
    import sentencepiece as spm

    text = [f"In: What action should the robot take to {s}?\nOut:" for s in INSTRUCTIONS] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(path), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        minloglevel=2,
    )
    return path.with_suffix(".model")


def tiny_model(seed: int = 0):
    import torch

    from policies.vla.config import tiny_config
    from policies.vla.model import OFTModel

    torch.manual_seed(seed)
    return OFTModel(tiny_config()).eval()


def write_checkpoint(directory, tokenizer_file):
    from policies.vla.checkpoint import save_checkpoint

    save_checkpoint(tiny_model(), directory, norm_stats(), step=1000, tokenizer_file=tokenizer_file,
                    shard_bytes=400_000)
    return directory


def inputs(batch=1, prompt_lengths=(9,), seed=0):
    """Random pixels (two images, both towers' channels), proprio and prompts of the given lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 12, 224, 224, generator=gen)
    proprio = torch.rand(batch, 8, generator=gen)
    prompts = [[1] + torch.randint(3, 250, (n - 2,), generator=gen).tolist() + [259] for n in prompt_lengths]
    return pixels, proprio, prompts


def stream(x, positions=None, padding=None):
    """``x`` as a token stream with no visual or task tokens, for the LLM alone."""
    import torch

    from policies.vla.hooks import TokenStream

    b, t = x.shape[:2]
    positions = torch.arange(t).expand(b, t) if positions is None else positions
    none = torch.zeros(b, t, dtype=torch.bool)
    return TokenStream(x.clone(), positions, none, none, padding)


def toy_layer(t: int, visual: int, seed: int = 0):
    """A one-sample stream of t tokens (BOS, ``visual`` visual tokens, then task tokens) of width 8,
    with a layer's queries (2 heads) and keys (1 key head) of width 4: (stream, q, k)."""
    import torch

    from policies.vla.hooks import TokenStream

    gen = torch.Generator().manual_seed(seed)
    is_visual = torch.zeros(1, t, dtype=torch.bool)
    is_visual[0, 1:1 + visual] = True
    stream = TokenStream(torch.randn(1, t, 8, generator=gen), torch.arange(t)[None], is_visual,
                         torch.arange(t)[None] > visual)
    return stream, torch.randn(1, 2, t, 4, generator=gen), torch.randn(1, 1, t, 4, generator=gen)


def toy_stream(batch=1, visual=16, task=6, d=8, seed=0):
    """A random stream: BOS, ``visual`` visual tokens, ``task`` task tokens, positions 0, 1, ..."""
    import torch

    from policies.vla.hooks import TokenStream

    gen = torch.Generator().manual_seed(seed)
    t = 1 + visual + task
    hidden = torch.randn(batch, t, d, generator=gen)
    is_visual = torch.zeros(batch, t, dtype=torch.bool)
    is_visual[:, 1:1 + visual] = True
    is_task = torch.zeros(batch, t, dtype=torch.bool)
    is_task[:, 1 + visual:] = True
    return TokenStream(hidden, torch.arange(t).expand(batch, t).clone(), is_visual, is_task)


def recorded_streams(hooks, layers=None) -> list:
    """The streams ``hooks.after_layer`` returns from now on (after the given layers, or all),
    appended to the list returned."""
    streams, after_layer = [], hooks.after_layer

    def recorded(layer, *args):
        out = after_layer(layer, *args)
        if layers is None or layer in layers:
            streams.append(out)
        return out

    hooks.after_layer = recorded
    return streams


def fake_observation(seed: int = 0, instruction: str = INSTRUCTIONS[0], size: int = 256):
    from policies.base import Observation

    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in ("agentview", "wrist")}
    proprio = np.array([-0.05, 0.0, 1.0, 3.1, 0.1, -0.1, 0.02, -0.02]) + rng.normal(0, 0.01, 8)
    return Observation(proprio=proprio, instruction=instruction, episode_id=f"ep{seed}", images=images)


def compiled_calls(fn) -> tuple[object, int]:
    """``fn()``'s result and how many calls of torch.compile'd code it made (profiler events)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum("CompiledFxGraph" in event.name for event in prof.events())
