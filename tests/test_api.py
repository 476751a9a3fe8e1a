"""The entry points people already know: scaled_dot_product_attention's option names, and the
flash-attn package's flash_attn_func and its packed forms (qkv, kv; fixed-length and varlen) with their layouts,
each against flash_attention and against float64, gradients included. And the table of versions:
each row's files are there, and each version's build answers for both passes."""
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import minimal_flash as mf
from helpers import (DEVICES, MATRIX, TOL, assert_close, assert_gradients, head_dim, random_dO, random_qkv, reference,
                     rel_err)


def test_sdpa_option_names(generator):
    q, k, v = random_qkv(1, 2, 45, 16, "cpu", generator)
    O = mf.flash_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.equal(O, mf.flash_attention(q, k, v, causal=True, softmax_scale=0.3))
    assert rel_err(O, reference(q, k, v, True, 0.3)[0]) < TOL
    assert torch.equal(mf.flash_attention(q, k, v, causal=True, is_causal=True),
                       mf.flash_attention(q, k, v, causal=True))


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


@pytest.mark.parametrize("device", DEVICES)
def test_the_official_entry_points_return_contiguous_outputs(device, generator):
    """The official package's functions return out contiguous, in their own layout (B, N, H, d), or (total, H,
    d) packed, or the decode's (B, Nq, H, d): code written for them may view it, out.view(B, N, -1), which a
    transposed view of a (B, H, N, d) output refuses. Each entry point, fp32 (flash_attn_func's versions 1
    and 2) and bf16 (the default, and version 4, which writes O in that layout, where it runs), equal and
    different lengths, packed forms, return_attn_probs; the values are checked against float64 by the tests
    of each. Also at d = 40, which versions 3 and 4 run padded with zero columns up to 64: the output is
    still d wide and contiguous (not a view of the padded one's first columns)."""
    B, N, H, d, bf16 = 2, 33, 4, 64, torch.bfloat16
    q, k, v = (torch.randn(B, N, H, d, generator=generator, dtype=bf16).to(device) for _ in range(3))
    cu = torch.tensor([0, 30, 66], dtype=torch.int32, device=device)
    packed = [t.reshape(B * N, H, d) for t in (q, k, v)]
    q40, k40, v40 = (t[..., :40].contiguous() for t in (q, k, v))
    packed40 = [t.reshape(B * N, H, 40) for t in (q40, k40, v40)]
    k_cache, v_cache = (torch.randn(B, 64, H, d, generator=generator, dtype=bf16).to(device) for _ in range(2))
    outputs = {
        "flash_attn_func fp32": mf.flash_attn_func(q.float(), k.float(), v.float(), causal=True),
        "flash_attn_func": mf.flash_attn_func(q, k, v, causal=True),
        "flash_attn_func return_attn_probs": mf.flash_attn_func(q, k, v, return_attn_probs=True)[0],
        "flash_attn_func seqlen_q < seqlen_k": mf.flash_attn_func(q[:, :5], k, v, causal=True),
        "flash_attn_qkvpacked_func": mf.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2)),
        "flash_attn_kvpacked_func": mf.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2)),
        "flash_attn_varlen_func": mf.flash_attn_varlen_func(*packed, cu, cu, 36, 36, causal=True),
        "flash_attn_varlen_qkvpacked_func": mf.flash_attn_varlen_qkvpacked_func(torch.stack(packed, dim=1), cu, 36),
        "flash_attn_with_kvcache": mf.flash_attn_with_kvcache(
            q[:, :3], k_cache, v_cache, cache_seqlens=torch.tensor([10, 64], dtype=torch.int32, device=device)),
        "flash_attn_func d = 40": mf.flash_attn_func(q40, k40, v40, causal=True),
        "flash_attn_func seqlen_q < seqlen_k, d = 40": mf.flash_attn_func(q40[:, :5], k40, v40, causal=True),
        "flash_attn_varlen_func d = 40": mf.flash_attn_varlen_func(*packed40, cu, cu, 36, 36, causal=True),
        "flash_attn_with_kvcache d = 40": mf.flash_attn_with_kvcache(q40[:, :3], k_cache[..., :40].contiguous(),
                                                                     v_cache[..., :40].contiguous(), cache_seqlens=10),
    }
    if not mf.version_unavailable(4, device):
        outputs["flash_attn_func version 4"] = mf.flash_attn_func(q, k, v, causal=True, version=4)
    for name, out in outputs.items():
        assert out.is_contiguous(), name
        width = 40 if name.endswith("d = 40") else d
        assert out.shape[-2:] == (H, width) and out.view(*out.shape[:-2], -1).shape[-1] == H * width, name


def test_flash_attn_qkvpacked_func(generator):
    qkv = torch.randn(2, 30, 3, 2, 16, generator=generator, requires_grad=True)  # (B, N, 3, H, d)
    out = mf.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.detach().unbind(dim=2))
    assert out.shape == (2, 30, 2, 16)
    assert rel_err(out.transpose(1, 2), reference(q, k, v, True)[0]) < TOL
    weights = random_dO(out, generator)
    (out * weights).sum().backward()
    assert_gradients(tuple(qkv.grad[:, :, i].transpose(1, 2) for i in range(3)), q, k, v, weights.transpose(1, 2), True)


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
def test_return_lse(device, version, dtype, generator):
    """flash_attention(return_lse=True): lse (B, H, N) float32, each row's log-sum-exp of its scaled scores
    against float64, forward()'s L to the bit, without gradient; out and its gradients as without it."""
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 3, 70, head_dim(version), device, generator, dtype))
    out, lse = mf.flash_attention(q, k, v, causal=True, softmax_scale=0.3, version=version, return_lse=True)
    inputs = [t.detach() for t in (q, k, v)]
    assert lse.shape == (2, 3, 70) and lse.dtype == torch.float32 and not lse.requires_grad
    assert_close("lse", lse, reference(*inputs, True, 0.3)[1])
    assert torch.equal(lse, mf.forward(*inputs, causal=True, softmax_scale=0.3, version=version)[1])
    assert torch.equal(out, mf.flash_attention(q, k, v, causal=True, softmax_scale=0.3, version=version))
    dO = random_dO(q, generator)
    assert_gradients(torch.autograd.grad(out, (q, k, v), dO), *inputs, dO, True, 0.3)


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
def test_a_new_thread(device, version, dtype, generator):
    """Each version called from a new Python thread whose first CUDA work is ours: the right answer, its
    gradients too. (Version 4 asks the driver for its tensor maps, which needs the device's context
    current in the thread; the runtime makes it current only at its own first call there.)"""
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 3, 70, head_dim(version), device, generator, dtype))
    dO = random_dO(q, generator)
    results = []

    def run():
        try:
            out = mf.flash_attention(q, k, v, causal=True, version=version)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dO)))
        except Exception as error:  # (raised again below, in the test's own thread)
            results.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(results[0], Exception):
        raise results[0]
    out, *grads = results[0]
    inputs = [t.detach() for t in (q, k, v)]
    assert torch.equal(out, mf.flash_attention(*inputs, causal=True, version=version))  # the main thread's
    assert_close("O", out, reference(*inputs, True)[0], mf.manual_attention(*inputs, causal=True))
    assert_gradients(grads, *inputs, dO, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@MATRIX
def test_the_first_backward_of_a_new_process(version, dtype, generator, tmp_path):
    """A new process's first backward: autograd runs it in a thread of its own for the GPU, whose first
    CUDA work is then ours (one output, O: autograd makes no zeros for another first). Version 4's tensor
    maps need the device's context current in that thread: the driver's call fails otherwise (CUresult
    201, seen on an H100 when L was an output without them)."""
    if (why := mf.version_unavailable(version, "cuda")) is not None:
        pytest.skip(why)
    q, k, v = random_qkv(2, 3, 70, head_dim(version), "cpu", generator, dtype)
    dO = random_dO(q, generator)
    torch.save((q, k, v, dO), tmp_path / "inputs.pt")
    script = "\n".join([
        "import torch, minimal_flash as mf",
        f"q, k, v, dO = (t.cuda() for t in torch.load({str(tmp_path / 'inputs.pt')!r}))",
        "q, k, v = (t.requires_grad_() for t in (q, k, v))",
        f"out = mf.flash_attention(q, k, v, causal=True, version={version})",
        "out.backward(dO)",
        f"torch.save([t.cpu() for t in (out, q.grad, k.grad, v.grad)], {str(tmp_path / 'outputs.pt')!r})"])
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(mf.__file__).parent, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out, *grads = torch.load(tmp_path / "outputs.pt")
    assert_close("O", out, reference(q, k, v, True)[0], mf.manual_attention(q, k, v, causal=True))
    assert_gradients(grads, q, k, v, dO, True)


def test_flash_attn_func_return_attn_probs(generator):
    """return_attn_probs=True: (out, softmax_lse, None) as the official package without dropout, softmax_lse
    (B, H, N); flash_attn_qkvpacked_func too. With dropout the official S_dmask is refused, and a flag
    that is not a bool."""
    q, k, v = random_qkv(2, 37, 3, 16, "cpu", generator)  # (B, N, H, d)
    out, lse, S_dmask = mf.flash_attn_func(q, k, v, 0.0, 0.2, True, return_attn_probs=True)
    views = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, N, d)
    assert S_dmask is None and torch.equal(out, mf.flash_attn_func(q, k, v, softmax_scale=0.2, causal=True))
    assert torch.equal(lse, mf.flash_attention(*views, causal=True, softmax_scale=0.2, return_lse=True)[1])
    assert rel_err(lse, reference(*views, True, 0.2)[1]) < TOL
    packed = mf.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), 0.0, 0.2, True, return_attn_probs=True)
    assert packed[2] is None and torch.equal(packed[0], out) and torch.equal(packed[1], lse)
    with pytest.raises(ValueError, match="return_attn_probs=True with dropout_p = 0.1: the official package then "
                                         "returns the attention weights with their dropout pattern"):
        mf.flash_attn_func(q, k, v, 0.1, return_attn_probs=True)
    with pytest.raises(TypeError, match="return_attn_probs = 1: it must be True or False"):
        mf.flash_attn_func(q, k, v, return_attn_probs=1)
    with pytest.raises(TypeError, match="return_lse = 'yes': it must be True or False"):
        mf.flash_attention(*views, return_lse="yes")


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


@pytest.mark.parametrize("varlen", [False, True], ids=["fixed", "varlen"])
def test_a_double_backward_is_an_error_not_a_zero(varlen, generator):
    """The kernels' gradients have no derivative of their own: under create_graph (a gradient penalty) they
    must not pass for constants (the penalty's own gradient silently lost); differentiating them raises."""
    if varlen:
        q, k, v = (torch.randn(20, 2, 64, generator=generator).bfloat16().requires_grad_() for _ in range(3))
        cu = torch.tensor([0, 7, 20], dtype=torch.int32)
        out = mf.flash_attn_varlen_func(q, k, v, cu, cu, 13, 13)
    else:
        q, k, v = (torch.randn(1, 2, 20, 32, generator=generator).requires_grad_() for _ in range(3))
        out = mf.flash_attention(q, k, v, causal=True)
    dq, = torch.autograd.grad(out.float().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="gradients .* have no derivative of their own: a double backward"):
        (dq.float() ** 2).sum().backward()
    assert torch.equal(dq, torch.autograd.grad(out.float().sum(), q, retain_graph=True)[0])  # (the same values)


def test_the_other_packed_functions(generator):
    """flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func: the same
    as flash_attn_func and flash_attn_varlen_func on the unpacked tensors, to the bit, gradients included
    (they reach the packed tensor through its views); a tensor packed otherwise is refused by name."""
    q = torch.randn(2, 30, 4, 64, generator=generator).to(torch.bfloat16).requires_grad_()
    kv = torch.randn(2, 30, 2, 2, 64, generator=generator).to(torch.bfloat16).requires_grad_()  # (B, N, 2, Hk, d)
    dO = torch.randn(2, 30, 4, 64, generator=generator).to(torch.bfloat16)
    cu = torch.tensor([0, 30, 60], dtype=torch.int32)
    qkv = torch.randn(60, 3, 4, 64, generator=generator).to(torch.bfloat16).requires_grad_()  # (total, 3, H, d)
    calls = [(lambda q, kv: mf.flash_attn_kvpacked_func(q, kv, causal=True),
              lambda q, kv: mf.flash_attn_func(q, *kv.unbind(2), causal=True), (q, kv)),
             (lambda q, kv: mf.flash_attn_varlen_kvpacked_func(q.flatten(0, 1), kv.flatten(0, 1), cu, cu, 30, 30,
                                                               causal=True),
              lambda q, kv: mf.flash_attn_varlen_func(q.flatten(0, 1), *kv.flatten(0, 1).unbind(1), cu, cu, 30, 30,
                                                      causal=True), (q, kv)),
             (lambda qkv: mf.flash_attn_varlen_qkvpacked_func(qkv, cu, 30, causal=True),
              lambda qkv: mf.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 30, 30, causal=True), (qkv,))]
    for packed, unpacked, inputs in calls:
        results = []
        for call in (packed, unpacked):
            out = call(*inputs)
            results.append((out, *torch.autograd.grad(out, inputs, dO.reshape(out.shape))))
        assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match=r"kv must be 5-D \(B, N_k, 2, nheads_k, d\), got shape \(2, 30, 3, 2, 64\)"):
        mf.flash_attn_kvpacked_func(q, torch.zeros(2, 30, 3, 2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"qkv must be 4-D \(total, 3, nheads, d\)"):
        mf.flash_attn_varlen_qkvpacked_func(qkv[None], cu, 30)
