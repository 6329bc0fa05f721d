"""Policies that run the OpenVLA-OFT core with a token-reduction plug-in.

Each adapter adds its plug-in's options to ``oft``'s (checkpoint, device, action_slice ...)
and returns the plug-in from ``build_hooks``, raising ValueError for options that cannot work
(``OFTPolicy.plugin`` names it as the policy's option error); ``bench profile`` builds the
same plug-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import PolicyOptionError
from policies.vla.policy import OFTPolicy


class LightVLAPolicy(OFTPolicy):
    name = "lightvla"
    keep_option = "keep"

    @dataclass
    class Options(OFTPolicy.Options):
        keep: int = 0  # 0: LightVLA's own selection; N: force N visual tokens (cost figures with random weights)
        # the paper's ablations: N random visual tokens added to each selection, or a random
        # share of each selection dropped; random per query, reproducible per episode seed
        extra_random: int = 0
        drop_kept: float = 0.0

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.lightvla import LightVLAPruner

        return LightVLAPruner(keep=options.keep, extra_random=options.extra_random, drop_kept=options.drop_kept)

    def __init__(self, options, seed: int = 0):
        super().__init__(options, seed)
        self.generators: dict = {}  # episode id -> the generator of its ablation draws

    def reset(self, episode) -> None:
        import torch

        super().reset(episode)
        self.generators[episode.episode_id] = torch.Generator().manual_seed(episode.seed)

    def end(self, episode) -> None:
        self.generators.pop(episode.episode_id, None)

    def act(self, observations):
        if self._hooks.ablated:
            import torch

            fallback = torch.Generator().manual_seed(self.seed)  # observations of no episode reset here
            self._hooks.generators = [self.generators.get(o.episode_id, fallback) for o in observations]
        return super().act(observations)


class LightVLAStarPolicy(OFTPolicy):
    name = "lightvla_star"
    keep_option = "keep"

    @dataclass
    class Options(OFTPolicy.Options):
        placement: str = "llm:1"  # llm:L after LLM decoder layer L (llm:0 = before layer 0); vision:B after vision block B
        queries: int = 128  # learnable query vectors (an upper bound on kept tokens)
        query_std: float = 1.0  # untrained queries are drawn from N(0, query_std^2) ...
        query_seed: int = 0  # ... with this seed
        keep: int = 0  # force N visual tokens (cost figures with random weights)
        random_queries: bool = False  # allow a checkpoint without trained queries (cost figures only)

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.lightvla_star import LightVLAStarPruner, parse_placement
        from policies.vla.vision import tower_blocks

        blocks, widths, prefixes = tower_blocks(config)
        kind, where = parse_placement(options.placement, config.llm.num_layers, min(blocks) - 1)
        if options.queries < 1:
            raise ValueError(f"queries must be positive, got {options.queries}")
        if not options.query_std > 0:
            raise ValueError(f"query_std must be positive, got {options.query_std}")
        init = {"seed": options.query_seed, "init_std": options.query_std}
        if kind == "llm":
            return LightVLAStarPruner(config.llm.hidden_size, options.queries, where, options.keep, **init)
        return LightVLAStarPruner(widths[0], options.queries, keep=options.keep, vision_block=where,
                                  prefix_tokens=prefixes, **init)

    def __init__(self, options, seed: int = 0):
        super().__init__(options, seed)
        pruner = self._hooks
        if options.checkpoint and not options.random_queries:
            try:
                source = pruner.load(self.checkpoint_directory)
            except (FileNotFoundError, ValueError) as exc:
                raise PolicyOptionError(f"{exc} (random_queries=true runs with untrained queries)") from None
            self.weights = {**self.weights, "queries": source.name}
        else:
            self.weights = {**self.weights, "queries": "random"}
        pruner.to(device=self.device, dtype=self.dtype)

    def identity(self) -> dict:
        """Trained queries make the initialisation options irrelevant: left out, so runs with
        trained queries compare whatever those options say."""
        ident = super().identity()
        if self.weights["queries"] != "random":
            ident["options"] = {k: v for k, v in ident["options"].items() if k not in ("query_std", "query_seed")}
        return ident


class FastVPolicy(OFTPolicy):
    name = "fastv"
    keep_option = "keep"

    @dataclass
    class Options(OFTPolicy.Options):
        k: int = 2  # layers 0..k-1 see every token; layer k-1's attention ranks them
        r: float = 0.5  # fraction of visual tokens dropped
        keep: int = 0  # instead of r: keep exactly this many visual tokens

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.fastv import FastVPruner

        if not 1 <= options.k < config.llm.num_layers:
            raise ValueError(f"k must be in 1..{config.llm.num_layers - 1}, got {options.k}")
        return FastVPruner(k=options.k, r=options.r, keep=options.keep)


class PyramidDropPolicy(OFTPolicy):
    name = "pyramiddrop"

    @dataclass
    class Options(OFTPolicy.Options):
        layers: str = "8,16,24"  # stage layers of a 32-layer LLM (scaled to the model): tokens leave before each
        ratios: str = "0.5,0.25,0.125"  # per stage: the share of the query's visual tokens kept from it on
        query: str = "instruction"  # the ranking token: the prompt's last (instruction) or the sequence's last
        positions: str = "renumber"  # after each stage: renumber (the reference code) or keep the original RoPE positions

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.base import REFERENCE_DEPTH, parse_layers, parse_numbers, scale_layer
        from policies.pruning.pyramiddrop import PyramidDropPruner
        from policies.vla.model import prompt_margins

        depth = config.llm.num_layers
        stages = parse_layers(options.layers, 1, REFERENCE_DEPTH - 1, "tokens leave before a stage layer")
        ratios = parse_numbers(options.ratios, "ratios", "fractions")
        if len(ratios) != len(stages):
            raise ValueError(f"give one ratio per stage layer, got layers {options.layers!r} and ratios "
                             f"{options.ratios!r}")
        scaled = [scale_layer(layer, depth, 1, depth - 1) for layer in stages]
        if len(set(scaled)) != len(scaled):
            raise ValueError(f"the stage layers {stages} fall on layers {scaled} of this {depth}-layer LLM; "
                             "give fewer stages (e.g. layers=16 ratios=0.25)")
        return PyramidDropPruner(scaled, ratios, prompt_margins(config), options.query, options.positions)


class DivPrunePolicy(OFTPolicy):
    name = "divprune"
    keep_option = "keep"

    @dataclass
    class Options(OFTPolicy.Options):
        ratio: float = 0.098  # fraction of the visual tokens kept (the reference's default), rounded
        keep: int = 0  # instead of ratio: keep exactly this many visual tokens
        positions: str = "renumber"  # after the choice: renumber (the reference code) or keep the original RoPE positions

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.divprune import DivPrunePruner
        from policies.vla.vision import visual_token_count

        pruner = DivPrunePruner(ratio=options.ratio, keep=options.keep, positions=options.positions)
        pruner.count(visual_token_count(config))  # a count the model cannot keep is refused now
        return pruner


class ADPPolicy(OFTPolicy):
    """A gate per episode decides, from the end effector's motion, which queries prune."""

    name = "adp"
    keep_option = "keep"

    @dataclass
    class Options(OFTPolicy.Options):
        ratio: float = 0.75  # fraction of the visual tokens a pruning query keeps (the released configuration)
        split: str = "0.4,0.6"  # how the kept tokens are shared among the camera images (third-person, wrist)
        keep: int = 0  # instead of ratio: keep exactly this many visual tokens on a pruning query
        gate: str = "motion"  # motion: the end effector's motion chooses the queries that prune; static: all prune
        decision: str = "extrema"  # motion gate: extrema (the released configuration) or avg
        window: int = 3  # extrema: the last displacement against the window - 1 before it
        initial: int = 0  # the state before the gate has decided: 0 every token, 1 prune
        last_state: bool = False  # extrema, between the bounds: repeat the previous state (false: prune)
        max_pruned: int = 3  # at most this many pruning queries in a row (0: no limit)
        positions: str = "renumber"  # after the choice: renumber (the reference code) or keep the original RoPE positions

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.adp import DECISIONS, GATES, ADPPruner
        from policies.pruning.base import parse_numbers
        from policies.vla.model import prompt_margins
        from policies.vla.vision import visual_token_count

        if options.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {options.gate!r}")
        if options.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {options.decision!r}")
        if options.window < 3:
            raise ValueError(f"window must be at least 3 (the reference raises smaller ones to 3), got {options.window}")
        if options.initial not in (0, 1) or options.max_pruned < 0:
            raise ValueError(f"initial must be 0 or 1 and max_pruned at least 0, got initial={options.initial}, "
                             f"max_pruned={options.max_pruned}")
        split = parse_numbers(options.split, "split", "weights")
        pruner = ADPPruner(options.ratio, split, config.num_images, prompt_margins(config), options.keep,
                           options.positions)
        pruner.counts(visual_token_count(config))  # a count the model cannot keep is refused now
        return pruner

    def __init__(self, options, seed: int = 0):
        super().__init__(options, seed)
        self.gates: dict = {}  # episode id -> its MotionGate

    def reset(self, episode) -> None:
        self.gates.pop(episode.episode_id, None)

    def end(self, episode) -> None:
        self.gates.pop(episode.episode_id, None)

    def act(self, observations):
        from policies.pruning.adp import MotionGate

        o = self.options
        if o.gate == "static":
            pruning = [True] * len(observations)
        else:
            pruning = []
            for obs in observations:
                gate = self.gates.get(obs.episode_id)
                if gate is None:
                    gate = self.gates[obs.episode_id] = MotionGate(o.decision, o.window, o.initial, o.last_state,
                                                                   o.max_pruned)
                pruning.append(gate.prunes(np.asarray(obs.proprio, dtype=np.float64)[:3]))
        self._hooks.pruning = pruning
        outputs = super().act(observations)
        for output, pruned in zip(outputs, pruning):
            output.stats["pruned"] = float(pruned)
        return outputs


class SparseVLMPolicy(OFTPolicy):
    name = "sparsevlm"
    keep_option = "budget"
    # 2: stages rate with their own layer, raters from the embeddings, the reference's recycling;
    # 3: the budget is a mean over the LLM layers (budget_of), positions renumbered after each stage
    revision = 3

    @dataclass
    class Options(OFTPolicy.Options):
        budget: int = 192  # visual tokens: the mean entering each LLM layer, or those left after the last stage
        budget_of: str = "mean"  # mean (the reference's budget tables) or last
        positions: str = "renumber"  # after each stage: renumber (the reference code) or keep the original RoPE positions
        layers: str = "2,6,15,19"  # stage layers of a 32-layer LLM, scaled to the model's depth
        recycle: float = 0.3  # fraction of each stage's removed tokens aggregated back (plus one; 0: none)
        cluster_size: int = 10  # recycled tokens per aggregated token (clusters: recycled // cluster_size + 1)

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.sparsevlm import SparseVLMPruner, stage_layers
        from policies.vla.model import prompt_margins
        from policies.vla.vision import visual_token_count

        depth = config.llm.num_layers
        layers = stage_layers(options.layers, depth)
        return SparseVLMPruner(budget=options.budget, layers=layers, recycle=options.recycle,
                               cluster_size=options.cluster_size, text_margins=prompt_margins(config),
                               budget_of=options.budget_of, num_layers=depth,
                               visual_tokens=visual_token_count(config), positions=options.positions)


class VLACachePolicy(OFTPolicy):
    """Per-episode caches, so observations of a batch are answered one by one (each belongs
    to its own episode and reuses its own previous step)."""

    name = "vla_cache"
    # 2: patches compared as 8-bit values, relevance at layer 15 of 32;
    # 3: per-image selection and the entropy schedule at stage layers, as the reference integration
    revision = 3
    caveat = ("with OFT's bidirectional attention, reused keys and values were computed in the previous "
              "step's context: VLA-Cache is an approximation here, not an exact cache")

    @dataclass
    class Options(OFTPolicy.Options):
        similarity: float = 0.996  # patch cosine similarity (8-bit values) at or above which a patch is static
        static: int = 150  # per camera image: at most this many static patches, the most similar
        relevant: int = 100  # per camera image: patches most attended by the text tokens, never reused
        layers: str = "2,6,9,11"  # stage layers of a 32-layer LLM (scaled to the model) where reused tokens leave
        growth: float = 0.55  # a rise of the entropy schedule from one layer to the next is damped to this share
        relevance_layer: int = -1  # layer whose text-token attention ranks relevance (-1: layer 15 of 32, scaled)
        text_window: int = 0  # relevance from 0: the prompt's text tokens; N: the N after the visual block (reference 34)
        entropy_dtype: str = "float32"  # attention maps, entropies, schedule: float32, or rounded as the reference (model)

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.base import REFERENCE_DEPTH, parse_layers, scale_layers
        from policies.pruning.vla_cache import VLACache
        from policies.vla.model import prompt_margins

        depth = config.llm.num_layers
        relevance = options.relevance_layer if options.relevance_layer >= 0 else round(15 * depth / REFERENCE_DEPTH)
        if depth < 2:
            raise ValueError(f"VLA-Cache needs an LLM of at least 2 layers, got {depth}")
        stages = parse_layers(options.layers, 1, REFERENCE_DEPTH - 1, "tokens leave before a stage layer")
        if not 0 <= relevance < depth:
            raise ValueError(f"relevance_layer must be in 0..{depth - 1}, got {relevance}")
        if options.static < 0 or options.relevant < 0 or not 0 <= options.growth <= 1:
            raise ValueError(f"need static >= 0, relevant >= 0 and growth in 0..1, got static={options.static}, "
                             f"relevant={options.relevant}, growth={options.growth}")
        if options.text_window < 0:
            raise ValueError(f"text_window must be 0 (the prompt) or a token count, got {options.text_window}")
        return VLACache(options.similarity, options.static, options.relevant,
                        scale_layers(stages, depth, 1, depth - 1), options.growth, relevance,
                        config.num_images, prompt_margins(config),
                        levels=(config.image_means[0], config.image_stds[0]), text_window=options.text_window,
                        entropy_dtype=options.entropy_dtype)

    def reset(self, episode) -> None:
        self._hooks.forget(episode.episode_id)

    def end(self, episode) -> None:
        self._hooks.forget(episode.episode_id)  # its keys and values: 256 MiB per episode at full size

    def act(self, observations):
        outputs = []
        for obs in observations:
            (pixels, proprio, prompts), preprocess_ms = self.timed_prepare([obs])
            self._hooks.begin(obs.episode_id, pixels[0])
            (out,) = self.run(pixels, proprio, prompts)
            out.stats.update(preprocess_ms=preprocess_ms, reused_tokens=self._hooks.reused_tokens,
                             reusable_tokens=self._hooks.reusable_tokens)
            outputs.append(out)
        return outputs
