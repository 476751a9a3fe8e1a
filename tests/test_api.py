"""The entry points people already know: scaled_dot_product_attention's option names, and the
flash-attn package's flash_attn_func and flash_attn_qkvpacked_func with their (B, N, H, d) layout,
each against flash_attention and against float64, gradients included. And the table of versions:
each row's files are there, and each version's build answers for both passes."""
import pytest
import torch

import minimal_flash as mf
from helpers import TOL, assert_gradients, random_dO, random_qkv, reference, rel_err


def test_sdpa_option_names(generator):
    q, k, v = random_qkv(1, 2, 45, 16, "cpu", generator)
    O = mf.flash_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.equal(O, mf.flash_attention(q, k, v, causal=True, softmax_scale=0.3))
    assert rel_err(O, reference(q, k, v, True, 0.3)[0]) < TOL
    assert torch.equal(mf.flash_attention(q, k, v, causal=True, is_causal=True), mf.flash_attention(q, k, v, causal=True))


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
    assert torch.equal(out.detach().transpose(1, 2), mf.flash_attention(*views, causal=True, softmax_scale=0.2))
    assert rel_err(out.transpose(1, 2), reference(*views, True, 0.2)[0]) < TOL
    weights = random_dO(out, generator)
    (out * weights).sum().backward()
    assert_gradients(tuple(t.grad.transpose(1, 2) for t in (q, k, v)), *views, weights.transpose(1, 2), True, 0.2)


def test_flash_attn_qkvpacked_func(generator):
    qkv = torch.randn(2, 30, 3, 2, 16, generator=generator, requires_grad=True)  # (B, N, 3, H, d)
    out = mf.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.detach().unbind(dim=2))
    assert out.shape == (2, 30, 2, 16)
    assert rel_err(out.transpose(1, 2), reference(q, k, v, True)[0]) < TOL
    weights = random_dO(out, generator)
    (out * weights).sum().backward()
    assert_gradients(tuple(qkv.grad[:, :, i].transpose(1, 2) for i in range(3)), q, k, v, weights.transpose(1, 2), True)


@pytest.mark.parametrize("version", list(mf.VERSIONS))
def test_each_version_row_names_its_files_and_its_build_answers(version):
    """A row of minimal_flash.VERSIONS names the version's kernel files and its home, which includes
    them; its build holds both passes, with the shared memory a block needs, and takes the block
    sizes only where the row says they apply."""
    row = mf.VERSIONS[version]
    home = (mf.KERNELS / row.home).read_text()
    assert all(f'#include "{file}"' in home for file in row.kernels)
    kernels = mf.load_kernels("cpu", version)
    d = row.head_dims[0] if row.head_dims else 64
    assert all(kernels.shared_bytes(pass_, d) > 0 for pass_ in mf.PASSES)
    assert (kernels.Br is not None) == (row.block_sizes is not None)
    assert set(name for name, _ in kernels.sources[1]) >= {row.home, *row.kernels, "bindings.cu", "cpu.cpp"}


def test_a_pass_that_does_not_exist_is_an_error():
    q = torch.zeros(1, 1, 2, 4)
    assert "pass 'sideways'" in mf.load_kernels("cpu", 1).run("sideways", False, 1.0, q, q, q, q, q[..., 0])
