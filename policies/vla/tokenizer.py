"""Prompt tokenisation: the checkpoint's Llama SentencePiece model, or bytes for random models.

OpenVLA-OFT tokenises ``"In: What action should the robot take to {instruction}?\\nOut:"``
with BOS prepended, and appends the empty piece ("▁", id 29871 in Llama-2's vocabulary)
when the prompt does not already end with it. Llama's slow tokenizer on text without
special tokens is exactly SentencePiece's ``encode`` (which adds the leading "▁"), so the
``sentencepiece`` library gives the same ids without transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPT = "In: What action should the robot take to {}?\nOut:"
SENTENCEPIECE_FILE = "tokenizer.model"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"  # marks a checkpoint fine-tuned from random weights
EMPTY_PIECE = "\u2581"


def prompt_text(instruction: str) -> str:
    return PROMPT.format(instruction.lower())


class TokenizerError(ValueError):
    pass


class SentencePieceTokenizer:
    def __init__(self, model_file: Path):
        import sentencepiece

        model_file = self.model_file = Path(model_file)
        if not model_file.is_file():
            raise TokenizerError(f"missing tokenizer model file {model_file}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{model_file} is not a SentencePiece model ({exc})") from None
        self.bos_id, self.stop_id = self.sp.bos_id(), self.sp.eos_id()
        self.empty_id = self.sp.piece_to_id(EMPTY_PIECE)
        if min(self.bos_id, self.stop_id) < 0 or self.sp.id_to_piece(self.empty_id) != EMPTY_PIECE:
            raise TokenizerError(f"tokenizer {model_file} lacks BOS, EOS or the empty piece '{EMPTY_PIECE}'")
        self.vocab_size = self.sp.get_piece_size()
        self.identity = {"kind": "sentencepiece", "file": model_file.name, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def prompt_ids(self, instruction: str) -> list[int]:
        ids = [self.bos_id] + self.encode(prompt_text(instruction))
        if ids[-1] != self.empty_id:
            ids.append(self.empty_id)
        return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (BOS 1, stop 2, empty piece 259): for models with random
    weights, which have no tokenizer file. Prompt lengths differ from Llama's."""

    bos_id, stop_id, empty_id, vocab_size = 1, 2, 259, 260
    identity = {"kind": "bytes", "vocab_size": 260}

    def prompt_ids(self, instruction: str) -> list[int]:
        return [self.bos_id] + [3 + b for b in prompt_text(instruction).encode()] + [self.empty_id]


def checkpoint_tokenizer(directory: Path):
    """The tokenizer a checkpoint directory holds: its SentencePiece model, or the byte tokenizer
    where a model fine-tuned from random weights says so."""
    directory = Path(directory)
    if not (directory / SENTENCEPIECE_FILE).exists() and (directory / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    return SentencePieceTokenizer(directory / SENTENCEPIECE_FILE)


def write_tokenizer(tokenizer, directory: Path) -> None:
    """Store ``tokenizer`` in a checkpoint directory (what ``checkpoint_tokenizer`` reads back)."""
    directory = Path(directory)
    if isinstance(tokenizer, ByteTokenizer):
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps(ByteTokenizer.identity) + "\n")
    else:
        (directory / SENTENCEPIECE_FILE).write_bytes(Path(tokenizer.model_file).read_bytes())
