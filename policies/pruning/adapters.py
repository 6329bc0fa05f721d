"""Policies that run the OpenVLA-OFT core with a token-reduction plug-in.

Each adapter adds its plug-in's options to ``oft``'s (checkpoint, device, action_slice ...)
and returns the plug-in from ``build_hooks``; ``bench profile`` builds the same plug-in.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import PolicyOptionError
from policies.vla.policy import OFTPolicy


class LightVLAPolicy(OFTPolicy):
    name = "lightvla"
    keep_option = "keep"

    @dataclass
    class Options(OFTPolicy.Options):
        keep: int = 0  # 0: LightVLA's own selection; N: force N visual tokens (cost figures with random weights)

    @classmethod
    def build_hooks(cls, options, config):
        from policies.pruning.lightvla import LightVLAPruner

        return LightVLAPruner(keep=options.keep)


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
            raise PolicyOptionError(f"fastv: k must be in 1..{config.llm.num_layers - 1}, got {options.k}")
        try:
            return FastVPruner(k=options.k, r=options.r, keep=options.keep)
        except ValueError as exc:
            raise PolicyOptionError(f"fastv: {exc}") from None
