"""Prompt ids with a SentencePiece model the test trains, as the Llama tokenizer is used."""

import pytest

from policies.vla.tokenizer import ByteTokenizer, SentencePieceTokenizer, TokenizerError, prompt_text


def test_prompt_starts_with_bos_and_ends_with_the_empty_piece(tokenizer_file):
    tok = SentencePieceTokenizer(tokenizer_file)
    ids = tok.prompt_ids("Put the Bowl on the Stove")
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.empty_id
    assert ids[1:-1] == tok.encode("In: What action should the robot take to put the bowl on the stove?\nOut:")
    assert tok.sp.id_to_piece(tok.empty_id) == "\u2581" and tok.stop_id == 2
    assert tok.sp.decode(ids[1:-1]) == prompt_text("put the bowl on the stove")


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="missing tokenizer model file"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")


def test_byte_tokenizer_for_random_models():
    ids = ByteTokenizer().prompt_ids("go")
    assert ids[0] == 1 and ids[-1] == 259 and len(ids) == 2 + len(prompt_text("go").encode())
