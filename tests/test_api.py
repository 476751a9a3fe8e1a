"""The entry points people already know: scaled_dot_product_attention's option names, and the
flash-attn package's flash_attn_func and flash_attn_qkvpacked_func with their (B, N, H, d) layout,
each against flash_attention and against float64, gradients included. And the table of versions."""
import pytest
import torch

import minimal_flash as mf
from helpers import TOL, random_dO, random_qkv, reference, reference_grads, rel_err


def test_sdpa_option_names(generator):
    q, k, v = random_qkv(1, 2, 45, 16, "cpu", generator)
    O = mf.flash_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.equal(O, mf.flash_attention(q, k, v, True, 0.3))
    assert rel_err(O, reference(q, k, v, True, 0.3)[0]) < TOL
    assert torch.equal(mf.flash_attention(q, k, v, causal=True, is_causal=True), mf.flash_attention(q, k, v, True))


@pytest.mark.parametrize("options", [dict(causal=True, is_causal=False), dict(softmax_scale=0.5, scale=0.3)])
def test_an_option_under_both_names_must_agree(options):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="give one of them"):
        mf.flash_attention(q, q, q, **options)


def test_flash_attn_func_takes_batch_seqlen_heads_headdim(generator):
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 37, 3, 16, "cpu", generator))  # (B, N, H, d)
    out = mf.flash_attn_func(q, k, v, causal=True, softmax_scale=0.2)
    views = [t.detach().transpose(1, 2) for t in (q, k, v)]  # (B, H, N, d)
    assert out.shape == q.shape
    assert torch.equal(out.detach().transpose(1, 2), mf.flash_attention(*views, True, 0.2))
    assert rel_err(out.transpose(1, 2), reference(*views, True, 0.2)[0]) < TOL
    weights = random_dO(out, generator)
    (out * weights).sum().backward()
    refs = reference_grads(*views, weights.transpose(1, 2), True, 0.2)
    for name, grad, ref in zip("qkv", (q.grad, k.grad, v.grad), refs):
        assert rel_err(grad.transpose(1, 2), ref) < TOL, name


def test_flash_attn_qkvpacked_func(generator):
    qkv = torch.randn(2, 30, 3, 2, 16, generator=generator, requires_grad=True)  # (B, N, 3, H, d)
    out = mf.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.detach().unbind(dim=2))
    assert out.shape == (2, 30, 2, 16)
    assert rel_err(out.transpose(1, 2), reference(q, k, v, True)[0]) < TOL
    weights = random_dO(out, generator)
    (out * weights).sum().backward()
    for i, ref in enumerate(reference_grads(q, k, v, weights.transpose(1, 2), True)):
        assert rel_err(qkv.grad[:, :, i].transpose(1, 2), ref) < TOL, "qkv"[i]


def test_dropout_is_refused_clearly():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="dropout_p = 0.1: these kernels have no dropout"):
        mf.flash_attn_func(q, q, q, dropout_p=0.1)


def test_the_python_and_cpp_version_tables_agree():
    kernels = mf.load_kernels("cpu")
    assert kernels.versions == len(mf.VERSIONS)
    for version, (_, _, backward_file, _) in mf.VERSIONS.items():
        assert kernels.shared_bytes("forward", version, 64) > 0
        assert (kernels.shared_bytes("backward", version, 64) > 0) == (backward_file is not None)
    assert kernels.shared_bytes("forward", len(mf.VERSIONS) + 1, 64) == -1
    assert "no kernel for pass 0, version 9" in kernels.forward(*(torch.zeros(1, 1, 2, 4),) * 4,
                                                                torch.zeros(1, 1, 2), False, 1.0, 9)
