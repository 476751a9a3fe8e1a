"""Hugging Face transformers runs a model of the Llama architecture with grouped-query heads (random
weights from a config: nothing is downloaded) on our kernels, through register_with_transformers:
generate()'s greedy tokens are SDPA's, the prompt went through flash_attention and each new token
through flash_attn_with_kvcache on the model's KV cache (counted: a silent fallback to another
attention fails), and what the kernels cannot do is refused. On the CPU emulation, as in CI."""
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
    """Each call of the two functions the adapter runs: (name, q's shape, k's heads)."""
    seen = []
    for name, heads_dim in (("flash_attention", 1), ("flash_attn_with_kvcache", 2)):
        def counted(q, k, *args, _function=getattr(mf, name), _name=name, _heads_dim=heads_dim, **options):
            seen.append((_name, tuple(q.shape), k.shape[_heads_dim]))
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
                     + [("flash_attn_with_kvcache", (B, 1, HEADS, D), KV_HEADS)] * (LAYERS * (NEW - 1)))


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
    with pytest.raises(ValueError, match="flash-attn package"):
        mf.register_with_transformers("my_flash")
    assert not calls
