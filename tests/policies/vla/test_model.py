"""Sequence layout, the hidden-state slice fed to the head, batching with padding, hooks."""

import pytest
import torch

from policies.vla.hooks import Hooks
from tests.tiny_vla import inputs, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_assembled_sequence_follows_the_reference_layout(model):
    visual = torch.randn(1, 512, 64)
    proprio = torch.randn(1, 64)
    prompt = [1, 40, 41, 42, 259]
    s = model.assemble(visual, proprio, [prompt], stop_id=2)
    embed = model.language_model.model.embed_tokens.weight
    t = 1 + 512 + 1 + 4 + 56 + 1
    assert s.hidden.shape == (1, t, 64) and s.padding is None
    assert torch.equal(s.hidden[0, 0], embed[1])  # BOS
    assert torch.equal(s.hidden[0, 1:513], visual[0])  # visual tokens
    assert torch.equal(s.hidden[0, 513], proprio[0])  # proprio token after them
    assert torch.equal(s.hidden[0, 514:518], embed[[40, 41, 42, 259]])  # prompt after BOS
    assert torch.count_nonzero(s.hidden[0, 518:574]) == 0  # 56 zeroed action slots
    assert torch.equal(s.hidden[0, -1], embed[2])  # stop token
    assert torch.equal(s.position_ids[0], torch.arange(t))
    assert s.visual[0].nonzero().flatten().tolist() == list(range(1, 513))
    assert s.task[0].nonzero().flatten().tolist() == list(range(513, t))


class CaptureHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.seen = head, None

    def forward(self, x):
        self.seen = x
        return self.head(x)


class CaptureFinal(Hooks):
    """Records the stream after the last layer (before the final norm)."""

    def __init__(self, last):
        self.last, self.stream = last, None

    def after_layer(self, layer, stream, q, k):
        if layer == self.last:
            self.stream = stream
        return stream


@pytest.mark.parametrize("action_slice, start, end", [("train", -58, -2), ("release", -56, None)])
def test_head_reads_the_shifted_slice(model, action_slice, start, end):
    pixels, proprio, prompts = inputs()
    capture = CaptureHead(model.action_head)
    hook = CaptureFinal(model.config.llm.num_layers - 1)
    original, model.action_head = model.action_head, capture
    try:
        with torch.no_grad():
            model(pixels, proprio, prompts, 2, hooks=hook, action_slice=action_slice)
    finally:
        model.action_head = original
    final = model.language_model.model.norm(hook.stream.hidden)
    t = final.shape[1]
    # train: the last prompt token (the empty piece) and the first 55 action slots
    assert t == 1 + 512 + 1 + 8 + 56 + 1
    assert torch.equal(capture.seen, final[:, start:end])
    if action_slice == "train":
        assert start + t == 1 + 512 + 1 + 7  # index of the prompt's last token


def test_batch_with_different_prompt_lengths_equals_single_queries(model):
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 14, 11))
    with torch.no_grad():
        batched = model(pixels, proprio, prompts, 2)
        single = torch.cat([model(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2) for i in range(3)])
    assert batched.shape == (3, 8, 7)
    assert torch.allclose(batched, single, atol=1e-5, rtol=0)


def test_identity_hooks_change_nothing(model):
    pixels, proprio, prompts = inputs()
    with torch.no_grad():
        plain = model(pixels, proprio, prompts, 2)
        hooked = model(pixels, proprio, prompts, 2, hooks=Hooks())
    assert torch.equal(plain, hooked)


def test_a_skipped_layer_is_not_computed_and_is_traced_as_none(model):
    from policies.vla.hooks import QueryTrace

    class SkipFirst(Hooks):
        def skip_layer(self, layer):
            return layer == 0

    pixels, proprio, prompts = inputs()
    traces = [QueryTrace()]
    with torch.no_grad():
        skipped = model(pixels, proprio, prompts, 2, hooks=SkipFirst(), traces=traces)
        plain = model(pixels, proprio, prompts, 2)
    assert traces[0].llm_tokens[0] is None and traces[0].llm_visual_tokens[1] == 512
    assert not torch.allclose(skipped, plain)


def test_before_a_layer_its_queries_and_keys_are_those_the_layer_computes(model):
    # A plug-in that only looks changes nothing, and sees what the layer itself computes next.
    class Look(Hooks):
        def before_layer(self, layer, stream, queries_keys):
            if layer == 1:
                self.before = queries_keys(stream.hidden, stream.position_ids)
            return stream

        def wants_qk(self, layer):
            return layer == 1

        def after_layer(self, layer, stream, q, k):
            if layer == 1:
                self.after = (q, k)
            return stream

    pixels, proprio, prompts = inputs()
    look = Look()
    with torch.no_grad():
        plain = model(pixels, proprio, prompts, 2)
        looked = model(pixels, proprio, prompts, 2, hooks=look)
    assert torch.equal(plain, looked)
    assert all(torch.equal(a, b) for a, b in zip(look.before, look.after))


def test_bad_inputs_are_named(model):
    pixels, proprio, prompts = inputs()
    with pytest.raises(ValueError, match="proprio has shape"):
        model(pixels, proprio[:, :7], prompts, 2)
    with pytest.raises(ValueError, match="action_slice"):
        model(pixels, proprio, prompts, 2, action_slice="last")


def test_the_prompts_reach_the_device_in_one_copy_made_before_the_towers_run(model, monkeypatch):
    # A host-to-device copy waits for the GPU: made after the towers were launched, the GPU would
    # sit idle while the host assembles the sequence and launches the LLM.
    calls = []
    embed_text, vision = model.embed_text, model.vision_backbone.forward
    monkeypatch.setattr(model, "embed_text", lambda *a: calls.append("prompts") or embed_text(*a))
    monkeypatch.setattr(model.vision_backbone, "forward", lambda *a, **k: calls.append("towers") or vision(*a, **k))
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 12))
    with torch.inference_mode():
        model(pixels, proprio, prompts, 2)
    assert calls == ["prompts", "towers"]
