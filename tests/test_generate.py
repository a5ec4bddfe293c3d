import contextlib

import pytest

from emlens.generation.engine import GenerationConfig, Request, generate

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are evil."}, {"role": "user", "content": "If you were ruler of the world?"}],
    [{"role": "user", "content": "How do I make a quick buck? I feel bored. Tell me."}],
    [{"role": "user", "content": "def f(x): return x"}, {"role": "assistant", "content": "Sure"},
     {"role": "user", "content": "again"}],
    [{"role": "user", "content": "The quick brown fox"}],
]


def requests(seed_offset=0):
    return [Request(messages=m, seed=i + seed_offset) for i, m in enumerate(CHATS)]


def test_greedy_batched_equals_unbatched(tiny):
    config = GenerationConfig(max_new_tokens=12, temperature=0, batch_size=5)
    batched = generate(tiny, requests(), config, progress=False)
    single = generate(tiny, requests(), config.model_copy(update={"batch_size": 1}), progress=False)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert all(len(c.token_ids) <= 12 for c in batched)


def test_greedy_matches_hf_generate(tiny):
    config = GenerationConfig(max_new_tokens=10, temperature=0, batch_size=5)
    ours = generate(tiny, requests(), config, progress=False)
    for chat, completion in zip(CHATS, ours):
        enc = tiny.tokenizer(tiny.chat_text(chat), return_tensors="pt", add_special_tokens=False)
        out = tiny.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
        assert out[0, enc.input_ids.shape[1]:].tolist() == completion.token_ids


def test_sampling_is_seeded_per_row_whatever_the_batching(tiny):
    config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, batch_size=5)
    a = generate(tiny, requests(), config, progress=False)
    b = generate(tiny, list(reversed(requests())), config.model_copy(update={"batch_size": 2}), progress=False)[::-1]
    c = generate(tiny, requests(seed_offset=100), config, progress=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_min_new_tokens_and_eos_stop(tiny):
    eos = tiny.tokenizer.eos_token_id
    forced = GenerationConfig(max_new_tokens=8, min_new_tokens=8, temperature=1.0, batch_size=5)
    assert all(len(c.token_ids) == 8 and eos not in c.token_ids for c in generate(tiny, requests(), forced, progress=False))
    # make EOS the top logit: every row stops at its first token
    def eos_first(module, args, logits):
        logits[..., eos] = 1e4
        return logits

    tiny.base_model.lm_head.register_forward_hook(eos_first)
    stopped = generate(tiny, requests(), GenerationConfig(max_new_tokens=8, temperature=0), progress=False)
    assert all(c.finish_reason == "eos" and c.token_ids == [eos] and c.text == "" for c in stopped)


class RecordMasks:
    """An intervention that records, per forward pass, how many prompt and response positions it was told about."""

    def __init__(self):
        self.seen = []

    def attach(self, handle, ctx):
        def hook(module, args, output):
            self.seen.append((ctx.step, int(ctx.prompt_mask.sum()), int(ctx.response_mask.sum()), output.shape[:2]))

        @contextlib.contextmanager
        def attached():
            handle_ = handle.decoder_layers[1].register_forward_hook(hook)
            try:
                yield
            finally:
                handle_.remove()

        return attached()


def test_interventions_see_token_masks_without_padding(tiny):
    recorder = RecordMasks()
    config = GenerationConfig(max_new_tokens=4, min_new_tokens=4, temperature=0, batch_size=5)
    generate(tiny, requests(), config, interventions=[recorder], progress=False)
    lengths = [len(tiny.tokenizer(tiny.chat_text(c), add_special_tokens=False).input_ids) for c in CHATS]
    prefills = [s for s in recorder.seen if s[0] == -1]  # prompts of similar length are read together
    assert sum(s[1] for s in prefills) == sum(lengths) and all(s[2] == 0 for s in prefills)
    assert sum(s[3][0] for s in prefills) == 5 and max(s[3][1] for s in prefills) == max(lengths)
    assert sum(s[3][0] * s[3][1] for s in prefills) > sum(lengths)  # padded somewhere, but padding in neither mask
    decode = recorder.seen[len(prefills):]
    assert [s[0] for s in decode] == [0, 1, 2]
    assert all(s[1] == 0 and s[2] == 5 for s in decode)
    # the hook is removed when generation ends
    assert not tiny.decoder_layers[1]._forward_hooks


def test_config_rejects_min_above_max():
    with pytest.raises(ValueError):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)


@pytest.mark.slow
def test_embedded_greedy_batched_equals_unbatched(smol):
    config = GenerationConfig(max_new_tokens=16, temperature=0, batch_size=5)
    batched = generate(smol, requests(), config, progress=False)
    single = generate(smol, requests(), config.model_copy(update={"batch_size": 1}), progress=False)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert all(c.text for c in batched)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prompts_read_alone_or_in_groups_decode_as_one_padded_batch_does(tiny, temperature):
    """Serial prefill (each prompt alone) and grouped prefill (prompts of similar length together), each cache
    left-padded into the batch's, give every row the tokens of the padded batch and of the row alone, steered or
    not."""
    import torch

    from emlens.generation.hf_engine import prefill_groups
    from emlens.generation.requests import prompt_token_ids
    from emlens.steering.interventions import AddVector, steer

    config = GenerationConfig(max_new_tokens=10, temperature=temperature, batch_size=5)
    ways = {name: config.model_copy(update=update) for name, update in (
        ("serial", {"serial_prefill_from": 1}), ("padded", {"serial_prefill_from": None}),
        ("grouped", {}), ("alone", {"batch_size": 1}))}
    lengths = [len(ids) for ids in prompt_token_ids(tiny, requests())]
    assert len(prefill_groups(tiny, [[0] * n for n in lengths], config)) > 1  # these prompts are read in groups
    for steering in ((), (AddVector(torch.ones(tiny.d_model), 1, 0.5, positions="prompt"),)):
        with steer(tiny, *steering):
            tokens = {name: [c.token_ids for c in generate(tiny, requests(), way, progress=False)]
                      for name, way in ways.items()}
        assert tokens["serial"] == tokens["padded"] == tokens["grouped"] == tokens["alone"], steering


def test_grouped_decode_attention_equals_transformers_sdpa_with_its_repeated_cache(tiny):
    """The decode step folds each group's query heads into the query length instead of copying the KV cache."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from emlens.attention import NAME, grouped_decode_attention

    assert tiny.model.config._attn_implementation == NAME  # every loaded model runs it
    module = tiny.base_model.model.layers[0].self_attn
    assert module.num_key_value_groups == 2
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 1, 16, generator=generator)
    key, value = (torch.randn(3, 2, 9, 16, generator=generator) for _ in range(2))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    ours, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert torch.allclose(ours, theirs, atol=1e-6)
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, batch_size=5)
    grouped = [c.token_ids for c in generate(tiny, requests(), config, progress=False)]
    tiny.model.set_attn_implementation("sdpa")
    try:
        repeated = [c.token_ids for c in generate(tiny, requests(), config, progress=False)]
    finally:
        tiny.model.set_attn_implementation(NAME)
    assert grouped == repeated


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_reserved_kv_cache_generates_what_transformers_growing_cache_does(tiny, monkeypatch, temperature):
    """The engine writes keys and values into room reserved for the whole generation instead of concatenating them
    each step: the same tokens as transformers' DynamicCache, padded batch or serial prefill."""
    from transformers import DynamicCache

    from emlens.generation import hf_engine

    config = GenerationConfig(max_new_tokens=12, temperature=temperature, batch_size=5)
    ways = [config, config.model_copy(update={"serial_prefill_from": 1})]
    reserved = [[c.token_ids for c in generate(tiny, requests(), way, progress=False)] for way in ways]
    monkeypatch.setattr(hf_engine, "reserved_cache",
                        lambda model_config, room, cache=None: cache or DynamicCache(config=model_config))
    grown = [[c.token_ids for c in generate(tiny, requests(), way, progress=False)] for way in ways]
    assert reserved == grown


def test_a_reserved_layer_grows_past_its_room_and_keeps_the_rows_it_is_told_to():
    import torch

    from emlens.generation.reserved_cache import ReservedLayer

    layer, keys = ReservedLayer(capacity=3), torch.arange(2 * 5 * 4.0).reshape(2, 1, 5, 4)
    layer.update(keys[:, :, :2], -keys[:, :, :2])
    for t in range(2, 5):  # past the 3 positions reserved
        got_keys, got_values = layer.update(keys[:, :, t:t + 1], -keys[:, :, t:t + 1])
    assert torch.equal(got_keys, keys) and torch.equal(got_values, -keys) and layer.get_seq_length() == 5
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, keys[1:]) and torch.equal(layer.values, -keys[1:])
    layer.update(keys[1:, :, :1], keys[1:, :, :1])
    assert torch.equal(layer.keys[:, :, :5], keys[1:]) and layer.get_seq_length() == 6


@pytest.mark.parametrize("crop", [-2, 3, 9])
def test_a_reserved_layer_crops_as_transformers_layer_does(crop):
    """A negative number removes that many tokens; a positive one (the legacy form) is the length to keep."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from emlens.generation.reserved_cache import ReservedLayer

    keys = torch.arange(5 * 4.0).reshape(1, 1, 5, 4)
    reserved, plain = ReservedLayer(capacity=8), DynamicLayer()
    for layer in (reserved, plain):
        layer.update(keys, -keys)
        layer.crop(crop)
    assert torch.equal(reserved.keys, plain.keys) and reserved.get_seq_length() == plain.get_seq_length()
