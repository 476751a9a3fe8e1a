"""Version 4 reads q, k, v (and the backward's dO) where they lie: its tensor maps are 4-D, (column,
row, head, batch), with the tensors' own strides (kernels/version4.cuh), so a model's views run with
no copy; a layout no tensor map can describe is still copied (minimal_flash._laid_out). Each case
runs the forward and the backward into NaN-poisoned outputs, checks them against float64 (the 2x
rule, tests/helpers.py) and bit for bit against the same values made contiguous (the same kernels
doing the same arithmetic; deterministic, so that dQ's additions come in one order, and (a) also in
the default mode, its dQ then equal up to that order):

  (a) notebook 7's GPT: q, k, v permuted out of one (B, T, 3, H, d) projection, rows 3 H d values
      apart and heads d; dO the gradient of y.transpose(1, 2).reshape(B, T, C), a (B, T, H, d) tensor
      viewed as (B, H, T, d); and nothing copied on the way to the kernels, eager or compiled;
  (b) grouped heads: q and k, v of fewer heads, all views of one fused (B, T, H + 2 Hk, d) projection;
  (c) layouts that must still be copied: rows 136 bytes apart, a start 2 bytes past a 16-byte
      boundary, a last dim of stride 2, a batch of stride 0 (expand);
  (d) O, dQ, dK, dV written in q's, k's, v's layouts: for (a)'s views, (B, T, H, d) memory, so that
      the model's transpose back to (B, T, C) is a view, not a copy (and gradients flow back likewise);
      their values, and the backward's reading of O, bit for bit those of contiguous outputs."""
import dataclasses
import math

import pytest
import torch

import minimal_flash as mf
from helpers import CAUSAL, assert_close, half_precision_grads, plain_attention, reference, reference_grads, rel_err

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HOPPER, reason="no CUDA GPU of compute capability 9.0 (version 4: H100, H200) on this machine"))]
DEVICE = pytest.mark.parametrize("device", DEVICES)


def poisoned(t):
    """A contiguous tensor of t's shape and dtype, NaN: out= tensors are contiguous whatever the inputs' layout
    (the kernels' own outputs may take q's: test_outputs_in_the_models_layout)."""
    return torch.full(t.shape, math.nan, dtype=t.dtype, device=t.device)


def gpt_views(B, T, H, d, device, generator, dtype=torch.bfloat16):
    """q, k, v as notebook 7's GPT makes them, qkv(x).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4), and dO
    as its backward hands it over: the gradient of y.transpose(1, 2).reshape(B, T, C), (B, T, H, d)
    viewed as (B, H, T, d). Also the two tensors they view."""
    qkv = torch.randn(B, T, 3, H, d, generator=generator).to(device, dtype)
    grad = torch.randn(B, T, H, d, generator=generator).to(device, dtype)
    return (*qkv.permute(2, 0, 3, 1, 4), grad.transpose(1, 2)), (qkv, grad)


def passes(q, k, v, dO, causal, deterministic=True):
    """Version 4's forward, then its backward from the forward's O and L, into poisoned outputs:
    (O, L, dQ, dK, dV)."""
    O, L = poisoned(q), poisoned(q[..., 0].float())
    mf.forward(q, k, v, causal=causal, out=(O, L), version=4)
    grads = tuple(poisoned(t) for t in (q, k, v))
    mf.backward(dO, q, k, v, O, L, causal=causal, out=grads, version=4, deterministic=deterministic)
    return O, L, *grads


def check(q, k, v, dO, causal, deterministic=True):
    """passes() on these tensors: against float64 (O and dQ, dK, dV within twice plain attention's
    error in the same precision; k, v of fewer heads: their gradients summed over each group, as
    plain attention's), and bit for bit against passes() on the same values made contiguous (dQ up to
    the order of its additions, unless deterministic)."""
    results = passes(q, k, v, dO, causal, deterministic)
    contiguous = passes(*(t.contiguous() for t in (q, k, v, dO)), causal, deterministic)
    for name, x, y in zip(("O", "L", "dQ", "dK", "dV"), results, contiguous):
        assert x.is_contiguous(), name
        if name == "dQ" and not deterministic:
            assert rel_err(x, y.double()) < 1e-2, name
        else:
            assert torch.equal(x, y), name
    group, Hk = q.shape[1] // k.shape[1], k.shape[1]
    k_all, v_all = (t.repeat_interleave(group, dim=1) for t in (k, v))  # the keys each query head reads
    O, L, *grads = results
    O_ref, L_ref = reference(q, k_all, v_all, causal)
    assert_close("O", O, O_ref, plain_attention(q, k_all, v_all, causal))
    assert_close("L", L, L_ref)
    fold = lambda g: g.unflatten(1, (Hk, group)).sum(2, dtype=torch.float64)  # noqa: E731  (a group's sum)
    refs = reference_grads(q, k_all, v_all, dO, causal)
    plains = half_precision_grads(q, k_all, v_all, dO, causal)
    for name, grad, ref, plain, grouped in zip(("dQ", "dK", "dV"), grads, refs, plains, (False, True, True)):
        if grouped:
            ref, plain = fold(ref), fold(plain).to(plain.dtype)
        assert_close(name, grad, ref, plain)


# (a): 130 rows, a second query and key tile that is mostly past the end (zero-filled by the tensor
# map, which must not read the rows that follow in memory, the next batch's, in their place); B, H > 1,
# so that the batch and head strides are stepped along.
@DEVICE
@CAUSAL
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_gpt_views(device, causal, deterministic, generator):
    (q, k, v, dO), _ = gpt_views(2, 130, 2, 64, device, generator)
    assert not any(t.is_contiguous() for t in (q, k, v, dO))
    check(q, k, v, dO, causal, deterministic)


@DEVICE
@CAUSAL
def test_grouped_heads_views(device, causal, generator):
    """(b) 4 query heads on 2 heads of k, v, d = 128: q = x[:, :, :4], k = x[:, :, 4:6], v = x[:, :, 6:]
    of one (B, T, 8, d) tensor, each viewed as (B, H, T, d). The forward reads k, v's head h / 2 through
    their own maps; the backward gets them repeated to q's heads (minimal_flash._grouped_grads)."""
    x = torch.randn(2, 100, 8, 128, generator=generator).to(device, torch.bfloat16)
    q, k, v = (x[:, :, heads].transpose(1, 2) for heads in (slice(0, 4), slice(4, 6), slice(6, 8)))
    dO = torch.randn(2, 100, 4, 128, generator=generator).to(device, torch.bfloat16).transpose(1, 2)
    check(q, k, v, dO, causal)


def spy_on_kernels(monkeypatch):
    """Kernels.call, recording the q, k, v (and dO) that each pass hands the kernels."""
    calls, call = [], mf.Kernels.call

    def spy(self, pass_, causal, scale, q, k, v, O, L, dO=None, *rest, **options):
        calls.append([t for t in (q, k, v, dO) if t is not None])
        return call(self, pass_, causal, scale, q, k, v, O, L, dO, *rest, **options)

    monkeypatch.setattr(mf.Kernels, "call", spy)
    return calls


def rows_136_bytes_apart(t):
    return torch.cat([t, t[..., :4]], dim=-1)[..., :64]  # rows of 68 values, 64 of them used


def two_bytes_off(t):
    return torch.cat([t[..., :1], t, t[..., :7]], dim=-1)[..., 1:65]  # rows 144 bytes apart, from byte 2


def last_stride_2(t):
    return torch.stack([t, t], dim=-1)[..., 0]


def batch_stride_0(t):
    return t[:1].expand(t.shape)


COPIED = [rows_136_bytes_apart, two_bytes_off, last_stride_2, batch_stride_0]


@DEVICE
@pytest.mark.parametrize("layout", COPIED, ids=[f.__name__ for f in COPIED])
def test_layouts_no_tensor_map_describes_are_copied(device, layout, generator, monkeypatch):
    """(c) A stride that is not a multiple of 16 bytes, an address that is not 16-byte aligned, a last
    dim that is not contiguous, a stride of 0: the tensor map's rule refuses them, so they reach the
    kernels as contiguous copies (and the copies' results are the contiguous inputs')."""
    q, k, v, dO = (layout(t) for t in torch.randn(4, 2, 2, 70, 64, generator=generator).to(device, torch.half))
    assert not any(mf._reads_as_is(t, 4) and t.data_ptr() % 16 == 0 for t in (q, k, v, dO))
    calls = spy_on_kernels(monkeypatch)
    check(q, k, v, dO, causal=True)
    assert calls and all(t.is_contiguous() for call in calls for t in call)


@DEVICE
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpt_views_reach_the_kernels_uncopied(device, compiled, generator, monkeypatch):
    """(a) through autograd, as the model runs it: attention on the projection's views, its output
    back to (B, T, C) by y.transpose(1, 2).reshape(B, T, C), whose gradient reaches the backward as
    dO. The kernels get the very memory of the projection and of that gradient, at the views' strides,
    not a copy: the forward q, k, v; the backward q, k, v and dO. Compiled (torch.compile, fullgraph:
    the custom operators, whose inputs Inductor hands over at the strides traced) the same, with
    results equal to eager's bit for bit."""
    (q, k, v, dO), (qkv, grad) = gpt_views(2, 130, 2, 64, device, generator)
    B, T, _, H, d = qkv.shape
    qkv.requires_grad_()

    def attention(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = mf.flash_attention(q, k, v, causal=True, version=4, deterministic=True)
        return y.transpose(1, 2).reshape(B, T, H * d)

    results = []
    for fn in (attention, torch.compile(attention, fullgraph=True)) if compiled else (attention,):
        calls = spy_on_kernels(monkeypatch)
        y = fn(qkv)
        results.append((y, *torch.autograd.grad(y, qkv, grad.reshape(B, T, H * d))))
        (forward, backward), views = calls, (q, k, v, dO)
        assert len(forward) == 3 and len(backward) == 4
        for x, view in zip(forward + backward, views[:3] + views):
            assert x.data_ptr() == view.data_ptr() and x.stride() == view.stride()
    assert all(torch.equal(x, y) for x, y in zip(results[0], results[-1]))  # compiled: as eager
    y, dqkv = results[0]
    assert_close("O", y.view(B, T, H, d).transpose(1, 2), reference(q, k, v, True)[0],
                 plain_attention(q, k, v, True))
    refs, plains = reference_grads(q, k, v, dO, True), half_precision_grads(q, k, v, dO, True)
    for name, g, ref, plain in zip(("dQ", "dK", "dV"), dqkv.permute(2, 0, 3, 1, 4), refs, plains):
        assert_close(name, g, ref, plain)


@DEVICE
@CAUSAL
def test_outputs_in_the_models_layout(device, causal, generator):
    """(d) Through autograd, as the model runs it: O of the GPT's views is (B, T, H, d) memory viewed as
    (B, H, T, d), and y = O.transpose(1, 2).reshape(B, T, C) a view of it (a contiguous O would make
    reshape copy); dQ, dK, dV likewise in that layout; O and the gradients, which the backward takes
    from that O (D = rowsum(dO * O) read with O's strides), against float64. Behind it, Kernels.run: the
    forward into a NaN-poisoned O of that layout gives a contiguous O's values bit for bit (every
    element written where its strides put it), and the backward from each, into poisoned gradients of
    the same layout, the same gradients bit for bit (deterministic)."""
    (q, k, v, dO), _ = gpt_views(2, 130, 2, 64, device, generator)
    B, H, T, d = q.shape
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    O = mf.flash_attention(q, k, v, causal=causal, version=4)
    y = O.transpose(1, 2).reshape(B, T, H * d)
    assert O.transpose(1, 2).is_contiguous() and y.data_ptr() == O.data_ptr() and y._base is not None
    assert_close("O", O, reference(q, k, v, causal)[0], plain_attention(q, k, v, causal))
    grads = torch.autograd.grad(y, (q, k, v), dO.transpose(1, 2).reshape(B, T, H * d))
    refs, plains = reference_grads(q, k, v, dO, causal), half_precision_grads(q, k, v, dO, causal)
    for name, g, ref, plain in zip(("dQ", "dK", "dV"), grads, refs, plains):
        assert g.transpose(1, 2).is_contiguous(), name
        assert_close(name, g, ref, plain)

    kernels, q, k, v = mf.load_kernels(device, 4), q.detach(), k.detach(), v.detach()
    runs = []
    for laid in (poisoned, lambda t: poisoned(t.transpose(1, 2)).transpose(1, 2)):  # contiguous; the model's
        O, L = laid(q), poisoned(q[..., 0].float())
        assert kernels.run("forward", causal, d**-0.5, q, k, v, O, L) == ""
        grads = [laid(q) for _ in range(3)]
        assert kernels.run("backward", causal, d**-0.5, q, k, v, O, L, dO, *grads, deterministic=True) == ""
        runs.append((O, L, *grads))
    assert not runs[0][0].transpose(1, 2).is_contiguous() and runs[1][0].transpose(1, 2).is_contiguous()
    for name, x, y in zip(("O", "L", "dQ", "dK", "dV"), *runs):
        assert torch.equal(x, y), name


@DEVICE
def test_custom_operators_take_views(device, generator):
    """torch.library.opcheck of both operators on the GPT's views: their fake tensors (O, dQ, dK, dV
    contiguous, as the operators have the kernels write them) agree with what they return."""
    (q, k, v, dO), _ = gpt_views(1, 70, 2, 64, device, generator)
    options = (True, 0.125, None, None, 4, True)
    torch.library.opcheck(torch.ops.minimal_flash.attention.default, (q, k, v, *options))
    O, L = torch.ops.minimal_flash.attention(q, k, v, *options)
    torch.library.opcheck(torch.ops.minimal_flash.attention_grads.default, (dO, q, k, v, O, L, *options))


def test_the_last_line_of_defence_takes_what_version_4_reads(monkeypatch):
    """Kernels.run, past minimal_flash's checks: version 4 takes the GPT's views, and O, dQ, dK, dV in
    their (B, T, H, d) layout; it refuses a layout no tensor map describes (rows 136 bytes apart), an O
    or a gradient in any other layout than those two (a view of every other row), with its internal
    error; version 3 refuses the views and that O. And behind it, mf_run: version 3's build refuses
    strides that are not contiguous's, were Python to hand it any."""
    (q, k, v, dO), _ = gpt_views(1, 20, 2, 64, "cpu", torch.Generator().manual_seed(0))
    O, L = poisoned(q), poisoned(q[..., 0].float())
    assert mf.load_kernels("cpu", 4).run("forward", False, 0.125, q, k, v, O, L) == ""
    assert torch.isfinite(O).all()
    layout = "internal error: the (B, H, N, d) tensors differ in shape, layout, dtype or device"
    assert mf.load_kernels("cpu", 4).run("forward", False, 0.125, rows_136_bytes_apart(q), k, v, O, L) \
        .startswith(layout)
    assert mf.load_kernels("cpu", 3).run("forward", False, 0.125, q, k, v, O, L).startswith(layout)
    O_model = poisoned(dO.transpose(1, 2)).transpose(1, 2)  # (B, T, H, d) memory, as the model's views
    assert mf.load_kernels("cpu", 4).run("forward", False, 0.125, q, k, v, O_model, L) == ""
    assert torch.equal(O_model, O)
    O_rows = torch.cat([O, O], dim=2)[:, :, ::2]  # every other row of a tensor twice as long
    assert mf.load_kernels("cpu", 4).run("forward", False, 0.125, q, k, v, O_rows, L).startswith(layout)
    grads = [poisoned(q), O_model, O_rows]  # dV: a view no output may be
    assert mf.load_kernels("cpu", 4).run("backward", False, 0.125, q, k, v, O, L, dO, *grads).startswith(layout)
    grads[2] = poisoned(q)
    assert mf.load_kernels("cpu", 4).run("backward", False, 0.125, q, k, v, O, L, dO, *grads) == ""
    assert torch.isfinite(grads[1]).all()
    contiguous = [t.contiguous() for t in (q, k, v)]
    assert mf.load_kernels("cpu", 3).run("forward", False, 0.125, *contiguous, O_model, L).startswith(layout)
    monkeypatch.setitem(mf.VERSIONS, 3, dataclasses.replace(mf.VERSIONS[3], strided=True))  # pass the strides
    assert mf.load_kernels("cpu", 3).call("forward", False, 0.125, q, k, v, O, L) == \
        "internal error: this version takes contiguous q, k, v, dO, O, dQ, dK, dV only"
    assert mf.load_kernels("cpu", 3).call("forward", False, 0.125, *contiguous, O_model, L) == \
        "internal error: this version takes contiguous q, k, v, dO, O, dQ, dK, dV only"
    assert mf.load_kernels("cpu", 3).call("backward", False, 0.125, *contiguous, O, L, dO.contiguous(), O_model,
                                          poisoned(q), poisoned(q)) == \
        "internal error: this version takes contiguous q, k, v, dO, O, dQ, dK, dV only"


def test_out_tensors_must_not_overlap_an_input_view(generator):
    """out= tensors are checked against the inputs' whole span: v, the last of the projection's three
    views, reaches to its end, far past its first N d values."""
    (q, k, v, dO), (qkv, _) = gpt_views(1, 20, 2, 64, "cpu", generator)
    tail = qkv.view(-1)[-q.numel():].view(q.shape)  # contiguous: the projection's last values
    O, L = mf.forward(q, k, v, version=4)
    with pytest.raises(ValueError, match=r"dV \(out=\) shares memory with an input"):
        mf.backward(dO, q, k, v, O, L, out=(poisoned(q), poisoned(q), tail), version=4)
