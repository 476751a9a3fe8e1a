"""Hugging Face transformers runs a model of the Llama architecture with grouped-query heads (random
weights from a config: nothing is downloaded) on our kernels, through register_with_transformers:
generate()'s greedy tokens are SDPA's, the prompt went through flash_attention and each new token
through flash_attn_with_kvcache on the model's KV cache (counted: a silent fallback to another
attention fails), and what the kernels cannot do is refused. Then Mistral's sliding window and Gemma 2's
window and softcap, through window_size and softcap. On the CPU emulation, as in CI."""
import pytest
import torch

import minimal_flash as mf

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install -r requirements-test.txt)")

LAYERS, HEADS, KV_HEADS, D = 2, 4, 2, 64  # grouped-query heads: two of q's share each head of k, v
B, PROMPT, NEW = 2, 11, 12


def llama(attn_implementation, dtype=torch.float16, **options):
    """The same random model each call. Seed, vocabulary and weights' std are chosen so that at every
    step of the generation below SDPA's best token leads the next by 35 or more units in the last
    place of fp16 logits, where the two attentions' logits differ by at most 3."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=HEADS * D, intermediate_size=512,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                                      initializer_range=0.05, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, **options)
    torch.manual_seed(2)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                         dtype=dtype).eval()


def prompts():
    return torch.randint(0, 64, (B, PROMPT), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def calls(monkeypatch):
    """Each call of the two functions the adapter runs: (name, q's shape, k's heads), and for
    flash_attn_with_kvcache whether k_cache is contiguous: the model's cache, (B, Hk, N, d), read in place,
    is not (its transposed view), a copy of it would be."""
    seen = []
    for name, heads_dim in (("flash_attention", 1), ("flash_attn_with_kvcache", 2)):
        def counted(q, k, *args, _function=getattr(mf, name), _name=name, _heads_dim=heads_dim, **options):
            seen.append((_name, tuple(q.shape), k.shape[_heads_dim])
                        + ((k.is_contiguous(),) if _name == "flash_attn_with_kvcache" else ()))
            return _function(q, k, *args, **options)
        monkeypatch.setattr(mf, name, counted)
    return seen


def test_generate_gives_sdpas_greedy_tokens(calls):
    name = mf.register_with_transformers()
    ids = prompts()
    expected = llama("sdpa").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert not calls
    model = llama(name)
    assert model.config._attn_implementation == name
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(tokens, expected), (tokens[:, PROMPT:], expected[:, PROMPT:])
    # Each layer: the prompt once, then each new token but the first (the prompt's last logits give it).
    assert calls == ([("flash_attention", (B, HEADS, PROMPT, D), KV_HEADS)] * LAYERS
                     + [("flash_attn_with_kvcache", (B, 1, HEADS, D), KV_HEADS, False)] * (LAYERS * (NEW - 1)))


def test_what_the_kernels_cannot_do_is_refused(calls):
    name = mf.register_with_transformers()
    ids = prompts()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0  # a shorter first prompt, padded on the left
    with pytest.raises(ValueError, match="padding"):
        llama(name).generate(ids, attention_mask=padded, max_new_tokens=2, do_sample=False)
    with pytest.raises(TypeError, match="bfloat16 and float16 models"):
        llama(name, torch.float32)(ids)
    with pytest.raises(ValueError, match="dropout"):
        llama(name, attention_dropout=0.1).train()(ids)
    for name in ("my_flash", "org/minimal", "minimal:v1"):  # transformers' names of other kernels
        with pytest.raises(ValueError, match=f"name = '{name}': transformers reads .* and loads that"):
            mf.register_with_transformers(name)
    assert not calls


def small_config(kind, d=D, **options):
    """A small model of Mistral's or Gemma 2's architecture (grouped-query heads, d = 64 unless given), a
    sliding window of 5 keys, shorter than the prompt (11) and far shorter than the generated 23 tokens."""
    return kind(vocab_size=64, hidden_size=HEADS * d, intermediate_size=512, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=d, max_position_embeddings=64,
                initializer_range=0.05, bos_token_id=None, eos_token_id=None, pad_token_id=None, sliding_window=5,
                **options)


# Mistral: every layer a sliding window (against SDPA); Gemma 2: sliding and full layers in turn, scores
# capped by attn_logit_softcapping (against eager attention: transformers runs no SDPA with a cap), at
# d = 64 and at Gemma 2's own d = 256 (version 3's kernels then, on a Hopper GPU too: version 4 stops at 128);
# Mistral at Phi-3's d = 96 too, between the compiled head dims (the prompt padded up to 128, the decode
# kernel's extra columns zeros).
MODELS = {"mistral": (lambda: small_config(transformers.MistralConfig), "sdpa"),
          "mistral-d96": (lambda: small_config(transformers.MistralConfig, d=96), "sdpa"),
          "gemma2": (lambda: small_config(transformers.Gemma2Config, attn_logit_softcapping=2.0,
                                          query_pre_attn_scalar=D), "eager"),
          "gemma2-d256": (lambda: small_config(transformers.Gemma2Config, d=256, attn_logit_softcapping=2.0,
                                               query_pre_attn_scalar=256), "eager")}


@pytest.mark.parametrize("model", list(MODELS))
def test_sliding_window_and_softcap_models(model, calls):
    """The prompt's logits within fp16's rounding of the reference attention's, generate()'s greedy tokens
    the same, and every layer's attention through our kernels (the window and the cap reach them: without
    either, they differ by over ten times that bound: 14 times without the cap, 230 without the window)."""
    config, reference = MODELS[model]
    name = mf.register_with_transformers()
    ids = prompts()

    def run(implementation):
        torch.manual_seed(2)
        lm = transformers.AutoModelForCausalLM.from_config(config(), attn_implementation=implementation,
                                                           dtype=torch.float16).eval()
        with torch.no_grad():
            logits = lm(ids).logits.float()
        return logits, lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)

    (logits_ref, tokens_ref), (logits, tokens) = run(reference), run(name)
    assert (logits - logits_ref).abs().max() <= 2 * 2.0 ** -8  # two units in the last place of fp16 at 4-8
    assert torch.equal(tokens, tokens_ref), (tokens[:, PROMPT:], tokens_ref[:, PROMPT:])
    assert [c[0] for c in calls].count("flash_attention") == 2 * LAYERS  # the logits' call and the prompt's
    assert [c[0] for c in calls].count("flash_attn_with_kvcache") == LAYERS * (NEW - 1)


def test_masks_other_than_causal_and_a_causal_window_are_refused():
    """The mask function is asked at the window's edges: a causal window of the size transformers says
    (local_size) passes; another size, a window both ways, chunks, do not."""
    from transformers import masking_utils as mu
    ask = dict(batch_size=1, q_length=4, kv_length=4)
    assert mf._transformers_mask(**ask, mask_function=mu.causal_mask_function) is None
    assert mf._transformers_mask(**ask, mask_function=mu.sliding_window_causal_mask_function(5), local_size=5) is None
    for mask_function, size in ((mu.sliding_window_causal_mask_function(5), 6),
                                (mu.sliding_window_bidirectional_mask_function(5), 5),
                                (mu.chunked_causal_mask_function(5, torch.zeros(1, dtype=torch.long)), 5),
                                (mu.bidirectional_mask_function, None)):
        with pytest.raises(ValueError, match="a mask other than the causal one or a causal sliding window"):
            mf._transformers_mask(**ask, mask_function=mask_function, local_size=size)
