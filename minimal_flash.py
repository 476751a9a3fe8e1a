"""Minimal FlashAttention: the Python face of kernels/*.cu.

    flash_attention(q, k, v, *, causal=False, softmax_scale=None)   the kernels, on GPU or CPU, with autograd
    flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, ...)  the official flash-attn package's entry
    flash_attn_qkvpacked_func(qkv, ...)                              points, (B, N, H, d) layout
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, ...)          the official decoding entry point: a KV
                                                                     cache, contiguous or paged (chapter 5)
    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...) the official entry point for sequences of
                                                                     different lengths packed without padding
    register_with_transformers(name="minimal_fa")                    transformers models (generate too) on the kernels
    manual_attention(q, k, v, *, causal=False, softmax_scale=None)  plain attention, the reference
    forward(q, k, v, ...), backward(dO, q, k, v, O, L, ...)          one pass of the kernels, called directly
    mirror_forward(q, k, v, ...), mirror_backward(...)               Algorithms 1 and 4 tile by tile in PyTorch
    VERSIONS                                                         the kernel versions: one row each

Tensors are (B, H, N, d), the layout of torch.nn.functional.scaled_dot_product_attention. Options
come by keyword: SDPA and the official package put different things in the fourth position.
CUDA tensors run the CUDA build of kernels/; CPU tensors run the very same source compiled as C++
against kernels/cpu_cuda.h, an emulation of the CUDA runtime (see the README).

Each version is built on its own, once (a few seconds), and cached; an edited kernel is noticed on the
next call, recompiled and loaded. The versions that block sizes shape (1 and 2) take Br, Bc per call
(flash_attention(..., Br=64, Bc=16)) or for the process from MINIMAL_FLASH_BR and MINIMAL_FLASH_BC.
"""

import contextlib
import ctypes
import functools
import hashlib
import math
import numbers
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.utils.cpp_extension

KERNELS = Path(__file__).resolve().parent / "kernels"


# ---------------------------------------------------------------------------------------------
# The versions: everything Python, bench.py and the tests know of each, in one place


def _version1_block_sizes(Br, Bc):
    # One thread per row of Q_i: Br threads per group, at most 1024 on any CUDA GPU.
    if not 1 <= Br <= 1024:
        return f"Br = {Br}: version 1 gives each row of Q_i a thread, so 1 <= Br <= 1024"
    # A thread keeps its row of S_ij (Bc floats) in registers; far beyond 128 they spill.
    if not 1 <= Bc <= 256:
        return f"Bc = {Bc}: version 1 holds a row of Bc scores in each thread's registers, so 1 <= Bc <= 256"
    return ""


def _version2_block_sizes(Br, Bc):
    # A thread holds 4 rows by 8 keys of S_ij, and the Bc / 8 threads of a row are lanes of one warp; a
    # block is whole warps of tiles (kernels/version2.cuh: WARP_TILES), at most 1024 threads.
    if Br % 4 or not 4 <= Br <= 1024 or Bc not in (16, 32, 64):
        return (f"Br = {Br}, Bc = {Bc}: version 2 gives each thread 4 rows by 8 keys of S_ij, so it takes "
                "Br a multiple of 4 (4 to 1024) and Bc = 16, 32 or 64")
    tile = Br // 4 * (Bc // 8)
    if math.lcm(tile, 32) > 1024:
        return (f"Br = {Br}, Bc = {Bc}: a tile of version 2 takes Br / 4 x Bc / 8 = {tile} threads, and a block "
                f"whole warps of tiles, here {math.lcm(tile, 32)} threads, more than 1024: take a smaller Br, "
                "or one whose tile is a whole number of warps or a power of 2")
    return ""


@dataclass(frozen=True)
class Version:
    """One version of the kernels. Adding one: its kernel files, its kernels/versionN.cuh (launchers,
    shared memory, scratch), and a row in VERSIONS below."""
    number: int
    name: str            # what it teaches
    chapter: int         # of the README and the notebooks
    kernels: tuple       # the forward and the backward kernel file, in kernels/
    home: str            # kernels/versionN.cuh: what bindings.cu includes to build this version
    dtypes: tuple        # of q, k, v (and O, dO, dQ, dK, dV); L is float32 always
    head_dims: Optional[tuple] = None  # None: any d whose tiles fit in shared memory
    block_sizes: Optional[Callable] = None  # the rule for (Br, Bc): an error message or ""; None: not used
    deterministic: bool = False  # the backward gives the same bits run to run (no atomics)
    deterministic_mode: bool = False  # deterministic=True makes it so, at a cost (version 4's ordered dQ)
    grouped_heads: bool = False  # takes k, v with fewer heads than q, each shared by a group of q's
    strided: bool = False  # reads q, k, v, dO where they lie, with their strides (_reads_as_is): no copy
    positive_scale: bool = False  # takes softmax_scale > 0 only
    capability: Optional[tuple] = None  # the one GPU compute capability it runs on (None: any)
    cuda_flags: tuple = ()  # nvcc flags of its CUDA build (None of them: torch's own for the GPU)
    mods: bool = False  # takes chapter 6's mods (score_mod, mask_mod, the official options, dropout)

    def kernel_file(self, pass_):
        return self.kernels[PASSES.index(pass_)]

    def with_cuda_flags(self, *flags):
        """This version built with more nvcc flags (e.g. tools/hopper_steps.py's -DHOPPER_STEP=n): a build
        of its own, in a folder of its own (build_directory names the flags)."""
        return replace(self, cuda_flags=self.cuda_flags + flags)

    def flagged_kernels(self, *flags):
        """Its CUDA kernels built with more nvcc flags (with_cuda_flags), for the tools that call such a
        build beside the one every other call loads (load_kernels keeps that one)."""
        plain = VERSIONS[self.number]
        VERSIONS[self.number] = self.with_cuda_flags(*flags)
        try:
            sources = _build_sources(_sources.current(), "cuda", self.number)
            return Kernels(_build("cuda", self.number, None, None, sources, None), sources, self.number)
        finally:
            VERSIONS[self.number] = plain


VERSIONS = {v.number: v for v in (
    Version(1, "Algorithms 1 and 4 (FlashAttention)", 1, ("flash.cu", "flash_backward.cu"), "version1.cuh",
            (torch.float32,), block_sizes=_version1_block_sizes, deterministic=True),
    Version(2, "FlashAttention-2 loop order", 2, ("flash2.cu", "flash2_backward.cu"), "version2.cuh",
            (torch.float32,), block_sizes=_version2_block_sizes),
    Version(3, "FlashAttention-2 on tensor cores", 3, ("flash2_mma.cu", "flash2_mma_backward.cu"), "version3.cuh",
            (torch.bfloat16, torch.float16), head_dims=(32, 64, 96, 128, 192, 256), positive_scale=True,
            grouped_heads=True, mods=True),
    # Hopper's wgmma and setmaxnreg exist for the sm_90a target only, whose code runs on 9.0 GPUs only.
    Version(4, "FlashAttention-3 on Hopper", 4, ("flash3_hopper.cu", "flash3_hopper_backward.cu"), "version4.cuh",
            (torch.bfloat16, torch.float16), head_dims=(64, 128), positive_scale=True, capability=(9, 0),
            deterministic_mode=True, grouped_heads=True, strided=True,
            cuda_flags=("-gencode=arch=compute_90a,code=sm_90a",), mods=True),
)}
DECODE_HEAD_DIMS = (64, 128, 256)  # flash_attn_with_kvcache's kernels (kernels/flash_decode.cu)
PASSES = ("forward", "backward")  # the order of kernels/bindings.cu's Pass
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the order of kernels/bindings.cu's DType


def decode_takes_head_dim(d):
    """flash_attn_with_kvcache's head dims: any multiple of 8 up to 256, as the official package's; one
    between DECODE_HEAD_DIMS runs in the next kernel up, its extra columns zeros in shared memory (the
    cache read as it lies, 16 bytes at a time: a row of d values is whole 16-byte pieces)."""
    return 0 < d <= max(DECODE_HEAD_DIMS) and d % 8 == 0


def version_unavailable(version, device):
    """Why this version cannot run on `device` (a torch.device or its name), or None if it can. The
    CPU emulation runs every version."""
    device = torch.device(device)
    needs = VERSIONS[version].capability
    if device.type != "cuda" or needs is None:
        return None
    has = torch.cuda.get_device_capability(device)
    if has == needs:
        return None
    return (f"version {version} needs a GPU of compute capability {needs[0]}.{needs[1]} (Hopper, sm_90a); "
            f"{device} is {torch.cuda.get_device_name(device)} ({has[0]}.{has[1]})")


def default_version(dtype, device="cpu", d=None):
    """The version flash_attention runs for inputs of this dtype on this device (and head dim d) when
    none is asked for: the fastest that takes them. In float32 that is version 2, faster than plain
    attention at every length measured (README, "The chapters"); version 1 is chapter 1's kernel to
    read, and the notebooks that read it name it. In bfloat16 and float16, version 4 on a Hopper GPU,
    which it needs, up to its largest head dim (128), and version 3 elsewhere (on the CPU too: its
    emulation runs fewer threads per block, so faster) and above."""
    if dtype not in VERSIONS[3].dtypes:
        return 2
    hopper = version_unavailable(4, device) is None and torch.device(device).type == "cuda"
    return 4 if hopper and (d is None or d <= max(VERSIONS[4].head_dims)) else 3


# ---------------------------------------------------------------------------------------------
# Attention


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, is_causal=None, scale=None, attn_mask=None,
                    dropout_p=0.0, Br=None, Bc=None, version=None, deterministic=False, score_mod=None,
                    mask_mod=None, mod_tensors=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    return_lse=False):
    """softmax(q k^T * softmax_scale [+ causal mask]) v, computed by the FlashAttention kernels,
    differentiable. softmax_scale defaults to 1/sqrt(d). is_causal and scale are the same options
    under torch.nn.functional.scaled_dot_product_attention's names; its attn_mask and dropout_p are
    refused unless left at their defaults. version: one of VERSIONS (default: version 2 for float32
    inputs; for bfloat16 and float16 ones, version 4 on a Hopper GPU up to d = 128, version 3
    elsewhere and above). Br, Bc: the block sizes of the versions they shape (default
    MINIMAL_FLASH_BR / _BC, else 32). deterministic: the backward's dQ the same bits
    run to run (version 1 always; version 4 at a cost; the others refuse it). Head dims: any d in
    versions 1 and 2 (as shared memory allows); in versions 3 and 4, those they are compiled for, a d
    in between padded with zero columns up to the next (a copy), none above the largest (256;
    version 4: 128).
    Your own attention (versions 3 and 4): score_mod, a C++ expression of the scaled score and b, h, q_idx,
    kv_idx, such as "score + bias(h, q_idx - kv_idx)"; mask_mod, a C++ condition of b, h, q_idx, kv_idx
    that keeps a key, such as "q_idx - kv_idx < 256"; mod_tensors {name: tensor}, what they read
    (name[i], name(i, j): one index per dim; an index outside the tensor reads 0, as the kernels also ask
    the mods at keys and queries past N, whose scores are then masked); window_size, softcap, alibi_slopes
    as the official package has them (a window of 2**30 keys or more: no limit, -1, as the official
    package takes one past the keys). Each set of mods is compiled once (seconds), the options' values
    and the tensors read at run time.
    dropout_p: dropout on the attention weights (versions 3 and 4), its mask drawn from a seed that torch's
    generator gives (reproducible under torch.manual_seed) and drawn again by the backward; under
    torch.compile too, the seed drawn when the compiled call runs.
    return_lse: return (out, lse), lse (B, H, N) float32 each row's log-sum-exp of its scaled (and modded)
    scores before dropout, -inf for a row that sees no key; without gradient, as the official package's
    softmax_lse (a loss through it would need D - dlse in the backward kernels; lse.requires_grad is False)."""
    causal = _either("causal", causal, False, "is_causal", is_causal)
    softmax_scale = _either("softmax_scale", softmax_scale, None, "scale", scale)
    _check_sdpa_only(attn_mask)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse = {_short(return_lse)}: it must be True or False")
    dropout_p = _check_dropout(dropout_p)
    version = _mods_version(version, _wants_mods(score_mod, mask_mod, mod_tensors, window_size, softcap,
                                                 alibi_slopes, dropout_p), q)
    # Outside the Function: a copy of q, k, v (_check_inputs: a layout the version cannot read) passes
    # gradients back. The block sizes are fixed now: the backward must use the forward's.
    q, k, v, causal, scale, Br, Bc, version = _check_call(q, k, v, causal, softmax_scale, Br, Bc, version)
    deterministic = _check_deterministic(deterministic, version)
    mods = _check_mods(q, score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, dropout_p)
    _check_document_ids(mask_mod, mod_tensors, q)
    if torch.compiler.is_compiling():  # torch.compile: one operator it can trace through, no graph break
        if mods is not None:  # the mods travel as the build's Mods, field by field, tensors and numbers
            O, L, _ = torch.ops.minimal_flash.attention_mods(q, k, v, causal, scale, version, *_mod_op_arguments(mods))
        else:
            O, L = torch.ops.minimal_flash.attention(q, k, v, causal, scale, Br, Bc, version, deterministic)
    elif not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        O, L = _attention(q, k, v, causal, scale, Br, Bc, version, mods=mods)  # no autograd bookkeeping
    else:
        if q.numel() > 0:  # fail now, not after the forward has run, if the backward will not fit
            _check_shared_memory(load_kernels(q.device.type, version, Br, Bc, _spec(mods)), q, "backward", version)
        return FlashAttention.apply(q, k, v, causal, scale, Br, Bc, version, deterministic, mods, return_lse)
    return (O, L.detach()) if return_lse else O


def _check_deterministic(deterministic, version):
    """deterministic as a bool, for a version that can give it: version 1's backward has no atomics;
    version 4 orders its additions into dQ when asked; versions 2 and 3 add in whatever order blocks
    finish."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic = {_short(deterministic)}: it must be True or False")
    if deterministic and not (VERSIONS[version].deterministic or VERSIONS[version].deterministic_mode):
        takes = [str(n) for n, x in VERSIONS.items() if x.deterministic or x.deterministic_mode]
        raise ValueError(f"deterministic=True: version {version}'s backward adds into dQ with atomics, whose "
                         f"order varies from run to run; version {' or '.join(takes)} can be deterministic")
    return deterministic and VERSIONS[version].deterministic_mode  # what the kernels are told


def _check_attn_probs(return_attn_probs, dropout_p):
    """flash_attn_func's and flash_attn_varlen_func's return_attn_probs: a bool, and not with dropout."""
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs = {_short(return_attn_probs)}: it must be True or False")
    if return_attn_probs and dropout_p > 0:
        raise ValueError(f"return_attn_probs=True with dropout_p = {dropout_p}: the official package then returns "
                         "the attention weights with their dropout pattern (S_dmask), which these kernels do not "
                         "make; use return_attn_probs=False, or dropout_p=0.0 for the lse")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, Br=None, Bc=None,
                    version=None, score_mod=None, mask_mod=None, mod_tensors=None):
    """The flash-attn package's flash_attn_func, with its positional order, on our kernels: q, k, v are
    (B, N, H, d), batch, sequence, heads, head dim, and so is the result, contiguous as the official one is
    (out.view(B, N, -1) works): version 4 writes it so (_output_for), the others' (B, H, N, d) output is
    copied once into that layout, the copy that reshaping its transposed view would make.
    k, v may have another N than q (seqlen_k != seqlen_q: cross-attention, a chunk of queries against a
    longer context), in half precision: each entry of the batch then runs as one sequence of
    flash_attn_varlen_func, causal aligned at the bottom right and a window_size side of at least
    seqlen_k no limit, as in the official package (under torch.compile one operator, no graph break,
    unless a mask_mod is on). dropout_p, window_size, softcap and alibi_slopes as
    the official package has them (versions 3 and 4, with score_mod, mask_mod and mod_tensors: see
    flash_attention); its options that these kernels do not have are refused unless
    left at their defaults; deterministic=True needs a version whose backward can be deterministic
    (version 1, or 4). return_attn_probs: return (out, softmax_lse, None), softmax_lse (B, H, Nq) float32
    without gradient (flash_attention's return_lse), as the official package does without dropout; with
    dropout it returns the dropout pattern too, which these kernels do not make: refused. Br, Bc, version:
    as for flash_attention."""
    _check_attn_probs(return_attn_probs, _check_dropout(dropout_p))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t, "(B, N, H, d)")
    if q.shape[1] != k.shape[1] and k.shape == v.shape and (q.shape[0], q.shape[3]) == (k.shape[0], k.shape[3]):
        return _unequal_lengths(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                deterministic, return_attn_probs, Br, Bc, version, score_mod, mask_mod, mod_tensors)
    wanted = None if q.shape == k.shape == v.shape and not deterministic else _check_version(_mods_version(
        version, _wants_mods(score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, dropout_p), q), q)
    if not q.shape == k.shape == v.shape:  # the error in the caller's layout, not the transposed one
        _check_shapes(q, k, v, wanted, "(B, N, H, d)")
    if deterministic:  # checked before the transposes, with the official argument's name
        _check_deterministic(deterministic, wanted)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d) views: gradients reach the caller
    out = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, Br=Br, Bc=Bc, version=version,
                          deterministic=deterministic, dropout_p=dropout_p, score_mod=score_mod, mask_mod=mask_mod,
                          mod_tensors=mod_tensors, window_size=window_size, softcap=softcap,
                          alibi_slopes=alibi_slopes, return_lse=return_attn_probs)
    if return_attn_probs:  # (contiguous() copies nothing where the kernels wrote that layout)
        return out[0].transpose(1, 2).contiguous(), out[1], None
    return out.transpose(1, 2).contiguous()


def _unequal_lengths(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                     return_attn_probs, Br, Bc, version, score_mod, mask_mod, mod_tensors):
    """flash_attn_func with seqlen_q != seqlen_k (cross-attention; a chunk of new queries against a longer
    context): each of the B entries is one sequence of flash_attn_varlen_func, on its kernels (version 3's),
    causal aligned at the bottom right as the official package has it (query i sees key j iff
    j <= i + seqlen_k - seqlen_q; a query that sees no key gets 0). The (B, N, H, d) tensors are viewed as
    packed (B N, H, d) ones, without a copy where they are contiguous."""
    (B, Nq, H, d), (Nk, Hk), dims = q.shape, k.shape[1:3], VERSIONS[3].head_dims
    problem = (f"q is {q.dtype}: they take {_dtype_names(VERSIONS[3].dtypes)}" if q.dtype not in VERSIONS[3].dtypes
               else f"version = {version!r}: leave it out, or 3" if version not in (None, 3) else
               f"Br = {Br!r}, Bc = {Bc!r}: they have their own" if (Br, Bc) != (None, None) else
               f"head dim d = {d}: they take d up to {max(dims)}" if not 0 < d <= max(dims) else
               f"k and v have {Hk} heads, q {H}: a number that divides q's (grouped-query attention)"
               if Hk == 0 or H % Hk else
               "deterministic=True: their backward adds into dQ with atomics, in an order that varies from run to "
               "run; leave it False" if deterministic is True else None)
    if problem:
        raise ValueError(f"q has {Nq} rows per sequence and k, v {Nk}: flash_attn_func runs different lengths on "
                         f"flash_attn_varlen_func's kernels, version 3's; {problem}")
    if B == 0:  # no sequence, which flash_attn_varlen_func needs: empty results, in autograd's graph all the same,
        dropout_p, _ = _check_varlen_flags(dropout_p, return_attn_probs, deterministic, causal)  # after the options
        _check_scale(softmax_scale, q, 3)  # are checked as it checks them
        _check_mods(q, score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, dropout_p,
                    batch_heads=(0, H), no_limit=Nk)
        out = q * 0 + (k.sum() + v.sum()) * 0
        return (out, q.new_empty(0, H, Nq, dtype=torch.float32), None) if return_attn_probs else out
    offsets = torch.arange(B + 1) * torch.tensor([[Nq], [Nk]])  # on the host: nothing to copy back and check
    cu_q, cu_k = (torch.arange(B + 1, dtype=torch.int32, device=q.device) * n for n in (Nq, Nk))  # (no copy either)
    k, v = (t.reshape(B * Nk, *t.shape[2:]) for t in (k, v))
    out = _varlen_func(q.reshape(B * Nq, H, d), k, v, cu_q, cu_k, Nq, Nk, dropout_p, softmax_scale, causal, window_size,
                       softcap, alibi_slopes, deterministic, return_attn_probs, None, score_mod, mask_mod, mod_tensors,
                       offsets)
    if not return_attn_probs:
        return out.view(B, Nq, H, d)
    out, lse, _ = out  # lse (H, B Nq) -> (B, H, Nq), as flash_attn_func returns it
    return out.view(B, Nq, H, d), lse.view(H, B, Nq).transpose(0, 1).contiguous(), None


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **options):
    """The flash-attn package's flash_attn_qkvpacked_func: qkv is (B, N, 3, H, d); returns (B, N, H, d)."""
    _check_packed("qkv", qkv, 3, "(B, N, 3, H, d)")
    return flash_attn_func(*qkv.unbind(dim=2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, **options)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **options):
    """The flash-attn package's flash_attn_kvpacked_func: q (B, N, H, d), kv (B, N_k, 2, nheads_k, d), N_k
    another length than q's in half precision (as flash_attn_func)."""
    _check_packed("kv", kv, 2, "(B, N_k, 2, nheads_k, d)")
    return flash_attn_func(q, *kv.unbind(dim=2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, **options)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, **options):
    """The flash-attn package's flash_attn_varlen_qkvpacked_func: qkv (total, 3, nheads, d), the
    sequences' q, k and v packed, one cu_seqlens and max_seqlen for all three."""
    _check_packed("qkv", qkv, 3, "(total, 3, nheads, d)")
    return flash_attn_varlen_func(*qkv.unbind(dim=1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **options)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, **options):
    """The flash-attn package's flash_attn_varlen_kvpacked_func: q (total_q, nheads, d), kv (total_k, 2,
    nheads_k, d)."""
    _check_packed("kv", kv, 2, "(total_k, 2, nheads_k, d)")
    return flash_attn_varlen_func(q, *kv.unbind(dim=1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **options)


def _check_packed(name, t, count, shape):
    """A packed tensor: `count` (2 or 3) on its dim -3, as the official package's shapes have it."""
    _check_is_tensor(name, t)
    dims = shape.count(",") + 1
    if t.dim() != dims or t.shape[-3] != count:
        raise ValueError(f"{name} must be {dims}-D {shape}, got shape {tuple(t.shape)}")


def register_with_transformers(name="minimal_fa"):
    """Register the kernels with Hugging Face transformers (imported here: it is no dependency of this
    module) under `name`; then from_pretrained(..., attn_implementation=name) or from_config runs a
    causal model's attention on them: the prompt through flash_attention, each generated token through
    flash_attn_with_kvcache on the model's KV cache, a sliding window's layers (Mistral's, Gemma 2's) with
    window_size, and Gemma 2's softcap with softcap. Registers a mask function too, so that the model
    builds no dense mask; it refuses (ValueError) what the kernels cannot do: padding, packed sequences, a
    cache longer than the tokens seen (a static cache), other masks. Returns `name`."""
    if "flash" in name or "/" in name or ":" in name:  # transformers loads the flash-attn package or a Hub kernel
        raise ValueError(f"name = {name!r}: transformers reads a name with 'flash' in it as the flash-attn "
                         "package's, and one with '/' or ':' as a Hub kernel's, and loads that; pick another")
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(name, _transformers_attention)
    AttentionMaskInterface.register(name, _transformers_mask)
    return name


def _transformers_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, local_size=None, **options):
    """transformers' mask function for our name: None (no mask: the kernels' causal=True, queries aligned
    with the end of the keys; for a sliding window's layers, local_size, the attention function has the
    window too), or a ValueError for any mask that is not one of those. Called once per forward and kind
    of layer."""
    from transformers.masking_utils import causal_mask_function
    if mask_function is not causal_mask_function and not (local_size and _is_sliding_window(mask_function,
                                                                                             local_size)):
        raise ValueError("minimal_flash: this model asks for a mask other than the causal one or a causal sliding "
                         "window (chunks, packed sequences, bidirectional attention); the kernels have only those")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("minimal_flash: the attention mask masks padding tokens (prompts of different lengths "
                         "in one batch); the kernels take no padding yet: give prompts of one length")
    if bool(q_offset - kv_offset != kv_length - q_length):
        raise ValueError(f"minimal_flash: {kv_length} keys for the queries at positions {q_offset} to "
                         f"{q_offset + q_length - 1}: the kernels take a cache that ends at the last query "
                         "(transformers' dynamic cache), not a static one with empty slots")
    return None


def _is_sliding_window(mask_function, window):
    """Does transformers' mask function keep key j for query i exactly when i - window < j <= i? Asked at
    the window's edges (queries window - 1 .. window + 1 and 3 window + 5, against every key up to past
    them), not over every (query, key) of the call."""
    i = torch.tensor([window - 1, window, window + 1, 3 * window + 5])[:, None]
    j = torch.arange(4 * window + 6)[None, :]
    try:  # (a mask function that takes no tensors of indices is no sliding window of transformers')
        kept = torch.as_tensor(mask_function(torch.tensor(0), torch.tensor(0), i, j))
        return torch.equal(kept.expand(i.shape[0], j.shape[1]), (j <= i) & (j > i - window))
    except Exception:
        return False


def _transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **options):
    """transformers' attention function for our name: query (B, H, Nq, d), key and value (B, Hk, Nk, d),
    the cache included; returns (output (B, Nq, H, d), None: no attention weights)."""
    if attention_mask is not None:
        raise ValueError(f"minimal_flash: the model passed an attention mask ({_short(attention_mask)}); the "
                         "kernels take only the plain causal one, no padding (register_with_transformers' mask "
                         "function gives None for it)")
    if dropout:
        raise ValueError(f"minimal_flash: attention dropout {dropout} (the model trains with "
                         "config.attention_dropout); the kernels have no dropout")
    if not options.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError("minimal_flash: this attention is not causal; the kernels run causal models only here")
    if options.get("s_aux") is not None:
        raise ValueError("minimal_flash: the model asks for s_aux (attention sinks); the kernels do not have them")
    # transformers' sliding window keeps key j for query i when i - sliding_window < j: the official left
    window = (-1, -1) if options.get("sliding_window") is None else (options["sliding_window"] - 1, 0)
    mods = dict(window_size=window, softcap=options.get("softcap") or 0.0)
    version = VERSIONS[default_version(query.dtype, query.device, query.shape[-1])]  # it must take grouped heads
    if not version.grouped_heads:
        takes = next(x for x in VERSIONS.values() if x.grouped_heads)
        raise TypeError(f"minimal_flash: a {query.dtype} model; with transformers the kernels run "
                        f"{_dtype_names(takes.dtypes)} models (dtype= in from_pretrained or from_config)")
    if not decode_takes_head_dim(query.shape[-1]):  # (the prompt's kernels take any d up to 256: padded up)
        raise ValueError(f"minimal_flash: a model of head dim {query.shape[-1]}; the decode kernels take a "
                         f"multiple of 8 up to {max(DECODE_HEAD_DIMS)}")
    if query.shape[2] == key.shape[2]:  # the prompt (the cache held nothing before it)
        out = flash_attention(query, key, value, causal=True, softmax_scale=scaling, **mods).transpose(1, 2)
    else:  # new tokens after the cached ones: the official package's decode function, whose causal=True
        # aligns the queries with the end of the keys (bottom-right). The cache, (B, Hk, Nk, d), is read
        # in place through its transposed view (copied only if it lies otherwise than the kernel reads)
        key, value = (t.transpose(1, 2) for t in (key, value))
        if _cache_problem(key) or _cache_problem(value) or _cache_strides(key) != _cache_strides(value):
            key, value = key.contiguous(), value.contiguous()
        out = flash_attn_with_kvcache(query.transpose(1, 2), key, value, softmax_scale=scaling, causal=True, **mods)
    return out, None


def manual_attention(q, k, v, *, causal=False, softmax_scale=None):
    """Plain attention: builds the whole N x N score matrix S. The reference for every check."""
    N = q.shape[-2]
    S = (q @ k.transpose(-2, -1)) * _scale(q, softmax_scale)
    if causal:
        S = S.masked_fill(_above_diagonal(N, N, 0, 0, q.device), float("-inf"))
    return torch.softmax(S, dim=-1) @ v


def relative_error(x, ref):
    """||x - ref|| / ||ref||, in float64, on x's device: the error measure of the notebooks and bench.py."""
    x, ref = x.detach().double(), ref.detach().double().to(x.device)
    return ((x - ref).norm() / ref.norm()).item()


def forward(q, k, v, *, causal=False, softmax_scale=None, Br=None, Bc=None, out=None, version=None, **mods):
    """One forward pass of a version's kernels (default: default_version of q's dtype and device). Returns (O, L):
    the attention output and the row log-sum-exp L = m + log(l), float32, that the backward pass
    needs. `out=(O, L)` writes into given tensors (the tests fill them with NaN first, so an element
    the kernel fails to write shows). **mods: score_mod, mask_mod, mod_tensors, window_size, softcap,
    alibi_slopes, as for flash_attention."""
    q, k, v, causal, scale, Br, Bc, version, mods = _check_call_mods(q, k, v, causal, softmax_scale, Br, Bc,
                                                                     version, mods)
    if out is not None:
        out = _check_outputs(("O", "L"), out, (q, q[..., 0].float()), (q, k, v))
    return _attention(q, k, v, causal, scale, Br, Bc, version, out, mods)


def backward(dO, q, k, v, O, L, *, causal=False, softmax_scale=None, Br=None, Bc=None, out=None, version=None,
             deterministic=False, **mods):
    """One backward pass of a version's kernels: the gradients (dQ, dK, dV) of a loss whose gradient
    with respect to the output O = forward(q, k, v)[0] is dO. O and L are what forward() returned for
    these q, k, v, options and block sizes (versions 1 and 2 give the same O and L). `out=(dQ, dK, dV)`
    writes into given tensors. deterministic, **mods: as for flash_attention (the forward's mods)."""
    q, k, v, causal, scale, Br, Bc, version, mods = _check_call_mods(q, k, v, causal, softmax_scale, Br, Bc,
                                                                     version, mods)
    deterministic = _check_deterministic(deterministic, version)
    dO, O = (_check_like(name, t, q) for name, t in (("dO", dO), ("O", O)))
    L = _check_like("L", L, q[..., 0].float())
    dO, O, L = _laid_out(dO, version), _laid_out(O, version), L.contiguous()  # dO, O as q, k, v; L as written
    if out is not None:
        out = _check_outputs(("dQ", "dK", "dV"), out, (q, k, v), (q, k, v, O, dO, L))
    return _attention_grads(dO, q, k, v, O, L, causal, scale, Br, Bc, version, deterministic, out, mods)


def _attention(q, k, v, causal, scale, Br, Bc, version, out=None, mods=None, like_inputs=True):
    """forward() on inputs already checked: what every call pays for, and no more. like_inputs: O laid out as
    q is where the version can write it so (_output_for); else contiguous, as the custom operators'
    register_fake promises."""
    O, L = out if out is not None else (_output_for(q, version if like_inputs else None),
                                        q.new_empty(q.shape[:-1], dtype=torch.float32))
    if q.numel() > 0:  # B, H or N is 0: nothing to compute, and a grid of 0 blocks is an error
        kernels = load_kernels(q.device.type, version, Br, Bc, _spec(mods))
        O_run = O  # what the kernel writes
        if not _compiled_for(q.shape[-1], version):  # d padded up, O's extra columns cut off after
            q, k, v = (_padded(t, version) for t in (q, k, v))
            O_run = q.new_empty(q.shape)
        _check_shared_memory(kernels, q, "forward", version)
        q, k, v = _aligned(q), _aligned(k), _aligned(v)
        _raise_if(kernels.call("forward", causal, scale, q, k, v, O_run, L, mods=mods))
        if O_run is not O:
            O.copy_(O_run[..., :O.shape[-1]])
    return O, L


def _output_for(q, version):
    """O for q (or dQ, dK, dV for q, k, v): a contiguous (B, H, N, d) tensor; but where q is the
    transposed view of a (B, N, H, d) layout (a model's heads split out of its rows: q's stride over
    heads below its stride over rows), and the version writes with the outputs' strides (version 4),
    laid out as q is, so that the model's transpose back to (B, N, H d) is a view, not a copy, as with
    the official package and SDPA. (Strides given, not empty_like, which would copy any view's strides,
    gaps and all; one operation, the cheapest way to allocate on the host.) version None: contiguous."""
    B, H, N, d = q.shape
    if version is not None and VERSIONS[version].strided and q.stride(1) < q.stride(2):
        return q.new_empty_strided(q.shape, (N * H * d, d, H * d, 1))  # (B, N, H, d) memory
    return q.new_empty_strided(q.shape, (H * N * d, N * d, d, 1))


def _padded(t, version):
    """q, k, v, O or dO with the head dim (last) that the version's kernels run at: d itself, or where
    they are compiled for a few (versions 3 and 4), the smallest of those that is at least d, the
    columns between filled with zeros (a copy). Zero columns of q and k change no score q k^T; of v,
    they give O zero columns, cut off after; of dO, with O's, they change no D = rowsum(dO * O), and
    the gradients' extra columns are cut off too. The official package rounds d up likewise."""
    d = t.shape[-1]
    if _compiled_for(d, version):
        return t
    run = min(x for x in VERSIONS[version].head_dims if x >= d)  # _check_inputs took d <= max(dims)
    return torch.nn.functional.pad(t, (0, run - d))


def _compiled_for(d, version):
    """Do the version's kernels run head dim d as it is (not padded up)?"""
    dims = VERSIONS[version].head_dims
    return dims is None or d in dims


def _attention_grads(dO, q, k, v, O, L, causal, scale, Br, Bc, version, deterministic=False, out=None, mods=None,
                     like_inputs=True):
    """backward() on inputs already checked. Grouped-query heads (k, v with H / group heads): as the
    official package does, the kernels get k, v repeated to q's heads, and each head's dK, dV is the
    sum (in fp32) of its group's. like_inputs: dQ, dK, dV laid out as q, k, v are where the version can
    write them so (_output_for: a model's (B, N, H, d) layout, whose gradients then flow back through
    its transposes without a copy, as the official package's do); else contiguous, as the custom
    operators' register_fake promises."""
    laid = version if like_inputs else None
    dQ, dK, dV = out if out is not None else (_output_for(q, laid), _output_for(k, laid), _output_for(v, laid))
    if q.numel() == 0:  # no query (0 heads of q, or N = 0): no key is seen, and k, v get no gradient
        dK.zero_(), dV.zero_()
        return dQ, dK, dV
    kernels = load_kernels(q.device.type, version, Br, Bc, _spec(mods))
    runs = dQ, dK, dV  # what the kernels write
    if not _compiled_for(q.shape[-1], version):  # d padded up, the gradients' extra columns cut off after
        q, k, v, O, dO = (_padded(t, version) for t in (q, k, v, O, dO))
        runs = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _check_shared_memory(kernels, q, "backward", version)
    q, O, dO = _aligned(q), _aligned(O), _aligned(dO)

    def run(k_all, v_all, dK_all, dV_all):
        k_all, v_all = _aligned(k_all), _aligned(v_all)
        _raise_if(kernels.call("backward", causal, scale, q, k_all, v_all, O, L, dO, runs[0], dK_all, dV_all,
                               deterministic=deterministic, mods=mods))

    _grouped_grads(q, k, v, run, runs[1], runs[2])
    if runs[0] is not dQ:
        for x, x_run in zip((dQ, dK, dV), runs):
            x.copy_(x_run[..., :x.shape[-1]])
    return dQ, dK, dV


def _grouped_grads(q, k, v, run, dK=None, dV=None):
    """dK, dV (into dK, dV if given) by a backward pass run(k_all, v_all, dK_all, dV_all) that takes k,
    v with q's heads (dim 1). Grouped-query heads (k, v with H / group heads): as the official package
    does, the kernels get k, v repeated to q's heads, and each head's dK, dV is the sum (in fp32) of its
    group's."""
    dK, dV = (torch.empty_like(k) if dK is None else dK), (torch.empty_like(v) if dV is None else dV)
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k_all, v_all = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    dK_all, dV_all = (torch.empty_like(k_all), torch.empty_like(v_all)) if group > 1 else (dK, dV)
    run(k_all, v_all, dK_all, dV_all)
    if group > 1:
        for to, part in ((dK, dK_all), (dV, dV_all)):
            to.copy_(part.unflatten(1, (k.shape[1], group)).sum(2, dtype=torch.float32))
    return dK, dV


_AS_IS = contextlib.nullcontext()  # a context that changes nothing (and can be entered again and again)


class FlashAttention(torch.autograd.Function):
    """flash_attention with gradients. The forward saves q, k, v, O and the row log-sum-exp L: O(N d)
    memory. The N x N matrix P is never stored; the backward kernel recomputes it tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, Br, Bc, version, deterministic, mods, return_lse):  # all checked
        O, L = _attention(q, k, v, causal, scale, Br, Bc, version, mods=mods)
        ctx.save_for_backward(q, k, v, O, L)
        ctx.options = causal, scale, Br, Bc, version, deterministic, None, mods  # None: out
        if not return_lse:  # L only saved: an output more is host time in every forward and backward
            return O
        ctx.mark_non_differentiable(L)
        ctx.set_materialize_grads(False)  # dL None, not a tensor of zeros made (a kernel launched) per backward
        return O, L

    @staticmethod
    def backward(ctx, dO, *dL):  # dL: with return_lse, None (L has no gradient)
        version = ctx.options[4]
        # dO: the gradient of the model's output, often a view of its (B, N, H, d) layout. Grad mode is
        # off in a backward unless create_graph=True; then nothing here may be recorded.
        with torch.no_grad() if torch.is_grad_enabled() else _AS_IS:
            grads = _attention_grads(_laid_out(dO, version), *ctx.saved_tensors, *ctx.options)
        return *_without_derivative(grads), None, None, None, None, None, None, None, None


def _without_derivative(grads):
    """The kernels' gradients are no graph of torch operations: under create_graph (a double backward, a
    gradient penalty) they must not pass for constants, whose derivative would silently be 0. They come
    back marked as torch's once_differentiable marks them: differentiating them raises."""
    if not torch.is_grad_enabled():
        return grads
    error = torch._C._functions.DelayedError(
        b"minimal_flash: attention's gradients (dQ, dK, dV) come from the kernels and have no derivative of their "
        b"own: a double backward (create_graph=True, a gradient penalty) needs plain attention there", len(grads))
    return error(*(g.detach().requires_grad_() for g in grads))


# The same two passes as PyTorch custom operators, minimal_flash::attention and
# minimal_flash::attention_grads, for torch.compile: it cannot look inside a ctypes call, but it can
# treat a registered operator as one opaque node, given the shapes of what it returns (register_fake)
# and its derivative (register_autograd). Eager calls keep FlashAttention above: an operator's
# dispatch costs more host time per call (measured: tens of microseconds on a CPU), as long as a
# small attention kernel runs.
@torch.library.custom_op("minimal_flash::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  Br: Optional[int], Bc: Optional[int], version: int,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention(q, k, v, causal, scale, Br, Bc, version, like_inputs=False)  # deterministic: for the backward


@_attention_op.register_fake
def _(q, k, v, causal, scale, Br, Bc, version, deterministic):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)  # contiguous, as _attention's


@torch.library.custom_op("minimal_flash::attention_grads", mutates_args=())
def _attention_grads_op(dO: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, O: torch.Tensor,
                        L: torch.Tensor, causal: bool, scale: float, Br: Optional[int], Bc: Optional[int],
                        version: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_grads(_laid_out(dO, version), q, k, v, O, L, causal, scale, Br, Bc, version, deterministic,
                            like_inputs=False)


@_attention_grads_op.register_fake
def _(dO, q, k, v, O, L, causal, scale, Br, Bc, version, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_op_save(ctx, inputs, output):
    q, k, v, *ctx.options = inputs
    ctx.save_for_backward(q, k, v, *output)


def _attention_op_grad(ctx, dO, dL):  # L is a by-product: nothing flows back through it
    return *_attention_grads_op(dO, *ctx.saved_tensors, *ctx.options), None, None, None, None, None, None


_attention_op.register_autograd(_attention_op_grad, setup_context=_attention_op_save)


# Chapter 6's mods as two more operators, for torch.compile: a version's passes (3 or 4) with a ModCall
# given field by field, in the types an operator takes: the user's strings, the mod tensors' names and
# dtypes (comma-joined) and dims, which official options are on, the tensors, the options' values and
# dropout_p. Dropout's seed is drawn by the forward operator when it runs, from torch's generator as an
# eager call draws it (so a compiled call under torch.manual_seed draws the eager call's seed), not when
# the graph is traced, which would bake one mask into every call; the forward returns it, a CPU int64
# tensor of one element, and the backward draws the same mask from it. (nondeterministic_seeded: the
# compiler must neither merge two calls nor move one across another draw.)
def _mod_op_arguments(mods):
    spec = mods.spec
    return (spec.score_mod, spec.mask_mod, ",".join(t[0] for t in spec.tensors), ",".join(t[1] for t in spec.tensors),
            [t[2] for t in spec.tensors], [int(spec.window), int(spec.softcap), spec.alibi], list(mods.tensors),
            list(mods.ints), list(mods.floats), mods.dropout_p)


def _mod_call(score_mod, mask_mod, names, dtypes, dims, flags, tensors, ints, floats, dropout_p, seed):
    names, dtypes = (text.split(",") if text else [] for text in (names, dtypes))  # comma-joined: no list[str]
    spec = Mods(score_mod, mask_mod, tuple(zip(names, dtypes, dims)), bool(flags[0]), bool(flags[1]), flags[2],
                dropout_p > 0)
    return ModCall(spec, tuple(tensors), tuple(ints), tuple(floats), dropout_p, seed)


def _drawn_mod_call(q, *fields):
    """A forward operator's ModCall of its mod fields (_mod_op_arguments'), dropout's seed drawn now, when
    the operator runs; and that seed as the CPU int64 tensor it returns for its backward."""
    seed = _dropout_seed(q) if fields[-1] > 0 else 0
    return _mod_call(*fields, seed), torch.tensor([seed], dtype=torch.int64)


def _mod_fields_gradients(fields):
    """No gradient for an operator's mod fields: None each, a list of None for the tensors' list (a list
    of tensors gets a list of gradients), an empty list for an empty one."""
    return tuple([None] * len(x) if i == 6 else [] if x == [] else None for i, x in enumerate(fields))


@torch.library.custom_op("minimal_flash::attention_mods", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _attention_mods_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, version: int,
                       score_mod: Optional[str], mask_mod: Optional[str], names: str, dtypes: str,
                       dims: list[int], flags: list[int], tensors: list[torch.Tensor], ints: list[int],
                       floats: list[float], dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods, seed = _drawn_mod_call(q, score_mod, mask_mod, names, dtypes, dims, flags, tensors, ints, floats, dropout_p)
    return *_attention(q, k, v, causal, scale, None, None, version, mods=mods, like_inputs=False), seed


@_attention_mods_op.register_fake
def _(q, k, v, causal, scale, *mods):
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty(1, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("minimal_flash::attention_mods_grads", mutates_args=())
def _attention_mods_grads_op(dO: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, O: torch.Tensor,
                             L: torch.Tensor, causal: bool, scale: float, version: int, score_mod: Optional[str],
                             mask_mod: Optional[str], names: str, dtypes: str, dims: list[int],
                             flags: list[int], tensors: list[torch.Tensor], ints: list[int],
                             floats: list[float], dropout_p: float,
                             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = _mod_call(score_mod, mask_mod, names, dtypes, dims, flags, tensors, ints, floats, dropout_p, int(seed))
    return _attention_grads(_laid_out(dO, version), q, k, v, O, L, causal, scale, None, None, version, mods=mods,
                            like_inputs=False)


@_attention_mods_grads_op.register_fake
def _(dO, q, k, v, O, L, *options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_mods_op_save(ctx, inputs, output):
    q, k, v, *ctx.options = inputs
    ctx.save_for_backward(q, k, v, *output)  # O, L and dropout's seed


def _attention_mods_op_grad(ctx, dO, dL, dseed):  # no gradient reaches the mod tensors (constants: _check_mods)
    q, k, v, O, L, seed = ctx.saved_tensors
    grads = _attention_mods_grads_op(dO, q, k, v, O, L, *ctx.options, seed)
    return *grads, None, None, None, *_mod_fields_gradients(ctx.options[3:])  # (causal, scale, version; the mods)


_attention_mods_op.register_autograd(_attention_mods_op_grad, setup_context=_attention_mods_op_save)


def _scale(q, softmax_scale):
    """The factor on Q K^T: 1/sqrt(d) unless given."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def _above_diagonal(rows, cols, row0, col0, device):
    """Mask of the (query, key) pairs a causal model hides: key index > query index."""
    r = torch.arange(row0, row0 + rows, device=device)[:, None]
    c = torch.arange(col0, col0 + cols, device=device)[None, :]
    return c > r


# ---------------------------------------------------------------------------------------------
# Decoding with a KV cache (chapter 5): kernels/flash_decode.cu, in version 3's build


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            score_mod=None, mask_mod=None, mod_tensors=None):
    """The flash-attn package's flash_attn_with_kvcache, in its positional order, on chapter 5's decode
    kernels: the attention of q's seqlen_q new positions of each sequence to the keys in a KV cache,
    after k, v (if given) are appended to it in place. No autograd: this is inference.

    q: (batch, seqlen_q, nheads, d), bfloat16 or float16, d a multiple of 8 up to 256. k_cache, v_cache: (batch,
    seqlen_cache, nheads_k, d), nheads_k dividing nheads (grouped-query heads); or, with block_table
    (batch, max_blocks_per_seq) int32, paged: (num_blocks, page_block_size, nheads_k, d), row j of
    sequence b in page block_table[b, j // page_block_size]. Both written in place, read where they lie: each
    row's d values contiguous, other strides any multiple of 16 bytes (a transposed (batch, nheads_k,
    seqlen_cache, d) cache too), the same for both; with k, v given, two tensors that share no memory (views
    side by side in one buffer share none), no two places of a cache at one address (an expanded cache can
    be read, not written), and each new key a row of its own (block tables may share pages to read them).
    The new rows are written outside autograd.
    cache_seqlens: the keys each sequence has cached, an int or an int32 tensor (batch,); None: the
    whole cache. cache_leftpad: int32 (batch,), the row where each sequence's keys start (a left-padded
    batch; the rows before it are not read; None: 0). cache_batch_idx: int32 (batch,), the contiguous
    cache's entry that each sequence uses (the cache then holds any number of them: slots of a server's
    batch; as a one-page block_table), distinct where k, v are appended; not with block_table. k, v:
    (batch, seqlen_new, nheads_k, d), written at rows cache_seqlens[b] .. + seqlen_new; sequence b then
    has L_b = cache_seqlens[b] + seqlen_new - cache_leftpad[b] keys, counted from its first (key j in
    row cache_leftpad[b] + j). causal: the queries are each sequence's last seqlen_q positions (the
    official package's alignment): query i sees key j iff j <= i + L_b - seqlen_q. A query that sees no
    key gets 0, and lse -inf, the log of an empty sum.
    window_size, softcap, alibi_slopes ((nheads,) or (batch, nheads) float32) as the official package has
    them, measured from the same alignment (query i of sequence b against key j: i + L_b - seqlen_q - j),
    a window side of at least the cache's rows per sequence (seqlen_cache; paged, max_blocks_per_seq x
    page_block_size) no limit, as the official package has it (with more queries than the side, it
    would otherwise hide keys from the first rows),
    chapter 6's mods compiled into the decode kernels (a window's splits cut only the keys it sees);
    score_mod, mask_mod, mod_tensors: your own, as flash_attention takes them, b the sequence, h q's
    head, q_idx = i and kv_idx = j (shift: L_b - seqlen_q).
    num_splits: how many ranges each sequence's keys are cut into, run by blocks of their own and then
    combined (0: chosen as the official package chooses; 1: none). Returns out (batch, seqlen_q, nheads,
    d) in q's dtype and, with return_softmax_lse, lse (batch, nheads, seqlen_q), float32.

    cache_seqlens out of the cache's range (or below cache_leftpad), or block_table entries that are not
    its pages, raise a ValueError, checked on the host (a copy to it, so a sync; none for an int
    cache_seqlens alone) except while a CUDA graph is being captured. The kernel checks them too: it
    never reads outside the cache, and a sequence out of range gets NaN in all its output rows, a loud
    answer, never a plausible one (cache_batch_idx's entries
    likewise). rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2), q's dtype, rotary_dim a multiple of 16
    up to d, with k, v only: the rotary embedding of q and the new k as the official package applies it
    (rotary_interleaved: dimensions 0 & 1, 2 & 3, ...; else 0 & rotary_dim / 2, ..., GPT-NeoX's), the new
    keys at positions cache_seqlens[b] + i, the queries there too if causal or with a window, else all at
    cache_seqlens[b] (rows of the cache, the pad included, as the official package counts them); here
    by torch operations in float32 before the kernel, not in it."""
    causal = _check_causal(causal)
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse = {_short(return_softmax_lse)}: it must be True or False")
    q, block_table = _check_kvcache(q, k_cache, v_cache, k, v, block_table, cache_batch_idx)
    scale = _check_scale(softmax_scale, q, 3)
    (B, Sq, H, d), (pages, page, Hk, _) = q.shape, k_cache.shape
    capacity = block_table.shape[1] * page if block_table is not None else page  # keys a sequence may have
    # (a window side as long as the cache or longer is no side, -1: the official package's seqlen_k here)
    mods = _check_mods(q, score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, batch_heads=(B, H),
                       no_limit=capacity)
    seqlen_new = 0 if k is None else k.shape[1]
    seqlens, known = _check_cache_seqlens(cache_seqlens, q, capacity, seqlen_new)
    leftpad = None if cache_leftpad is None else _check_per_sequence("cache_leftpad", cache_leftpad, q)
    # a window alone: the rows read keys from left before the first's position to right after the last's
    # (causal: none after), the band the kernel's splits cut
    left, right = mods.ints[:2] if mods is not None and mods.spec.window_only else (-1, -1)
    right = 0 if causal else right
    keys = capacity if left < 0 or right < 0 else min(capacity, left + Sq + right)
    splits = _decode_splits(num_splits, q, Hk, keys)
    rotary = _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k)
    # The queries' rotary positions step if causal or local, as the official package has it (a side as long
    # as the cache is none already, and two such sides no window: _check_mods)
    q_steps = causal or (mods is not None and mods.spec.window)
    if not _capturing(q.device):  # a graph being captured cannot wait for a copy to the host
        if cache_batch_idx is not None:
            _check_cache_batch_idx(block_table, pages, k is not None)
        _check_cache_ranges(known, block_table, capacity, seqlen_new, pages, leftpad,
                            appends_apart=cache_batch_idx is None)  # (cache_batch_idx: its own check)
        if rotary:
            _check_rotary_positions(known, max(seqlen_new, Sq if q_steps else 1), len(rotary_cos))
    if rotary:  # the new keys at cache_seqlens[b] + i; the queries there too if causal or local, else all at [b]
        positions = seqlens.long()[:, None] + torch.arange(max(seqlen_new, Sq), device=q.device)
        k = _rotated(k, rotary_cos, rotary_sin, positions[:, :seqlen_new], rotary_interleaved)
        q = _rotated(q, rotary_cos, rotary_sin, positions[:, :Sq] if q_steps else positions[:, :1].expand(B, Sq),
                     rotary_interleaved)
    if k is not None:
        _append_to_cache(k_cache, v_cache, k, v, seqlens, block_table, capacity)
    out, lse = torch.empty_like(q), q.new_empty((B, H, Sq), dtype=torch.float32)
    if out.numel() > 0:
        kernels = load_kernels(q.device.type, 3, mods=_spec(mods))
        table = block_table if page else None  # pages of no row: no key to look up (nor a division by 0)
        _raise_if(kernels.decode(_aligned(q), k_cache, v_cache, seqlens, table, leftpad, seqlen_new, capacity,
                                 splits, scale, causal, out, lse, mods))
    return (out, lse) if return_softmax_lse else out


def _check_rotary(cos, sin, interleaved, q, k):
    """flash_attn_with_kvcache's rotary_cos, rotary_sin, rotary_interleaved: True if given (and right)."""
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved = {_short(interleaved)}: it must be True or False")
    if cos is None and sin is None:
        return False
    d = q.shape[-1]
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        _check_is_tensor(name, t)
        problem = (f"its dtype is {t.dtype}, q's {q.dtype}" if t.dtype != q.dtype else
                   f"it is on {t.device}, q on {q.device}" if t.device != q.device else
                   f"its shape is {tuple(t.shape)}, not (seqlen_ro, rotary_dim / 2) with rotary_dim a multiple of 16 "
                   f"up to d = {d}" if t.dim() != 2 or t.shape[1] % 8 or not 0 < 2 * t.shape[1] <= d else
                   f"its shape is {tuple(t.shape)}, rotary_cos' {tuple(cos.shape)}" if t.shape != cos.shape else None)
        if problem:
            raise ValueError(f"{name}: {problem}")
    if k is None:
        raise ValueError("rotary_cos, rotary_sin without k, v: the rotary embedding is applied to q and the new keys, "
                         "as in the official package (give k and v, or embed q yourself)")
    return True


def _check_rotary_positions(seqlens, count, seqlen_ro):
    """The rotary tables reach every position embedded: cache_seqlens[b] + count - 1 < seqlen_ro."""
    last = max(seqlens.tolist(), default=0) + count - 1
    if last >= seqlen_ro:
        raise ValueError(f"rotary_cos, rotary_sin have {seqlen_ro} positions, and position {last} is embedded "
                         "(cache_seqlens plus the new keys, or the queries): give tables as long as the cache")


def _rotated(x, cos, sin, positions, interleaved):
    """x (B, S, heads, d) with its first rotary_dim = 2 cos.shape[1] columns turned by the angles of
    `positions` (B, S), in float32, rounded to x's dtype: pairs (2i, 2i + 1) interleaved, else (i,
    i + rotary_dim / 2). A position past the tables (possible only when nothing was checked on the host,
    a CUDA graph being captured) gives NaN, read from nowhere outside them."""
    r = 2 * cos.shape[1]
    c, s = (t[positions.clamp(0, len(t) - 1)].float()[:, :, None, :] for t in (cos, sin))  # (B, S, 1, r / 2)
    x1, x2 = (x[..., 0:r:2], x[..., 1:r:2]) if interleaved else (x[..., :r // 2], x[..., r // 2:r])
    x1, x2 = x1.float(), x2.float()
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    turned = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    turned = torch.where((positions < len(cos))[:, :, None, None], turned, math.nan)
    return torch.cat((turned.to(x.dtype), x[..., r:]), dim=-1)


def _check_kvcache(q, k_cache, v_cache, k, v, block_table, cache_batch_idx=None):
    """q, the caches, k and v and block_table as flash_attn_with_kvcache takes them: (q contiguous,
    block_table contiguous or None; cache_batch_idx as a block table of one page per sequence, the page
    a whole entry of the cache)."""
    names = ("q", "k_cache", "v_cache") + (("k", "v") if k is not None or v is not None else ())
    if (k is None) != (v is None):
        raise ValueError(f"{'k' if v is None else 'v'} without {'v' if v is None else 'k'}: the new keys k and values "
                         "v come together, or neither")
    tensors = dict(zip(names, (q, k_cache, v_cache, k, v)))
    for name, t in tensors.items():
        _check_is_tensor(name, t)
        if t.dim() != 4:
            dims = "batch, seqlen_q, nheads, d" if name == "q" else "batch, seqlen, nheads_k, d"
            raise ValueError(f"{name} must be 4-D ({dims}), got shape {tuple(t.shape)}")
    if q.dtype not in VERSIONS[3].dtypes:
        raise TypeError(f"q has dtype {q.dtype}; the decode kernels (version 3's build) take "
                        f"{_dtype_names(VERSIONS[3].dtypes)} only")
    for name, t in tensors.items():
        if t.dtype != q.dtype:  # the kernel would read its bits as q's dtype
            raise TypeError(f"{name} has dtype {t.dtype}, q {q.dtype}: they must have one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: they must be on one device")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; the kernels run on CUDA or on the CPU")
    (B, Sq, H, d), Hk = q.shape, k_cache.shape[2]
    if Sq < 1:
        raise ValueError(f"q has seqlen_q = {Sq}: flash_attn_with_kvcache takes at least one query position")
    if not decode_takes_head_dim(d):
        raise ValueError(f"head dim d = {d}: the decode kernels (version 3's build) take a multiple of 8 up to "
                         f"{max(DECODE_HEAD_DIMS)} (they read the cache's rows 16 bytes at a time)")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != d or Hk == 0 or H % Hk:
        raise ValueError(f"k_cache and v_cache must have one shape (..., nheads_k, d = {d}), nheads_k dividing q's "
                         f"nheads = {H} (grouped-query heads); got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    for name in ("k_cache", "v_cache"):  # (a copy would take the new keys, and the caller's cache would not)
        problem = _cache_problem(tensors[name])
        if problem:
            raise ValueError(f"k_cache and v_cache must have each row's d values contiguous, start at a 16-byte-"
                             f"aligned address, and have rows, heads and pages (or entries) a multiple of 16 bytes "
                             f"apart, pages a whole number of rows apart: the kernel reads them 16 bytes at a time, "
                             f"in place; {name}: {problem} (strides {tensors[name].stride()})")
    if _cache_strides(k_cache) != _cache_strides(v_cache):
        raise ValueError(f"k_cache and v_cache must lie alike: strides {k_cache.stride()} and {v_cache.stride()}")
    if k is not None:  # written in place: each place its own memory (a read shares memory as it likes)
        shared = _shares_memory(k_cache)  # (v_cache lies alike: the same answer)
        if shared:
            raise ValueError(f"k_cache is written in place (k, v given), and {shared} share memory (strides "
                             f"{k_cache.stride()}, an expanded tensor?): a new key written to one would be read "
                             f"as the other's; give a cache of its own (.clone())")
        shared = _shares_memory(k_cache, v_cache)
        if shared and k_cache.data_ptr() == v_cache.data_ptr():
            raise ValueError("k_cache and v_cache are one tensor: the new values would overwrite the new keys")
        if shared:
            raise ValueError(f"k_cache and v_cache share memory ({shared}): the new keys would overwrite cached "
                             f"values, or the new values cached keys")
    if k is not None and (k.shape != v.shape or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:]):
        raise ValueError(f"k and v must have shape (batch = {B}, seqlen_new, nheads_k = {Hk}, d = {d}), got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cache_batch_idx is not None:
        if block_table is not None:
            _check_is_tensor("cache_batch_idx", cache_batch_idx)
            raise ValueError("cache_batch_idx: block_table is given too: a paged cache has no entries to pick (one "
                             "or the other)")
        return q.contiguous(), _check_per_sequence("cache_batch_idx", cache_batch_idx, q).view(B, 1)
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]}, q {B}: without block_table the cache holds one "
                             "sequence per batch entry")
        return q.contiguous(), None
    _check_is_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table has dtype {block_table.dtype}; it must be torch.int32 (page numbers)")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must have shape (batch = {B}, max_blocks_per_seq), got "
                         f"{tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device}, q on {q.device}: they must be on one device")
    return q.contiguous(), block_table.contiguous()


def _shares_memory(a, b=None):
    """Where two elements of tensor a lie at one address, or (b given, laid out as a) an element of a and one
    of b: words for them, or "" if none do. Strides that nest (each larger than all the smaller ones reach:
    a contiguous tensor, a transposed one, a slice of one) keep a's own elements apart. Otherwise index
    differences e_j, |e_j| < size_j, are searched for with sum(e_j stride_j) = b's offset from a (from a
    itself: 0, the e_j not all 0), the dims of larger strides first, each e_j among the few that the dims
    below can still make up for; a search too long to finish counts as shared."""
    if a.numel() == 0 or (b is not None and (b.numel() == 0 or
                                             a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr())):
        return ""
    apart = None if b is None else (b.data_ptr() - a.data_ptr()) // a.element_size()
    return _layout_shares(tuple(a.shape), a.stride(), apart)


@functools.lru_cache(maxsize=256)
def _layout_shares(shape, strides, apart):
    """_shares_memory's answer for a's layout and b's offset from it in elements (None: no b), asked once
    for each (a decode loop asks with the same caches at every step)."""
    dims = sorted((stride, size) for stride, size in zip(strides, shape) if size > 1)
    reach = [0]  # reach[j]: the farthest the dims of the j smallest strides go
    for stride, size in dims:
        reach.append(reach[-1] + (size - 1) * stride)
    if apart is None:
        if all(stride > below for (stride, _), below in zip(dims, reach)):
            return ""
        if any(stride == 0 for stride, _ in dims):
            return "elements of it"  # an expanded dim: its indices all at one address
    steps = [100_000]

    def found(j, rest, moved):  # dims j-1 .. 0 (by stride) can make up `rest`, some e_j != 0 if `moved`
        if j == 0:
            return rest == 0 and (moved or apart is not None)
        steps[0] -= 1
        stride, size = dims[j - 1]
        if stride == 0:  # (b: a dim that moves nothing changes nothing)
            return found(j - 1, rest, moved)
        low, high = -((reach[j - 1] - rest) // stride), (rest + reach[j - 1]) // stride  # ceil, floor
        return steps[0] < 0 or any(found(j - 1, rest - e * stride, moved or e != 0)
                                   for e in range(max(low, 1 - size), min(high, size - 1) + 1))
    if apart is None:
        return "elements of it" if found(len(dims), 0, False) else ""
    return "elements of one and of the other" if found(len(dims), apart, False) else ""


def _cache_problem(cache):
    """Why the decode kernel cannot read this cache where it lies (None: it can)."""
    if cache.stride(3) != 1:
        return "its last dim is not contiguous"
    if cache.data_ptr() % 16:
        return "it does not start at a 16-byte-aligned address"
    if _cache_strides(cache, rows=False) is None:
        return "its rows, heads or pages are not so"
    if _cache_strides(cache) is None:
        return "its rows, counted as the kernel counts them (page_step per page), reach 2^31: more than 32 bits count"
    return None


def _cache_strides(cache, rows=True):
    """(row_stride, head_stride, page_step) of a cache (pages or entries, rows, heads, d) as the decode kernel
    addresses it: row j of page n, head h at (n page_step + j) row_stride + h head_stride, in values; None
    if it cannot (strides not multiples of 8 values, 16 bytes; pages not a whole number of rows apart; if
    `rows`, more rows than 32 bits count). The stride of a dim of size 1 is never used: any value does."""
    pages, page, heads, _ = cache.shape
    apart, row, head = cache.stride()[:3]
    row = row if page > 1 else apart if pages > 1 and apart else 8  # (a row stride that divides the pages')
    head = head if heads > 1 else 0
    step = apart // row if pages > 1 and row else page
    if row % 8 or head % 8 or (pages > 1 and (row == 0 or apart % row)):
        return None
    if rows and (pages - 1) * step + page >= 2 ** 31:
        return None
    return row, head, step


def _check_cache_batch_idx(table, entries, appends):
    """cache_batch_idx (as its one-page block table): each an entry of the cache and, where k, v are
    appended, no two the same (both would write one entry's rows)."""
    picked = table.flatten().tolist()
    for b, entry in enumerate(picked):
        if not 0 <= entry < entries:
            raise ValueError(f"cache_batch_idx[{b}] = {entry}: the cache has entries 0 .. {entries - 1}")
    if appends and len(set(picked)) < len(picked):
        b = next(b for b, entry in enumerate(picked) if picked.index(entry) != b)
        raise ValueError(f"cache_batch_idx[{b}] = {picked[b]} is also sequence {picked.index(picked[b])}'s: both "
                         "would append their k, v to that entry")


def _check_cache_seqlens(cache_seqlens, q, capacity, seqlen_new):
    """cache_seqlens as an int32 tensor (batch,) on q's device (the whole cache if None), and the same on
    the host if it came as an int or None (no copy back needed), else cache_seqlens again."""
    B = q.shape[0]
    if capacity >= 2 ** 31:
        raise ValueError(f"the cache holds {capacity} rows per sequence: the kernel counts them in 32 bits")
    if cache_seqlens is None or (isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool)):
        value = capacity if cache_seqlens is None else int(cache_seqlens)
        if value < 0 or value + seqlen_new > capacity:  # checked here, graph capture or not: nothing to copy
            raise ValueError(f"cache_seqlens = {value}: with seqlen_new = {seqlen_new} new keys, a sequence would have "
                             f"{value + seqlen_new}, outside the cache's 0 .. {capacity}")
        known = torch.full((B,), value, dtype=torch.int32)  # (a fill on the device: a copy to it would wait)
        return known if q.device.type == "cpu" else torch.full_like(known, value, device=q.device), known
    _check_is_tensor("cache_seqlens", cache_seqlens)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens has dtype {cache_seqlens.dtype}; it must be an int or a torch.int32 tensor")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape (batch = {B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}: they must be on one device")
    return cache_seqlens.contiguous(), cache_seqlens


def _check_per_sequence(name, t, q):
    """flash_attn_with_kvcache's cache_batch_idx or cache_leftpad: an int32 tensor (batch,) on q's device,
    returned contiguous."""
    _check_is_tensor(name, t)
    B = q.shape[0]
    problem = (f"its dtype is {t.dtype}, not torch.int32" if t.dtype != torch.int32 else
               f"its shape is {tuple(t.shape)}, not (batch = {B},)" if t.shape != (B,) else
               f"it is on {t.device}, q on {q.device}" if t.device != q.device else None)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return t.contiguous()


def _capturing(device):
    """Is this device's current stream being captured into a CUDA graph? Then nothing may wait for a copy
    to the host."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_cache_ranges(seqlens, block_table, capacity, seqlen_new, pages, leftpad=None, appends_apart=False):
    """Each sequence's keys (rows cache_leftpad[b] .. cache_seqlens[b] + seqlen_new - 1) within the cache,
    and, paged, each page they lie in a page of the cache; a ValueError that names the first sequence
    that is not. appends_apart: paged, the new keys each to a row of their own too (_check_appends_apart),
    on the same copies to the host. Tensors on a GPU come over one by one: the first copy waits for its
    queue, the others find it idle (one copy of all through torch.cat measured slower on an H100's host:
    a launch and an allocation more)."""
    lengths = seqlens.tolist()  # a few numbers: Python's min and max are quicker than torch's on them
    if lengths and (min(lengths) < 0 or max(lengths) + seqlen_new > capacity):
        b = next(b for b, n in enumerate(lengths) if n < 0 or n + seqlen_new > capacity)
        raise ValueError(f"cache_seqlens[{b}] = {lengths[b]}: with seqlen_new = {seqlen_new} new keys, sequence {b} "
                         f"would have {lengths[b] + seqlen_new}, outside the cache's 0 .. {capacity}")
    pads = [0] * len(lengths) if leftpad is None else leftpad.tolist()
    for b, (pad, n) in enumerate(zip(pads, lengths)):
        if not 0 <= pad <= n:
            raise ValueError(f"cache_leftpad[{b}] = {pad}: sequence {b}'s keys start there, so it must be in 0 .. "
                             f"cache_seqlens[{b}] = {n}")
    if block_table is None or block_table.numel() == 0 or capacity == 0:  # (no row: no page is used)
        return
    table, page = block_table.cpu(), capacity // block_table.shape[1]
    low, high = (int(x) for x in torch.aminmax(table))  # (as ints: a comparison of tensors costs ops too)
    if low < 0 or high >= pages:  # an entry that is no page of the cache: an error where it is used
        keys, column = torch.tensor(lengths) + seqlen_new, torch.arange(table.shape[1])[None, :]
        used = (column >= (torch.tensor(pads) // page)[:, None]) & (column < ((keys + page - 1) // page)[:, None])
        bad = torch.nonzero(used & ((table < 0) | (table >= pages)))
        if len(bad):
            b, j = bad[0].tolist()
            raise ValueError(f"block_table[{b}, {j}] = {table[b, j].item()}: sequence {b} uses that entry, and the "
                             f"cache has pages 0 .. {pages - 1}")
    if appends_apart and seqlen_new:
        _check_appends_apart(lengths, table, page, seqlen_new)


def _check_appends_apart(lengths, table, page, seqlen_new):
    """A paged cache's new keys each to a row of its own: sequences whose block tables share a page (a
    shared prompt's) may read it together, but two new keys written to one row would leave one of them
    lost (whichever lands last wins). A ValueError names the first two. On the host: cache_seqlens as a
    list, block_table's copy."""
    rows = torch.tensor(lengths)[:, None] + torch.arange(seqlen_new)  # (B, seqlen_new), in range: checked
    at = (table.long().gather(1, rows // page) * page + rows % page).flatten().tolist()
    if len(set(at)) == len(at):
        return
    first = {}
    for n, row in enumerate(at):
        if row in first:
            (b0, i0), (b1, i1) = divmod(first[row], seqlen_new), divmod(n, seqlen_new)
            raise ValueError(f"block_table: new key {i0} of sequence {b0} and new key {i1} of sequence {b1} would both "
                             f"be written to row {row % page} of page {row // page}: each new key needs a row of "
                             "its own (sequences may share a page only to read it)")
        first[row] = n


def _append_to_cache(k_cache, v_cache, k, v, seqlens, block_table, capacity):
    """k, v written into the caches at rows cache_seqlens[b] .. + seqlen_new of every sequence b at once,
    by advanced indexing (no loop over the batch), outside autograd, as the official kernel writes them
    (a k that requires grad leaves no graph on the caches; a cache made under inference_mode, or one that
    requires grad, takes the write). A sequence out of range (possible only when nothing was checked on
    the host, a CUDA graph being captured) writes nothing, and nowhere outside the cache: the kernel
    then gives it NaN."""
    (B, seqlen_new), page = k.shape[:2], k_cache.shape[1]
    if capacity == 0 or k_cache.numel() == 0 or k.numel() == 0:
        return
    with torch.inference_mode():
        rows = (seqlens[:, None].long() + torch.arange(seqlen_new, device=k.device)).clamp(0, capacity - 1)
        ok = (seqlens >= 0) & (seqlens.long() + seqlen_new <= capacity)  # (B,)
        if block_table is None:
            index = (torch.arange(B, device=k.device)[:, None].expand(B, seqlen_new), rows)
        else:
            pages = block_table.gather(1, rows // page).long()
            ok &= ((pages >= 0) & (pages < k_cache.shape[0])).all(dim=1)
            index = (pages.clamp(0, k_cache.shape[0] - 1), rows % page)
        # An index_put writes every entry, so an entry out of range repeats the first entry in range (the
        # same place and value: which of the two lands last does not matter); with none in range, entry 0
        # writes back what its place holds.
        ok = ok[:, None].expand(B, seqlen_new)
        first = ok.flatten().int().argmax()  # the first entry in range, else entry 0
        at_first = tuple(i.flatten()[first] for i in index)
        index = tuple(torch.where(ok, i, i_first) for i, i_first in zip(index, at_first))
        for cache, new in ((k_cache, k), (v_cache, v)):
            fill = torch.where(ok.flatten()[first], new.flatten(0, 1)[first], cache[at_first])  # (nheads_k, d)
            cache[index] = torch.where(ok[..., None, None], new, fill)


def _decode_splits(num_splits, q, Hk, keys):
    """The splits of each sequence's keys, at most `keys` of them read: num_splits as given (at most the
    tiles of 64 keys there can be), or for 0, num_splits_heuristic's: one full wave of blocks."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits = {_short(num_splits)}: it must be a whole number")
    num_splits = int(num_splits)
    if num_splits < 0 or num_splits > 128:
        raise ValueError(f"num_splits = {num_splits}: 0 (chosen for you), or 1 to 128 splits of the keys")
    B, Sq, H, d = q.shape
    # kernels/flash_decode.cu's tiles: 64 keys; rows_per_block rows, 16 of them leaving room for 2 blocks
    # on a multiprocessor up to d = 128 (at 256 its tiles' buffers take one alone)
    rows = 16 if Sq * (H // Hk) <= 16 else 64
    key_tiles, row_tiles = math.ceil(keys / 64), math.ceil(Sq * (H // Hk) / rows)
    if num_splits == 0:
        units = _parallel_units(q.device)
        num_splits = num_splits_heuristic(B * Hk * row_tiles, units * (2 if rows == 16 and d <= 128 else 1),
                                          key_tiles)
    return max(1, min(num_splits, key_tiles))


@functools.lru_cache
def _parallel_units(device):
    """What runs blocks side by side: a GPU's multiprocessors, the CPU's cores (asked once: each asking
    costs microseconds of every call)."""
    return (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else
            os.cpu_count()) or 1


def num_splits_heuristic(blocks, slots, key_tiles):
    """The splits of each sequence's keys for a grid of `blocks` blocks per split, on a GPU that runs
    `slots` blocks at once (multiprocessors times blocks each; on the CPU, cores), keys in `key_tiles`
    tiles: as many as fill the slots in one wave, at most one per tile and 128. Decoding reads the cache
    once; its speed is the bytes in flight, so every slot should be reading, and a second wave would
    start only as the first ends. (The official package takes the fewest splits whose wave is 85% as
    full as the fullest: on the H200 that left a tenth of the slots idle, 29 splits of a sequence's 8
    heads where 33 fit, and was 7% slower at batch 1: notebooks/results/README.md.) Then, as the
    official package does, no more splits than the tiles per split need (kernels/flash_decode.cu cuts
    a sequence into splits of ceil(tiles / splits) tiles): 512 tiles in 33 splits are 32 of 16 tiles
    and an empty one, which would still be a block and a split for combine to read."""
    splits = max(1, min(slots // max(blocks, 1), key_tiles, 128))
    per_split = -(-key_tiles // splits)
    return max(1, -(-key_tiles // per_split)) if per_split else 1


# ---------------------------------------------------------------------------------------------
# Sequences of different lengths packed without padding: version 3's kernels on cu_seqlens


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, score_mod=None,
                           mask_mod=None, mod_tensors=None):
    """The flash-attn package's flash_attn_varlen_func, in its positional order, on version 3's kernels
    (chapter 3, on any GPU, Hopper included, and on the CPU), differentiable: a batch of sequences of
    different lengths packed one after the other without padding (prefill, or training on packed text).

    q: (total_q, nheads, d), bfloat16 or float16, d up to 256 (padded up to 32, 64, 96, 128, 192 or
    256); k, v: (total_k, nheads_k, d), nheads_k dividing nheads (grouped-query heads: a head of k, v
    serves nheads / nheads_k query heads, and its gradient sums theirs). cu_seqlens_q, cu_seqlens_k:
    int32 (batch + 1,) on q's device, the sequences' offsets from 0: sequence b's queries are rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q, its keys and values those of cu_seqlens_k in k, v.
    Sequences of length 0 are allowed. max_seqlen_q, max_seqlen_k: ints, at least every sequence's
    length (the kernels' grid is sized by them; more only costs blocks that end at once). causal:
    aligned at the bottom right, as in the official package (2.1 and later): query i of a sequence of
    Lq queries and Lk keys sees key j iff j <= i + Lk - Lq.
    A query that sees no key gets 0 (and lse -inf, the log of an empty sum).
    block_table: int32 (batch, max_blocks_per_seq); k, v then paged, (num_blocks, page_block_size,
    nheads_k, d), as flash_attn_with_kvcache takes them: sequence b's key j (of cu_seqlens_k's lengths) in
    row j % page_block_size of page block_table[b, j // page_block_size]. They are gathered into packed k,
    v first (a copy, by torch's indexing, differentiable into the pages), then the same kernels run: right
    for a prefill over a paged cache; for decoding, flash_attn_with_kvcache reads the pages in place.

    window_size, softcap, alibi_slopes ((nheads,) or (batch, nheads) float32) as the official package
    has them, per sequence, the window and ALiBi's distance measured from each sequence's own bottom
    right (query i of Lq against key j: i + Lk - Lq - j), as causal is, and a window side of at least
    max_seqlen_k no limit, as flash-attn 2 has it (chapter 6's mods, compiled in; the window's tiles
    walked only, as for fixed-length batches). score_mod, mask_mod, mod_tensors: your
    own, as flash_attention takes them, b the sequence's number in the batch, h q's head, q_idx and kv_idx
    positions within the sequence (shift: its Lk - Lq); the tiles a mask_mod empties are skipped where one
    block mask serves every sequence (_packed_block_mask: the mask reads no shift, or every sequence has
    the same one, as in self-attention), else every tile is asked score by score. dropout_p as
    flash_attn_func takes it (chapter 6's Philox mask, drawn again in the backward; the seed from torch's
    generator): the pair (query i, key j) of sequence b's head h is drawn as for slice b nheads + h of a
    batch of sequences of one length, i and j positions within the sequence.

    Returns out (total_q, nheads, d) in q's dtype; with return_attn_probs, (out, softmax_lse, None), as
    the official package does without dropout: softmax_lse (nheads, total_q) float32, each row's
    log-sum-exp of its scaled (and modded) scores, without gradient (the official backward ignores it too).

    cu_seqlens are checked on the host, so each call copies 2 (batch + 1) ints to it and waits for the
    device (refused while a CUDA graph is being captured): from 0, never decreasing, ending at q's and
    k's rows, no sequence longer than its max_seqlen; with block_table, each sequence's pages are pages of
    k and v. Under torch.compile, without a mask_mod or block_table, the call is one operator and no
    graph break (fullgraph=True compiles), the check made by the operator when it runs (window_size,
    softcap, alibi_slopes, score_mod and dropout included; a mask_mod's block mask is made on the host, a
    graph break, and with dropout refused). deterministic=True is refused: version 3's backward adds into
    dQ with atomics, in whatever order its blocks finish."""
    return _varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                        causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table,
                        score_mod, mask_mod, mod_tensors)


def _varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                 window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, score_mod, mask_mod,
                 mod_tensors, offsets=None):
    """flash_attn_varlen_func; offsets: cu_seqlens_q and _k's values on the host ((2, batch + 1), int64) where
    the caller made them itself (flash_attn_func's B sequences of one length each): then nothing is copied
    from the device or checked there, and a CUDA graph may be captured."""
    dropout_p, causal = _check_varlen_flags(dropout_p, return_attn_probs, deterministic, causal)
    # Under torch.compile cu_seqlens' values are checked by the operator, when it runs (its body is not
    # traced), unless the pages or a mask_mod's block mask need them on the host here (offsets: None until then)
    compiling = torch.compiler.is_compiling()
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, offsets = _check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, offsets,
        defer=compiling and block_table is None)
    scale = _check_scale(softmax_scale, q, 3)
    mods = _check_mods(q, score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, dropout_p,
                       batch_heads=(len(cu_seqlens_q) - 1, q.shape[1]), no_limit=max_seqlen_k)
    blocks = mods is not None and mods.spec.mask and not mods.spec.window_only  # a mask_mod's block mask
    if compiling and blocks and dropout_p > 0:  # (the eager path below would need the seed drawn here)
        raise NotImplementedError("dropout_p with a mask_mod under torch.compile, on sequences of different lengths "
                                  "(flash_attn_varlen_func's kernels): not yet; call the attention outside the "
                                  "compiled region (torch.compiler.disable)")
    if blocks and offsets is None:  # the block mask is made from the offsets, on the host (a graph break)
        offsets = _host_offsets(q, cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k))
    mods = _packed_block_mask(mods, offsets, max_seqlen_q, max_seqlen_k)
    options = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, mods)
    d = q.shape[-1]  # a d between the compiled ones: zero columns up to the next (_padded), cut off after
    q, k, v = (_padded(t, 3) for t in (q, k, v))  # (outside the Function: autograd takes them off dQ, dK, dV)
    if compiling and mods is None:  # one operator for torch.compile to trace through
        out, L = torch.ops.minimal_flash.varlen_attention(q, k, v, *options[:-1], offsets is None)
    elif compiling and not blocks:  # mods that need no block mask: the window's tiles, score_mods, dropout
        out, L, _ = torch.ops.minimal_flash.varlen_attention_mods(q, k, v, *options[:-1], offsets is None,
                                                                  *_mod_op_arguments(mods))
    elif compiling:  # a mask_mod's block mask, made on the host: the kernels run outside the graph, not traced
        out, L = torch.compiler.disable(_varlen_eager)(q, k, v, *options)
    else:
        out, L = _varlen_eager(q, k, v, *options)
    out = out[..., :d].contiguous()  # (a copy only where d was padded: out.view(total_q, -1) works)
    return (out, L.t().contiguous(), None) if return_attn_probs else out


def _varlen_eager(q, k, v, *options):
    """The varlen forward, through autograd's Function where q, k or v needs a gradient."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttentionVarlen.apply(q, k, v, *options)
    return _varlen_attention(q, k, v, *options)


def _check_varlen_flags(dropout_p, return_attn_probs, deterministic, causal):
    """flash_attn_varlen_func's options that need no tensor: (dropout_p, causal) checked."""
    dropout_p = _check_dropout(dropout_p)
    _check_attn_probs(return_attn_probs, dropout_p)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic = {_short(deterministic)}: it must be True or False")
    if deterministic:
        raise ValueError("deterministic=True: flash_attn_varlen_func runs version 3's kernels, whose backward adds "
                         "into dQ with atomics, in an order that varies from run to run; leave it False")
    return dropout_p, _check_causal(causal)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=None, offsets=None,
                  defer=False):
    """flash_attn_varlen_func's tensors and lengths, each checked, then cu_seqlens against the rows on
    the host (unless offsets, their values there, come from a caller that made them, or defer: the
    caller checks them later, _host_offsets). Returns (q, k, v, cu_seqlens_q, cu_seqlens_k contiguous,
    max_seqlen_q, max_seqlen_k ints, the offsets on the host: _check_cu_seqlens', or None if deferred);
    with block_table, k and v paged, gathered into packed ones (_gather_pages)."""
    paged = block_table is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_is_tensor(name, t)
        if t.dim() != (4 if paged and name != "q" else 3):
            dims, why = (("total_q, nheads, d", "the sequences packed along dim 0") if name == "q" else
                         ("num_blocks, page_block_size, nheads_k, d", "paged, with block_table") if paged else
                         ("total_k, nheads_k, d", "the sequences packed along dim 0"))
            raise ValueError(f"{name} must be {dims.count(',') + 1}-D ({dims}): {why}, got shape {tuple(t.shape)}")
    if q.dtype not in VERSIONS[3].dtypes:
        raise TypeError(f"q has dtype {q.dtype}; flash_attn_varlen_func runs version 3's kernels, which take "
                        f"{_dtype_names(VERSIONS[3].dtypes)} only")
    (total_q, H, d), (Hk, _), head_dims = q.shape, k.shape[-2:], VERSIONS[3].head_dims
    total_k = None if paged else k.shape[0]  # paged: cu_seqlens_k[-1], read below
    problem = (f"head dim d = {d}" if d > max(head_dims) or d == 0 else
               "k and v differ in shape" if k.shape != v.shape else
               f"k and v have head dim {k.shape[-1]}, q {d}" if k.shape[-1] != d else
               f"nheads_k = {Hk} does not divide q's nheads = {H}" if Hk == 0 or H % Hk else None)
    if problem:
        raise ValueError(f"{problem}: flash_attn_varlen_func takes q (total_q, nheads, d), k and v (total_k, nheads_k, "
                         f"d), d up to {max(head_dims)} (version 3's kernels: {_one_of(head_dims)}, a d in between "
                         "padded up), nheads_k dividing nheads "
                         f"(grouped-query heads); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    lengths = []
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_is_tensor(name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} has dtype {cu.dtype}; it must be torch.int32 (the kernels read 32-bit offsets)")
        if cu.dim() != 1 or len(cu) < 2:
            raise ValueError(f"{name} must be 1-D (batch + 1,), batch >= 1: each sequence's first row, then the "
                             f"total; got shape {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {len(cu_seqlens_q)} entries and cu_seqlens_k {len(cu_seqlens_k)}: one "
                         "batch of sequences, so batch + 1 entries each")
    if paged:
        _check_is_tensor("block_table", block_table)
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or len(block_table) != len(cu_seqlens_k) - 1:
            raise ValueError(f"block_table ({block_table.dtype}, shape {tuple(block_table.shape)}): it must be int32, "
                             f"(batch = {len(cu_seqlens_k) - 1}, max_blocks_per_seq), sequence b's pages in row b")
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                    ("block_table", block_table)):
        if t is None:
            continue
        if name in ("k", "v") and t.dtype != q.dtype:  # the kernels would read its bits as q's dtype
            raise TypeError(f"{name} has dtype {t.dtype}, q {q.dtype}: they must have one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: they must be on one device")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; the kernels run on CUDA or on the CPU")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        try:  # an int, numpy's or a one-element integer tensor (every tensor has __index__: it may refuse)
            length = (None if isinstance(value, bool) else value if isinstance(value, (int, torch.SymInt)) else
                      value.__index__())  # (an int as is: torch.compile may trace it as a symbol, kept one)
        except (AttributeError, TypeError, RuntimeError):
            length = None
        if length is None:
            raise TypeError(f"{name} = {_short(value)}: it must be an int, the longest sequence's length")
        if not 0 <= length < 2 ** 31:
            raise ValueError(f"{name} = {value}: it must be 0 .. 2**31 - 1, the longest sequence's length")
        lengths.append(length)
    if offsets is None and not defer:
        offsets = _host_offsets(q, cu_seqlens_q, cu_seqlens_k, (total_q, total_k), lengths)
    if paged:
        k, v = _gather_pages(k, v, block_table, cu_seqlens_k, offsets[1])
    if max(total_q, k.shape[0]) * H >= 2 ** 31:  # k, v go to the backward with q's heads
        raise ValueError(f"{max(total_q, k.shape[0])} rows of {H} heads: the kernels count rows of q and k times "
                         "nheads in 32 bits, less than 2**31")
    return q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), \
        *lengths, offsets


def _packed_block_mask(mods, offsets, max_seqlen_q, max_seqlen_k):
    """Packed sequences' mods, with the extent (B, N, shift) of one block mask for all B sequences where
    one serves, so that the tiles a mask_mod empties are skipped, as for a fixed-length batch. A block
    mask is over positions within a sequence; sequence b's blocks ask its tiles of one N x N mask (N the
    longest sequence), whose tiles past b's own end are never asked for, and whose state of a tile over
    more rows and keys than b has is right for b's (EMPTY or FULL over all: so over some). What differs
    between sequences is shift, keys minus queries: the mask serves all of them where the mask reads no
    shift (nor a window with it: its band is measured from the diagonal), or where every sequence has
    the same (self-attention: 0). Else none: every tile PARTIAL, each score asked."""
    if mods is None or not mods.spec.mask or mods.spec.window_only:  # (a window alone: its tiles by arithmetic)
        return mods
    shifts = (offsets[1].diff() - offsets[0].diff()).unique().tolist()
    N = max(max_seqlen_q, max_seqlen_k)
    if N == 0 or (len(shifts) > 1 and (mods.spec.window or mods.spec.mask_reads("shift"))):
        return mods
    return replace(mods, packed=(len(offsets[0]) - 1, N, shifts[0] if len(shifts) == 1 else 0))


def _gather_pages(k, v, block_table, cu_seqlens_k, offsets):
    """flash_attn_varlen_func's paged keys and values, (num_blocks, page_block_size, nheads_k, d), key j of
    sequence b in row j % page_block_size of page block_table[b, j // page_block_size] (the official
    layout, flash_attn_with_kvcache's too), gathered into packed (total_k, nheads_k, d) in cu_seqlens_k's
    order by one advanced index each: a copy of the keys the sequences use (differentiable: gradients go
    back into the pages they came from), before the kernels, not in them. Fine for a prefill, whose
    attention's work dwarfs one more read and write of its keys; a decoding step, which only reads its
    keys once, should use flash_attn_with_kvcache, whose kernel reads the pages where they are. Each
    sequence's pages checked on the host first (offsets: cu_seqlens_k there, already checked)."""
    pages, page = k.shape[:2]
    lengths = offsets.diff().int()
    capacity = block_table.shape[1] * page
    if len(lengths) and lengths.max() > capacity:
        b = lengths.argmax().item()
        raise ValueError(f"sequence {b} has {lengths[b].item()} keys, more than its {block_table.shape[1]} pages of "
                         f"{page} rows in block_table hold ({capacity})")
    _check_cache_ranges(lengths, block_table, capacity, 0, pages)
    total = int(offsets[-1])
    b = torch.repeat_interleave(torch.arange(len(lengths), device=k.device), lengths.to(k.device).long(),
                                output_size=total)
    j = torch.arange(total, device=k.device) - cu_seqlens_k[b].long()
    page_of, row = block_table[b, j // page].long(), j % page
    return k[page_of, row], v[page_of, row]


def _host_offsets(q, cu_seqlens_q, cu_seqlens_k, totals, max_seqlens):
    """_check_cu_seqlens, where a copy to the host may wait for the device: not while a CUDA graph is
    being captured."""
    if _capturing(q.device):
        raise RuntimeError("flash_attn_varlen_func checks cu_seqlens on the host, which waits for the device; a "
                           "CUDA graph being captured cannot wait")
    return _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, totals, max_seqlens)


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, totals, max_seqlens):
    """Offsets from 0, never decreasing, ending at the rows of q (k; a total None: any), no sequence longer
    than its max_seqlen: else a ValueError that names the first entry or sequence that is not. One copy to
    the host for both; returns it ((2, batch + 1), int64)."""
    offsets = torch.stack((cu_seqlens_q, cu_seqlens_k)).cpu().long()
    for (x, rows), cu, total, longest in zip((("q", "queries"), ("k", "keys")), offsets, totals, max_seqlens):
        name = f"cu_seqlens_{x}"
        if cu[0] != 0:
            raise ValueError(f"{name}[0] = {cu[0].item()}: the offsets start at 0")
        seqlens = cu.diff()
        bad = torch.nonzero(seqlens < 0).flatten()
        if len(bad):
            b = bad[0].item()
            raise ValueError(f"{name} decreases, {name}[{b}] = {cu[b].item()} > {name}[{b + 1}] = "
                             f"{cu[b + 1].item()}: sequence {b} would have a negative length")
        if total is not None and cu[-1] != total:
            raise ValueError(f"{name}[-1] = {cu[-1].item()}, but {x} has {total} rows: the last offset is the sum of "
                             "the sequences' lengths")
        b = seqlens.argmax().item()
        if seqlens[b] > longest:
            raise ValueError(f"sequence {b} has {seqlens[b].item()} {rows}, more than max_seqlen_{x} = {longest}: "
                             "the kernels' grid is sized by max_seqlen, and would leave the rest uncomputed")
    return offsets


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, mods=None):
    """The forward on checked inputs: out (total_q, nheads, d) and L (total_q, nheads) float32, a float
    per row of q, the kernels' layout (softmax_lse is its transpose)."""
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
    if q.numel() == 0:
        return O, L
    if k.shape[0] == 0:  # no keys at all (and k may have no address): every query sees none
        return O.zero_(), L.fill_(-math.inf)
    q, k, v = (_aligned(t) for t in (q, k, v))
    _raise_if(_run_varlen("forward", q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                          scale, mods))
    return O, L


def _varlen_grads(dO, q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                  mods=None):
    """The backward on checked inputs: dQ, dK, dV (grouped heads: summed over each group, as in
    _attention_grads)."""
    if q.numel() == 0 or k.shape[0] == 0:  # no query, or no key: out is 0 whatever q, k, v are
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dQ = torch.empty_like(q)
    q, O, dO = (_aligned(t) for t in (q, O, dO))

    def run(k_all, v_all, dK_all, dV_all):
        k_all, v_all = _aligned(k_all), _aligned(v_all)
        _raise_if(_run_varlen("backward", q, k_all, v_all, O, L, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, scale, mods, dO, dQ, dK_all, dV_all))

    return (dQ, *_grouped_grads(q, k, v, run))


# flash_attn_varlen_func's two passes as operators too, for torch.compile (as minimal_flash::attention
# above): without mods or dropout, on inputs checked, cu_seqlens on the device. check: the forward checks
# cu_seqlens' values itself, on the host, when it runs (flash_attn_varlen_func: the graph cannot hold the
# copy and its wait; the operator's body is not traced); flash_attn_func of different lengths, whose
# offsets the host made, passes False. Both compile into one graph through them.
@torch.library.custom_op("minimal_flash::varlen_attention", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
               scale: float, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if check:
        _host_offsets(q, cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k))
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, check):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minimal_flash::varlen_attention_grads", mutates_args=())
def _varlen_grads_op(dO: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, O: torch.Tensor,
                     L: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _varlen_grads(dO.contiguous(), q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, scale)


@_varlen_grads_op.register_fake
def _(dO, q, k, v, O, L, *options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_op_save(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *ctx.options, _ = inputs  # (check: the forward's)
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k)


def _varlen_op_grad(ctx, dO, dL):  # L is a by-product: nothing flows back through it
    return *_varlen_grads_op(dO, *ctx.saved_tensors, *ctx.options), None, None, None, None, None, None, None


_varlen_op.register_autograd(_varlen_op_grad, setup_context=_varlen_op_save)


# The same with chapter 6's mods that need no block mask (a window alone, score_mods, dropout), given
# field by field as to minimal_flash::attention_mods, dropout's seed drawn when the forward runs.
@torch.library.custom_op("minimal_flash::varlen_attention_mods", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _varlen_mods_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                    check: bool, score_mod: Optional[str], mask_mod: Optional[str], names: str, dtypes: str,
                    dims: list[int], flags: list[int], tensors: list[torch.Tensor], ints: list[int],
                    floats: list[float], dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if check:
        _host_offsets(q, cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k))
    mods, seed = _drawn_mod_call(q, score_mod, mask_mod, names, dtypes, dims, flags, tensors, ints, floats, dropout_p)
    O, L = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, mods)
    return O, L, seed


@_varlen_mods_op.register_fake
def _(q, k, v, *options):
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty(1, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("minimal_flash::varlen_attention_mods_grads", mutates_args=())
def _varlen_mods_grads_op(dO: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, O: torch.Tensor,
                          L: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                          max_seqlen_k: int, causal: bool, scale: float, score_mod: Optional[str],
                          mask_mod: Optional[str], names: str, dtypes: str, dims: list[int], flags: list[int],
                          tensors: list[torch.Tensor], ints: list[int], floats: list[float], dropout_p: float,
                          seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = _mod_call(score_mod, mask_mod, names, dtypes, dims, flags, tensors, ints, floats, dropout_p, int(seed))
    return _varlen_grads(dO.contiguous(), q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, scale, mods)


@_varlen_mods_grads_op.register_fake
def _(dO, q, k, v, O, L, *options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_mods_op_save(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, _, *mods = inputs
    ctx.options, ctx.mods = (max_seqlen_q, max_seqlen_k, causal, scale), mods  # (check: the forward's)
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k)  # O, L and dropout's seed


def _varlen_mods_op_grad(ctx, dO, dL, dseed):
    q, k, v, O, L, seed, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    grads = _varlen_mods_grads_op(dO, q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, *ctx.options, *ctx.mods, seed)
    return *grads, *(None,) * 7, *_mod_fields_gradients(ctx.mods)


_varlen_mods_op.register_autograd(_varlen_mods_op_grad, setup_context=_varlen_mods_op_save)


class _FlashAttentionVarlen(torch.autograd.Function):
    """flash_attn_varlen_func with gradients: saves q, k, v, out and L (O(total d) memory), as
    FlashAttention does; L, returned as softmax_lse, has no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, mods):
        O, L = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                 mods)
        ctx.save_for_backward(q, k, v, O, L, cu_seqlens_q, cu_seqlens_k)
        ctx.options = max_seqlen_q, max_seqlen_k, causal, scale, mods
        ctx.set_materialize_grads(False)  # dL: None (as FlashAttention's)
        ctx.mark_non_differentiable(L)
        return O, L

    @staticmethod
    def backward(ctx, dO, dL):
        q, k, v, O, L, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        with torch.no_grad():
            grads = _varlen_grads(dO.contiguous(), q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, *ctx.options)
        return *_without_derivative(grads), None, None, None, None, None, None, None


def _run_varlen(pass_, q, k, v, O, L, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                mods=None, dO=None, dQ=None, dK=None, dV=None):
    """A pass of version 3's kernels on packed sequences (kernels/version3.cuh's mf_varlen), on tensors
    already checked, with a ModCall for a build with mods, in the current stream of q's device. Returns
    an error message, "" on success."""
    kernels = load_kernels(q.device.type, 3, mods=_spec(mods))
    _check_shared_memory(kernels, q, pass_, 3)
    function = kernels._c.mf_varlen
    if function.restype is not ctypes.c_char_p:
        P, i, i64, f, b = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_bool
        function.restype, function.argtypes = ctypes.c_char_p, [i] + [P] * 12 + [i] * 5 + [i64, i, f, b, P, i, i, P]
    (total_q, H, d), p = q.shape, PASSES.index(pass_)
    per_row = kernels._ask("mf_scratch_floats", p, 1, d)  # fp32 scratch per row of q (the backward's)
    scratch = q.new_empty(total_q * H * per_row, dtype=torch.float32) if per_row > 0 else None
    addresses = [t.data_ptr() if t is not None else None
                 for t in (q, k, v, O, dO, L, dQ, dK, dV, scratch, cu_seqlens_q, cu_seqlens_k)]
    # (keep: the block mask and tensors that mod_args points to, held until the launches are queued)
    mod_args, keep = _mod_args(kernels, mods, q, H, mods.packed) if mods is not None else (None, ())
    device = q.device.index if q.is_cuda else 0
    stream = torch._C._cuda_getCurrentRawStream(device) if q.is_cuda else None
    return function(p, *addresses, len(cu_seqlens_q) - 1, H, H // k.shape[1], max_seqlen_q, max_seqlen_k, total_q,
                    d, scale, causal, None if mod_args is None else ctypes.byref(mod_args), DTYPES.index(q.dtype),
                    device, stream).decode()


# ---------------------------------------------------------------------------------------------
# Your own attention (chapter 6): score_mod and mask_mod compiled into the kernels of versions 3 and 4


class ModArgs(ctypes.Structure):
    """kernels/mods.cuh's mods::Args, field for field: what a call hands the hooks at run time."""
    _fields_ = [("tensors", ctypes.c_void_p * 4), ("shapes", (ctypes.c_longlong * 4) * 4),
                ("strides", (ctypes.c_longlong * 4) * 4), ("ints", ctypes.c_int * 4), ("floats", ctypes.c_float * 4),
                ("H", ctypes.c_int), ("block_mask", ctypes.c_void_p), ("ranges", ctypes.c_void_p),
                ("mask_zb", ctypes.c_int), ("mask_zh", ctypes.c_int), ("mask_tiles", ctypes.c_int),
                ("seed", ctypes.c_uint * 2), ("threshold", ctypes.c_uint), ("keep_scale", ctypes.c_float)]


# A mod tensor's dtype: (the type the mod reads, the type stored), for kernels/mods.cuh's Tensor.
_MOD_TYPES = {torch.float32: ("float", "float"), torch.float16: ("float", "__half"),
              torch.bfloat16: ("float", "__nv_bfloat16"), torch.int32: ("int", "int"),
              torch.int64: ("long long", "long long"), torch.bool: ("bool", "bool"),
              torch.uint8: ("int", "unsigned char")}
_MOD_NAMES = {"score", "b", "h", "q_idx", "kv_idx", "shift", "args", "keep", "alibi_slopes", "F", "mods", "Tensor",
              "Dual"}
_MAX_MOD_TENSORS = 4  # mods::Args holds 4; alibi_slopes takes one of them
_FLOAT32_MAX = torch.finfo(torch.float32).max
_NO_LIMIT = 2**30  # a window_size this large or larger: -1 (kernels/mods.cuh's window_tiles counts in 32 bits)


@dataclass(frozen=True)
class Mods:
    """What a build with mods is compiled from (the values of window_size, softcap and the tensors'
    contents come at run time): the user's score_mod and mask_mod (C++ expressions, or function bodies
    with `return`), each mod tensor's (name, dtype, dims), and which official options are on."""
    score_mod: Optional[str] = None
    mask_mod: Optional[str] = None
    tensors: tuple = ()  # ((name, dtype name, dims), ...), then alibi_slopes' if given
    window: bool = False
    softcap: bool = False
    alibi: int = 0  # alibi_slopes' dims: 1 (H,), 2 (B, H); 0: none
    dropout: bool = False  # dropout_p > 0 (its value and seed at run time)

    @property
    def score(self):
        return self.score_mod is not None or self.softcap or self.alibi > 0

    @property
    def mask(self):
        return self.mask_mod is not None or self.window

    @property
    def softcap_only(self):
        """The score_mod is softcap's alone: the kernels fold its two multiplies into their scales
        (kernels/mods.cuh's score_scale, softmax_scale), and the mod is a tanh."""
        return self.softcap and self.score_mod is None and not self.alibi

    @property
    def window_only(self):
        """The mask is window_size's alone: the kernels tell its tiles apart by arithmetic (no block mask)."""
        return self.window and self.mask_mod is None

    def mask_reads(self, name):
        """Does mask_mod's text name this variable (b, h, a tensor)? If not, the block mask is the same
        for every value of it."""
        return self.mask_mod is not None and re.search(rf"\b{name}\b", self.mask_mod) is not None

    def header(self):
        """The C++ that kernels/mods.cuh includes as MODS_FILE (mods_header's text)."""
        tensors = "".join(f"    const Tensor<{_MOD_TYPES[getattr(torch, dtype)][0]}, "
                          f"{_MOD_TYPES[getattr(torch, dtype)][1]}, {dims}> {name}{{args, {t}}};\n"
                          for t, (name, dtype, dims) in enumerate(self.tensors))

        def user(kind, text, result):  # an expression, or a function body that returns
            # (a newline after the text: a // comment that ends it must not take the parenthesis)
            body = f"[&]() -> {result} {{\n{text}\n    }}()" if re.search(r"\breturn\b", text) else f"({text}\n)"
            return f'#line 1 "{kind}"\n{body}'

        score = mask = ""
        if self.score_mod is not None:
            score += f"    score = F(\n{user('score_mod', self.score_mod, 'F')});\n"
        if self.softcap_only:  # the kernels scale by 1 / softcap before and by softcap after (SOFTCAP_ONLY)
            score += "    score = mods::fast_tanh(score);  // softcap, folded into the kernels' scales\n"
        elif self.softcap:  # the official order: the cap first, then the bias
            # fast_tanh (kernels/mma.cuh): the one instruction that the official kernels use too; times
            # 1 / softcap (args.floats[1]), not a division per score
            score += "    score = args.floats[0] * mods::fast_tanh(score * args.floats[1]);  // softcap\n"
        if self.alibi:
            slope = "alibi_slopes[h]" if self.alibi == 1 else "alibi_slopes(b, h)"
            score += f"    score = score - {slope} * mods::fabsf(float(q_idx + shift - kv_idx));  // alibi_slopes\n"
        if self.mask_mod is not None:
            mask += f"    keep = bool(\n{user('mask_mod', self.mask_mod, 'bool')});\n"
        if self.window:
            mask += "    keep = keep && ::mods::in_window(kv_idx - q_idx - shift, args);  // window_size\n"
        return (f"// Written by minimal_flash.Mods.header for one build: {self!r}\n"
                "namespace mods {\n"
                f"constexpr bool SCORE = {str(self.score).lower()}, MASK = {str(self.mask).lower()}, "
                f"DROPOUT = {str(self.dropout).lower()};\n"
                f"constexpr bool WINDOW_ONLY = {str(self.window_only).lower()}, "
                f"SOFTCAP_ONLY = {str(self.softcap_only).lower()};\n"
                "template <class F>\n"
                "__device__ inline F score_mod(F score, int b, int h, int q_idx, int kv_idx, int shift,\n"
                "                              const Args& args) {\n"
                f"{tensors}{score}    return score;\n}}\n"
                "__device__ inline bool mask_mod(int b, int h, int q_idx, int kv_idx, int shift, const Args& args) {\n"
                f"{tensors}    bool keep = true;\n{mask}    return keep;\n}}\n"
                "}  // namespace mods\n")


@dataclass
class ModCall:
    """One call's mods: the build's Mods, and what the hooks read at run time."""
    spec: Mods
    tensors: tuple = ()  # the mod tensors (alibi_slopes last), on q's device
    ints: tuple = (-1, -1, 0, 0)
    floats: tuple = (0.0, 0.0, 0.0, 0.0)
    dropout_p: float = 0.0
    seed: int = 0  # dropout's Philox key (64 bits)
    packed: Optional[tuple] = None  # packed sequences: (B, N, shift) of one block mask for all (_packed_block_mask)


def _check_mods(q, score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, dropout_p=0.0,
                dropout_seed=None, batch_heads=None, no_limit=None):
    """The mods of a call, checked: a ModCall, or None when there is none (the plain kernels run).
    dropout_p > 0 without a seed draws one from torch's generator. batch_heads: (B, H) where q is not
    (B, H, N, d) (flash_attn_varlen_func's sequences and heads). no_limit: a window side of at least this
    many keys is no limit, -1 (the official package's rule: flash_attn_varlen_func's max_seqlen_k,
    flash_attn_with_kvcache's rows per sequence; at any rate 2**30)."""
    if (score_mod is None and mask_mod is None and mod_tensors is None and alibi_slopes is None
            and _exactly(window_size, (-1, -1)) and _exactly(softcap, 0.0) and _exactly(dropout_p, 0.0)):
        return None  # every option at its default (the common call, at once)
    for name, text in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise TypeError(f"{name} = {_short(text)}: it must be a C++ expression (a string), such as "
                            + ("'score + bias[h]'" if name == "score_mod" else "'q_idx >= kv_idx'"))
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= -1 for x in window_size):
        raise ValueError(f"window_size = {_short(window_size)}: it must be (left, right), each a number of keys "
                         "or -1 for no limit")
    if (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap)
            or not (softcap == 0 or 2.0**-60 <= softcap <= 2.0**60)):
        raise ValueError(f"softcap = {_short(softcap)}: it must be a number >= 0 (0: no cap), and if not 0 from "
                         "2**-60 to 2**60 (the kernels take it and its inverse in float32, where a score times the "
                         "inverse of a cap further out would leave float32's range)")
    softcap = float(softcap)
    mod_tensors = {} if mod_tensors is None else mod_tensors
    if not isinstance(mod_tensors, dict):
        raise TypeError(f"mod_tensors = {_short(mod_tensors)}: it must be a dict {{name: tensor}}")
    tensors, specs = [], []
    for name, t in mod_tensors.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name) or name in _MOD_NAMES:
            raise ValueError(f"mod_tensors: the name {name!r} must be a C++ name, not one of "
                             + ", ".join(sorted(_MOD_NAMES)))
        _check_is_tensor(f"mod_tensors[{name!r}]", t)
        if t.dtype not in _MOD_TYPES or not 1 <= t.dim() <= 4 or t.device != q.device or t.requires_grad:
            raise ValueError(f"mod_tensors[{name!r}] ({t.dtype}, {t.dim()}-D, on {t.device}"
                             f"{', requires grad' if t.requires_grad else ''}): a mod tensor must be 1- to 4-D, on "
                             f"q's device ({q.device}), of dtype " + ", ".join(str(x) for x in _MOD_TYPES)
                             + ", and a constant (no gradient reaches it: pass it detached)")
        if not any(text is not None and re.search(rf"\b{name}\b", text) for text in (score_mod, mask_mod)):
            raise ValueError(f"mod_tensors[{name!r}]: neither score_mod nor mask_mod reads it")
        tensors.append(t)
        specs.append((name, str(t.dtype).removeprefix("torch."), t.dim()))
    alibi = 0
    if alibi_slopes is not None:
        _check_is_tensor("alibi_slopes", alibi_slopes)
        B, H = batch_heads or q.shape[:2]
        if (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device
                or tuple(alibi_slopes.shape) not in ((H,), (B, H))):
            raise ValueError(f"alibi_slopes ({alibi_slopes.dtype}, shape {tuple(alibi_slopes.shape)}, on "
                             f"{alibi_slopes.device}): it must be float32, of shape (H,) = ({H},) or (B, H) = "
                             f"({B}, {H}), on q's device ({q.device})")
        tensors.append(alibi_slopes.detach())
        specs.append(("alibi_slopes", "float32", alibi_slopes.dim()))
        alibi = alibi_slopes.dim()
    if len(tensors) > _MAX_MOD_TENSORS:
        raise ValueError(f"{len(tensors)} mod tensors (alibi_slopes counts as one): the kernels take at most "
                         f"{_MAX_MOD_TENSORS}")
    # the kernels count in 32 bits: a window of 2**30 keys or more is no limit, since no sequence that
    # fits in memory is that long (q, k, v of 2**30 rows of d = 32 in 16 bits: 192 GiB)
    limit = _NO_LIMIT if no_limit is None else min(_NO_LIMIT, no_limit)
    window_size = tuple(-1 if x >= limit else int(x) for x in window_size)
    window = window_size != (-1, -1)
    spec = Mods(score_mod, mask_mod, tuple(specs), window, softcap > 0, alibi, dropout_p > 0)
    if not (spec.score or spec.mask or spec.dropout):
        return None
    if spec.dropout and dropout_seed is None and not torch.compiler.is_compiling():  # (compiled: the operator's)
        dropout_seed = _dropout_seed(q)
    floats = (float(softcap), 1.0 / softcap if softcap > 0 else 0.0, 0.0, 0.0)  # the cap and its inverse
    # (None: dropout's seed is not drawn yet; _attention_mods_op draws it when the compiled graph runs)
    seed = 0 if not spec.dropout else None if dropout_seed is None else dropout_seed % 2**64
    return ModCall(spec, tuple(tensors), (*window_size, 0, 0), floats, dropout_p, seed)


def _dropout_seed(q):
    """A call's dropout seed, from torch's generator: torch.manual_seed makes a run reproducible. Not while
    a CUDA graph is captured, whose replays would all draw this one mask."""
    if _capturing(q.device):
        raise RuntimeError("dropout_p > 0 while a CUDA graph is captured: the graph would replay one dropout "
                           "mask forever; capture without dropout")
    return int(torch.randint(0, 2**62, (1,)).item())


def _head_dim(q):
    """q's last dim, or None where q is no tensor of at least one dim (its checks say so later)."""
    return q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() > 0 else None


def _mods_version(version, wants_mods, q):
    """Mods run on the kernels of versions 3 and 4: the default version of q's dtype and device then
    (version 4 on a Hopper GPU, else 3), and a version without mods is refused."""
    if not wants_mods:
        return version
    if isinstance(q, torch.Tensor) and q.dtype not in VERSIONS[3].dtypes:
        raise TypeError(f"q is {q.dtype}: score_mod, mask_mod, window_size, softcap, alibi_slopes and dropout_p are "
                        f"compiled into the kernels of versions 3 and 4, which take {_dtype_names(VERSIONS[3].dtypes)}")
    if version is None:
        return default_version(q.dtype, q.device, _head_dim(q)) if isinstance(q, torch.Tensor) else 3
    if version not in VERSIONS or not VERSIONS[version].mods:
        raise ValueError(f"version = {version!r}: score_mod, mask_mod, window_size, softcap, alibi_slopes and "
                         "dropout_p are compiled into the kernels of versions 3 and 4 only; leave version out, or "
                         "pass one of those")
    return version


_block_masks = {}  # (build, N, shift, B_mask, H_mask, ints, device, stream) -> block mask; the last 16 kept


def _mod_args(kernels, mods, q, H, extent=None):
    """The ModArgs of one call of H query heads (and what must live until its launches are queued): the
    tensors' places, the options' values, and, given extent = (B, N, shift), B sequences of N queries
    and keys at most (a fixed-length batch: q (B, H, N, d), shift 0; packed sequences: _packed_block_mask),
    the block mask, computed by kernels/mods.cuh's block_mask, and reused while the mask reads no tensor
    (whose contents may change between calls). None for a window alone (the kernels' window_tiles has its
    tiles by arithmetic), nor without extent: KV caches, and packed sequences that no one mask serves
    (every tile PARTIAL)."""
    a, keep = ModArgs(), list(mods.tensors)
    for t, tensor in enumerate(mods.tensors):
        # an empty tensor: every read is out of range (0), but mods.cuh's Tensor reads element 0 then too
        keep.append(torch.zeros(1, dtype=tensor.dtype, device=tensor.device) if tensor.numel() == 0 else tensor)
        a.tensors[t] = keep[-1].data_ptr()
        for x in range(tensor.dim()):
            a.shapes[t][x], a.strides[t][x] = tensor.shape[x], tensor.stride(x)
    a.ints[:], a.floats[:], a.H = mods.ints, mods.floats, H
    if mods.spec.dropout:  # kept where Philox's word >= p 2^32 (kernels/mods.cuh's kept)
        a.seed[:] = mods.seed % 2**32, mods.seed >> 32
        a.threshold, a.keep_scale = min(round(mods.dropout_p * 2**32), 2**32 - 1), 1.0 / (1.0 - mods.dropout_p)
    if mods.spec.mask and not mods.spec.window_only and extent is not None:
        spec, (B, N, shift) = mods.spec, extent
        B_mask, H_mask = (B if spec.mask_reads("b") else 1), (H if spec.mask_reads("h") else 1)
        tiles = (N + 63) // 64
        device = q.device.index if q.is_cuda else 0
        stream = torch._C._cuda_getCurrentRawStream(device) if q.is_cuda else None
        key = (kernels.library, N, shift, B_mask, H_mask, mods.ints, q.device, stream)
        reads_tensors = any(spec.mask_reads(name) for name, _, _ in spec.tensors)
        block_mask = None if reads_tensors else _block_masks.get(key)
        if block_mask is None:
            block_mask = torch.empty((B_mask, H_mask, tiles, tiles), dtype=torch.uint8, device=q.device)
            _raise_if(kernels.block_mask(a, N, shift, B_mask, H_mask, block_mask, device, stream))
            block_mask = block_mask, _tile_ranges(block_mask)
            if not reads_tensors:
                if len(_block_masks) >= 16:
                    del _block_masks[next(iter(_block_masks))]
                _block_masks[key] = block_mask
        keep += block_mask
        a.block_mask, a.ranges = block_mask[0].data_ptr(), block_mask[1].data_ptr()
        a.mask_zb, a.mask_zh, a.mask_tiles = (H_mask if B_mask > 1 else 0), int(H_mask > 1), tiles
    return a, keep


def _tile_ranges(block_mask):
    """(B_mask, H_mask, 2, tiles, 2) int32: of each row of the block mask ([:, :, 0]) and each column
    ([:, :, 1]), the first and the last tile that is not EMPTY (tiles, -1 where all are)."""
    tiles = block_mask.shape[-1]
    ranges = []
    for kept in (block_mask != 0, (block_mask != 0).transpose(-1, -2)):
        at = torch.arange(tiles, device=block_mask.device, dtype=torch.int32)
        first = torch.where(kept, at, tiles).amin(dim=-1)
        last = torch.where(kept, at, -1).amax(dim=-1)
        ranges.append(torch.stack((first, last), dim=-1))
    return torch.stack(ranges, dim=2).to(torch.int32).contiguous()


def document_mask(document_ids):
    """Packed sequences (documents one after the other in a row of N tokens, each attending only
    within itself): (mask_mod, mod_tensors) for flash_attention, from document_ids, an int32 tensor of
    shape (N,) or (B, N) giving each token's document. Combine with causal=True for causal documents."""
    _check_is_tensor("document_ids", document_ids)
    if document_ids.dtype not in (torch.int32, torch.int64) or document_ids.dim() not in (1, 2):
        raise ValueError(f"document_ids ({document_ids.dtype}, shape {tuple(document_ids.shape)}): it must be an "
                         "int32 or int64 tensor of shape (N,) or (B, N)")
    return _DOCUMENT_MASKS[document_ids.dim()], {"document": document_ids}


_DOCUMENT_MASKS = {1: "document[q_idx] == document[kv_idx]", 2: "document(b, q_idx) == document(b, kv_idx)"}


def _check_document_ids(mask_mod, mod_tensors, q):
    """document_mask's ids must be q's: a position past them would read 0, document 0's id (a mod tensor
    read out of range gives 0), and join that document unseen. q (B, H, N, d)."""
    if mask_mod not in _DOCUMENT_MASKS.values() or not isinstance((mod_tensors or {}).get("document"), torch.Tensor):
        return
    ids, (B, _, N, _) = mod_tensors["document"], q.shape
    if tuple(ids.shape) != ((N,) if ids.dim() == 1 else (B, N)):
        raise ValueError(f"document_mask's ids have shape {tuple(ids.shape)}; q's batch and sequence want (N,) = "
                         f"({N},) or (B, N) = ({B}, {N}): one document id per token")


def prefix_lm_mask(prefix_length):
    """Prefix-LM: the first prefix_length tokens see each other (bidirectional), the rest see what is
    before them (causal): a mask_mod for flash_attention (with causal=False)."""
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 0:
        raise ValueError(f"prefix_length = {_short(prefix_length)}: it must be a whole number >= 0")
    return f"kv_idx <= q_idx || kv_idx < {prefix_length}"


# ---------------------------------------------------------------------------------------------
# Building and loading the kernels


def block_sizes(version, Br=None, Bc=None):
    """The (Br, Bc) a version's build uses: the arguments, else MINIMAL_FLASH_BR / _BC, else 32 and 32,
    checked with the version's rule; (None, None) for a version whose tiles are its own."""
    rule = VERSIONS[version].block_sizes
    if rule is None:
        if Br is not None or Bc is not None:
            raise ValueError(f"Br = {Br}, Bc = {Bc}: version {version} ({VERSIONS[version].name}) has tiles of its "
                             "own; block sizes apply to versions "
                             + " and ".join(str(n) for n, x in VERSIONS.items() if x.block_sizes))
        return None, None
    Br = _block_size("Br", Br, "MINIMAL_FLASH_BR")
    Bc = _block_size("Bc", Bc, "MINIMAL_FLASH_BC")
    error = rule(Br, Bc)
    if error:
        raise ValueError(error)
    return Br, Bc


def _block_size(name, value, variable):
    if value is None:
        value = os.environ.get(variable, "32")
        where = f" (from {variable})"
    else:
        where = ""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise TypeError(f"{name} = {value!r}{where}: a block size is a whole number")
    return int(value)


_loaded = {}  # (device type, version, Br, Bc, mods) -> Kernels


def load_kernels(device_type="cuda", version=None, Br=None, Bc=None, mods=None):
    """The kernels of one version (default: version 2) for 'cuda' or 'cpu', with block sizes Br, Bc
    where the version takes them: compiled the first time, and again whenever a file the build
    includes has changed since it was loaded (this process goes on with the new build). Every call of
    the kernels asks: the loaded build is found first, and the block sizes are resolved and checked
    only when it is not there. mods: a Mods, compiled in (versions 3 and 4; chapter 6)."""
    version = 2 if version is None else version
    key = (device_type, version, Br, Bc, mods)
    folder = _sources.current()
    kernels = _loaded.get(key)
    if kernels is not None and kernels.folder is folder:  # nothing in kernels/ changed since
        return kernels
    _check_version(version, None)
    sources = _build_sources(folder, device_type, version)
    if kernels is None or kernels.sources != sources:
        Br, Bc = block_sizes(version, Br, Bc)
        changed = sorted({name for name, _ in set(sources[1]) ^ set(kernels.sources[1])}) if kernels else None
        kernels = _loaded[key] = Kernels(_build(device_type, version, Br, Bc, sources, changed, mods), sources,
                                         version)
    kernels.folder = folder
    return kernels


class _Sources:
    """The files of kernels/ by their content. Every call asks (load_kernels runs on every call), so
    the folder is looked at no more than once a second and the files re-read only when their
    modification times change; what current() returns is the same object until then."""

    def __init__(self):
        self.checked, self.mtimes, self.digests = -math.inf, None, None

    def current(self):
        """{file name: content digest} of kernels/."""
        if time.monotonic() - self.checked > 1.0:
            files = sorted(p for p in KERNELS.iterdir() if p.is_file())
            mtimes = {p: p.stat().st_mtime_ns for p in files}
            if mtimes != self.mtimes:
                self.mtimes = mtimes
                self.digests = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in files}
            self.checked = time.monotonic()
        return self.digests


_sources = _Sources()


def _build_sources(digests, device_type, version):
    """What one build is made from: this checkout's kernels/ folder (the build files name the sources
    by path, so two checkouts must not share a build), and the file compiled, the version's home and
    every kernels/ file they include ("#include" followed), each with its content digest. A change
    elsewhere in kernels/ leaves this build as it is."""
    todo = ["bindings.cu" if device_type == "cuda" else "cpu.cpp", VERSIONS[version].home]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in digests:
            continue
        seen.add(name)
        todo += re.findall(r'^\s*#include "([^"]+)"', (KERNELS / name).read_text(), re.M)
    return str(KERNELS), tuple((name, digests[name]) for name in sorted(seen))


def build_directory(device_type, version, Br, Bc, sources, mods=None):
    """Where a build lives: $TORCH_EXTENSIONS_DIR, else torch's default (~/.cache/torch_extensions),
    then minimal_flash/, then a folder named by everything the build is made from: device, version,
    block sizes, torch version, and its sources (this checkout's path and the content of the files the
    build includes), its nvcc flags (CUDA), and its mods (chapter 6), if any."""
    flags = VERSIONS[version].cuda_flags if device_type == "cuda" else ()
    key = repr((sources, torch.__version__, torch.version.cuda) + ((flags,) if flags else ())
               + ((mods.header(),) if mods else ()))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())
    sizes = f"_br{Br}_bc{Bc}" if Br is not None else ""
    return root / "minimal_flash" / f"{device_type}_v{version}{sizes}{'_mods' if mods else ''}_{digest}"


def _build(device_type, version, Br, Bc, sources, changed, mods=None):
    """Compile (unless this exact build exists) and return the shared library's path."""
    folder = build_directory(device_type, version, Br, Bc, sources, mods)
    name = folder.name
    defines = [f"-DVERSION_FILE={VERSIONS[version].home}"] + ([f"-DBR={Br}", f"-DBC={Bc}"] if Br is not None else [])
    if mods is not None:  # the mods' header, beside the build (kernels/mods.cuh includes it)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "user_mods.cuh").write_text(mods.header())
        defines += [f"-I{folder}", "-DMODS_FILE=user_mods.cuh"]
    if device_type == "cuda":
        # A version's own target flags replace torch's (it adds its own only when none is given).
        cuda_flags = ["-O3", "-lineinfo", *VERSIONS[version].cuda_flags] + defines
        source, flags = KERNELS / "bindings.cu", {"extra_cuda_cflags": cuda_flags}
    else:
        # -O2, not -O3: a reader who edits a kernel waits mostly for its build, and -O2 builds take 10-30%
        # less time; the tests' small launches run as fast, a long one (N = 1024) up to 1.4x slower.
        source, flags = KERNELS / "cpu.cpp", {"extra_cflags": ["-O2", "-fno-strict-aliasing",
                                                                    "-Wno-unknown-pragmas"] + defines}
    library, built = folder / f"{name}.so", folder / "built"
    if built.exists():  # not the library itself: another process may be writing it right now
        return library
    why = f"{', '.join(changed)} changed" if changed else "no build of these sources yet"
    sizes = f" with Br={Br}, Bc={Bc}" if Br is not None else ""
    sizes += " with mods" if mods is not None else ""
    what = f"version {version} ({source.relative_to(KERNELS.parent)}) for {device_type}{sizes}"
    shown = str(folder).replace(str(Path.home()), '~', 1)
    folder.mkdir(parents=True, exist_ok=True)
    with _building(folder, shown):
        if built.exists():  # another process built it while this one waited
            return library
        _say(f"compiling {what} ({why}) in {shown}")
        start = time.monotonic()
        _use_this_pythons_ninja()
        try:
            path = torch.utils.cpp_extension.load(name=name, sources=[str(source)], build_directory=str(folder),
                                                  is_python_module=False, **flags)
        except RuntimeError as error:
            raise RuntimeError(_compile_error(what, str(error), folder / "build-error.log")) from None
        built.touch()
    _say(f"compiled in {time.monotonic() - start:.1f} s")
    return Path(path)


@contextlib.contextmanager
def _building(folder, shown):
    """One build of a folder at a time among processes, by a lock that the system lets go of when its
    process ends, however it ends. torch's own lock file (folder/lock), which its load creates while it
    compiles, is not: a build killed before it finished (a notebook's kernel restarted mid-compile, a
    kill) leaves it behind, and every later load of that build would wait for it, silently, for ever.
    Holding this lock, a torch lock file found is such a leftover: removed, and said."""
    try:
        import fcntl
    except ImportError:  # (Windows: torch's lock alone)
        yield
        return
    with open(folder / "building.lock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process, which is compiling in {shown}")
            fcntl.flock(held, fcntl.LOCK_EX)
        leftover = folder / "lock"
        if leftover.exists():
            _say(f"removing {shown}/lock, left by a compile that did not finish (its process ended)")
            leftover.unlink()
        yield  # (closing the file lets go of the lock)


def _compile_error(what, log, log_path):
    """The compiler's first error lines (file:line: message), not its whole output; that goes to a file."""
    log_path.write_text(log)
    errors = [line.replace(str(KERNELS.parent) + os.sep, "") for line in log.splitlines()
              if re.search(r"(:\d+:\d+: (fatal )?error|\(\d+\): error)", line)]
    shown = "\n".join(f"  {line}" for line in errors[:3]) or "  (no file:line error found: see the log)"
    return f"minimal_flash: compiling {what} failed:\n{shown}\nthe whole compiler output: {log_path}"


def _say(message):
    """Build messages go to stderr, at once (tests/conftest.py routes them past pytest's capture)."""
    print(f"minimal_flash: {message}", file=sys.stderr, flush=True)


def _use_this_pythons_ninja():
    """torch builds with the first `ninja` on PATH. Put the one that requirements.txt installed beside
    this Python first: a process started without activating the environment (a Jupyter kernel, say)
    would otherwise find another ninja, or none, and two ninja versions rebuild each other's builds."""
    interpreter_bin, path = str(Path(sys.executable).parent), os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != interpreter_bin:
        os.environ["PATH"] = interpreter_bin + os.pathsep + path


# mf_run's one argument (kernels/bindings.cu, struct RunArgs), 47 fields of 8 bytes: pass; the addresses of
# q, k, v, O, dO, L, dQ, dK, dV, scratch (0: none); B, H, N, d, group; the (batch, head, row) strides of q,
# k, v, dO, O, dQ, dK, dV (0s for those the pass has not); scale; causal, deterministic; the mods' address;
# dtype, device, stream. Packed into bytes, whose address ctypes passes as it is.
RUN_ARGS = struct.Struct("<q10Q5q24qdqqQqqQ")


class Kernels:
    """One build: one version's kernels for one device type (and block sizes, where the version takes
    them), the C functions of kernels/bindings.cu called with tensors."""

    def __init__(self, library, sources, version):
        P, i, i64, f, b = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_bool
        c = self._c = ctypes.CDLL(str(library))
        for function, result, arguments in [
                (c.mf_block_size, i, [i]), (c.mf_device_shared_bytes, i64, [i]),
                (c.mf_shared_bytes, i64, [i, i]), (c.mf_scratch_floats, i64, [i, i, i]),
                (c.mf_run_args_bytes, i64, []), (c.mf_run, ctypes.c_char_p, [ctypes.c_char_p])]:
            function.restype, function.argtypes = result, arguments
        if c.mf_run_args_bytes() != RUN_ARGS.size:  # RunArgs changed without RUN_ARGS, or the other way
            raise RuntimeError(f"minimal_flash: {library}'s mf_run takes a record of {c.mf_run_args_bytes()} "
                               f"bytes (kernels/bindings.cu, RunArgs), RUN_ARGS packs {RUN_ARGS.size}")
        if hasattr(c, "mf_decode"):  # version 3's build: chapter 5's decode kernels (kernels/flash_decode.cu)
            c.mf_decode.restype, c.mf_decode.argtypes = (ctypes.c_char_p,
                                                         [P] * 10 + [i] * 10 + [i64, i64, i, i, f, b, i, i, P, P])
        if hasattr(c, "mf_forward_consumers"):  # version 4's build: how many consumer warpgroups a forward takes
            c.mf_forward_consumers.restype, c.mf_forward_consumers.argtypes = i, [i64, i, i, i]
        if hasattr(c, "mf_block_mask"):  # a build with mods: chapter 6's block mask (kernels/mods.cuh)
            c.mf_block_mask.restype, c.mf_block_mask.argtypes = ctypes.c_char_p, [P, i, i, i, i, P, i, P]
        self.library, self.sources, self.version, self.folder = library, sources, version, None
        takes = VERSIONS[version].block_sizes is not None
        self.Br, self.Bc = (c.mf_block_size(0), c.mf_block_size(1)) if takes else (None, None)
        self._asked = {}  # answers that never change, kept: each ctypes call costs host time

    def _ask(self, function, *arguments):
        if (function, arguments) not in self._asked:
            self._asked[function, arguments] = getattr(self._c, function)(*arguments)
        return self._asked[function, arguments]

    def shared_bytes(self, pass_, d):
        """The least shared memory a block of this pass needs for head dim d."""
        return self._ask("mf_shared_bytes", PASSES.index(pass_), d)

    def device_shared_bytes(self, device):
        """The most shared memory a block may have on this device (on the CPU, the emulation's)."""
        return self._ask("mf_device_shared_bytes", torch.device(device).index or 0)

    def run(self, pass_, causal, scale, q, k, v, O, L, dO=None, dQ=None, dK=None, dV=None, deterministic=False):
        """A pass on any tensors: the kernels index raw addresses, so this checks their layout first,
        the last line of defence for any caller (minimal_flash's functions have checked their inputs,
        and use `call`): q, k, v, dO in a layout the version reads as it lies (_reads_as_is: version 4
        takes views), O, dQ, dK, dV contiguous or, in version 4, as _output_for lays them out (the
        transpose of a contiguous (B, N, H, d) tensor), L contiguous. Returns an error message, "" on
        success."""
        grads = (dO, dQ, dK, dV)
        if (pass_ == "forward") != all(t is None for t in grads) or pass_ not in PASSES:
            return f"internal error: pass {pass_!r} with{'out' if pass_ == 'backward' else ''} dO, dQ, dK, dV"
        inputs, outputs = [t for t in (q, k, v, dO) if t is not None], [t for t in (O, dQ, dK, dV) if t is not None]
        strided = VERSIONS[self.version].strided

        def bad(t, shape, dtype):
            return t.shape != shape or t.dtype != dtype or t.device != q.device

        kv_shape = k.shape if pass_ == "forward" else q.shape  # grouped heads: the forward's only
        shapes = {id(k): kv_shape, id(v): kv_shape}
        if (q.dtype not in DTYPES or kv_shape[1] == 0 or q.shape[1] % kv_shape[1] or _other_dims(q) != _other_dims(k)
                or any(bad(t, shapes.get(id(t), q.shape), q.dtype) or t.data_ptr() % 16 for t in inputs + outputs)
                or not all(_reads_as_is(t, self.version) for t in inputs)
                or not all(t.is_contiguous() or strided and t.transpose(1, 2).is_contiguous() for t in outputs)):
            return ("internal error: the (B, H, N, d) tensors differ in shape, layout, dtype or device, or one "
                    "is not 16-byte aligned")
        if bad(L, q.shape[:-1], torch.float32) or not L.is_contiguous():
            return "internal error: L has the wrong layout"
        return self.call(pass_, causal, scale, q, k, v, O, L, *grads, deterministic=deterministic)

    def call(self, pass_, causal, scale, q, k, v, O, L, dO=None, dQ=None, dK=None, dV=None, deterministic=False,
             mods=None):
        """A pass on tensors already checked, with a ModCall for a build with mods. The launch goes to
        the current stream of q's device, as torch's own do. Returns an error message, "" on success."""
        extent = q.shape[0], q.shape[2], 0  # (B, N, shift): B sequences of N queries and keys
        mod_args, keep = _mod_args(self, mods, q, q.shape[1], extent) if mods is not None else (None, ())
        (B, H, N, d), p, group = q.shape, PASSES.index(pass_), q.shape[1] // max(k.shape[1], 1)
        per_slice = self._ask("mf_scratch_floats", p, N, d)
        # fp32 whatever q's dtype; held here until the launch is queued (none where the pass needs none)
        scratch = q.new_empty(B * H * per_slice, dtype=torch.float32) if per_slice > 0 else None
        addresses = [t.data_ptr() if t is not None else 0 for t in (q, k, v, O, dO, L, dQ, dK, dV, scratch)]
        device = q.device.index if q.is_cuda else 0
        stream = torch._C._cuda_getCurrentRawStream(device) if q.is_cuda else 0  # as an address
        # The strides as torch has them (the forward's dO, dQ, dK, dV: 0s); mf_run takes a dim of size 1 as
        # _strides does
        strides = [x for t in (q, k, v, dO, O, dQ, dK, dV) for x in (t.stride()[:3] if t is not None else (0, 0, 0))]
        args = RUN_ARGS.pack(p, *addresses, B, H, N, d, group, *strides, scale, causal, deterministic,
                             0 if mod_args is None else ctypes.addressof(mod_args), DTYPES.index(q.dtype), device,
                             stream)
        return self._c.mf_run(args).decode()

    def forward_consumers(self, BH, N, d, device):
        """Version 4: the consumer warpgroups its forward takes for BH (batch, head) slices of N rows at
        head dim d on this device (kernels/version4.cuh, Version::consumers: three at d = 64 where the
        work is long and the tiles many, else two)."""
        return self._c.mf_forward_consumers(BH, N, d, device)

    def block_mask(self, mod_args, N, shift, B_mask, H_mask, out, device, stream):
        """kernels/mods.cuh's block mask into out (uint8, (B_mask, H_mask, tiles, tiles)): "" on success."""
        return self._c.mf_block_mask(ctypes.byref(mod_args), N, shift, B_mask, H_mask, out.data_ptr(), device,
                                     stream).decode()


    def decode(self, q, k_cache, v_cache, seqlens, block_table, leftpad, seqlen_new, capacity, splits, scale, causal,
               out, lse, mods=None):
        """flash_attn_with_kvcache's kernels on tensors already checked (kernels/flash_decode.cu, mf_decode),
        with a ModCall for a build with mods: out and lse written. With splits > 1 each split's share goes
        through fp32 scratch, held here until the launches are queued. Returns an error message, "" on
        success."""
        if not hasattr(self._c, "mf_decode"):
            return f"internal error: version {self.version}'s build has no decode kernels (version 3's has)"
        (B, Sq, H, d), (pages, page, Hk, _) = q.shape, k_cache.shape
        parts = ((q.new_empty((splits, B, Sq, H, d), dtype=torch.float32),
                  q.new_empty((splits, B, H, Sq), dtype=torch.float32)) if splits > 1 else (None, None))
        table = (block_table.shape[1], pages) if block_table is not None else (0, 0)
        addresses = [t.data_ptr() if t is not None else None
                     for t in (q, k_cache, v_cache, seqlens, block_table, leftpad, out, lse, *parts)]
        device = q.device.index if q.is_cuda else 0
        stream = torch._C._cuda_getCurrentRawStream(device) if q.is_cuda else None
        mod_args = _mod_args(self, mods, q, H)[0] if mods is not None else None  # (its tensors: mods')
        return self._c.mf_decode(*addresses, B, Sq, H, Hk, d, seqlen_new, capacity, page, *table,
                                 *_cache_strides(k_cache), splits, scale, causal, DTYPES.index(q.dtype), device,
                                 stream, ctypes.byref(mod_args) if mod_args is not None else None).decode()


# ---------------------------------------------------------------------------------------------
# Input checks: every input either gets the right answer or a clear error that names the problem


def _wants_mods(score_mod, mask_mod, mod_tensors, window_size, softcap, alibi_slopes, dropout_p=0.0,
                dropout_seed=None):
    """Does a call ask for mods (then version 3 or 4 runs it)? Checked in full by _check_mods."""
    return (score_mod is not None or mask_mod is not None or bool(mod_tensors) or dropout_p != 0.0
            or not all(_at_default(name, value) for name, value in (
                ("window_size", window_size), ("softcap", softcap), ("alibi_slopes", alibi_slopes))))


def _spec(mods):
    return None if mods is None else mods.spec


_MOD_OPTIONS = ("score_mod", "mask_mod", "mod_tensors", "window_size", "softcap", "alibi_slopes", "dropout_p",
                "dropout_seed")


def _check_call_mods(q, k, v, causal, softmax_scale, Br, Bc, version, mods):
    """_check_call for forward() and backward(), whose **mods are flash_attention's mod options:
    (q, k, v, causal, scale, Br, Bc, version, ModCall or None)."""
    unknown = sorted(set(mods) - set(_MOD_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected option {', '.join(unknown)}: forward() and backward() take, beyond their "
                        f"own, {', '.join(_MOD_OPTIONS)}")
    options = dict(score_mod=None, mask_mod=None, mod_tensors=None, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, dropout_p=0.0, dropout_seed=None) | mods
    options["dropout_p"] = _check_dropout(options["dropout_p"])
    if options["dropout_p"] > 0 and (isinstance(options["dropout_seed"], bool)
                                     or not isinstance(options["dropout_seed"], int)):
        raise TypeError(f"dropout_seed = {_short(options['dropout_seed'])}: forward() and backward() with "
                        "dropout_p > 0 take the seed of the dropout mask, a whole number, the same in both")
    version = _mods_version(version, _wants_mods(**options), q)
    q, k, v, causal, scale, Br, Bc, version = _check_call(q, k, v, causal, softmax_scale, Br, Bc, version)
    return q, k, v, causal, scale, Br, Bc, version, _check_mods(q, **options)


def _check_call(q, k, v, causal, softmax_scale, Br, Bc, version):
    """What every entry point checks, in one order: the options, the version (default: q's dtype's),
    q, k, v for it, the scale and the block sizes by its rules. Returns them ready for the kernels:
    (q, k, v in a layout the version reads, causal, scale as a float, Br, Bc, version)."""
    causal = _check_causal(causal)
    q, k, v, version = _checked_inputs(q, k, v, version)
    scale = _check_scale(softmax_scale, q, version)
    Br, Bc = block_sizes(version, Br, Bc)
    return q, k, v, causal, scale, Br, Bc, version


# A model calls attention with one signature step after step, and checking q, k, v in full costs more
# host time than a small kernel runs. What those checks read is the signature below, nothing else; so a
# call whose signature has passed them before skips them, as torch.compile's guards skip a trace.
_checked = {}  # signature -> the version that _check_version chose; at most 1024 kept


def _checked_inputs(q, k, v, version):
    """_check_version, then _check_inputs: (q, k, v laid out for the version's kernels, version). Under
    torch.compile they run once, where the call is traced: there a look at _checked would become a guard
    of the compiled code, recompiled whenever another call adds to it."""
    key = None if torch.compiler.is_compiling() else _signature((q, k, v), version)
    if key is not None and key in _checked:
        return q, k, v, _checked[key]
    version = _check_version(version, q)
    laid = _check_inputs(q, k, v, version)
    if key is not None and all(a is b for a, b in zip(laid, (q, k, v))):  # read as they lie: no copy redone
        if len(_checked) >= 1024:
            _checked.clear()
        _checked[key] = version
    return *laid, version


def _signature(tensors, version):
    """What _check_version and _check_inputs read: each tensor's type, shape, strides, dtype and device,
    and the version asked for (its type too: True is not 1 there). None where a call has no signature
    (an input that is no tensor, a tensor without strides, a symbolic size): it is checked in full."""
    try:
        key = (type(version), version, *((type(t), t.shape, t.stride(), t.dtype, t.device) for t in tensors))
        hash(key)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return None
    return key


def _check_inputs(q, k, v, version):
    """Raise a clear error for anything this version's kernels cannot take; return (q, k, v) in a layout
    they read (_laid_out)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, version)
        _check_4d(name, t, "(B, H, N, d)")
    if not q.dtype == k.dtype == v.dtype:  # the kernels would read k and v as q's dtype
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_shapes(q, k, v, version)
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q, k, v are on {q.device}; the kernels run on CUDA or on the CPU")
    if (why := version_unavailable(version, q.device)) is not None:
        raise RuntimeError(why)
    d, head_dims = q.shape[-1], VERSIONS[version].head_dims
    if d == 0:
        raise ValueError("head dim d is 0: there is nothing to attend with")
    if head_dims is not None and d > max(head_dims):
        raise ValueError(f"head dim d = {d}: version {version} is compiled for d = {_one_of(head_dims)} (a d "
                         f"between them runs padded up to the next); above {max(head_dims)}, none")
    return _laid_out(q, version), _laid_out(k, version), _laid_out(v, version)


def _laid_out(t, version):
    """q, k, v or dO as this version's kernels read it: t itself where they can (_reads_as_is), else a
    contiguous copy. This is where a view is copied or not. Versions 1-3 index rows with fixed strides,
    so a view (a transpose, a slice) is copied. Version 4 reads through tensor maps with t's own strides,
    so a model's views run uncopied: q, k, v permuted out of one (B, N, 3, H, d) projection, the
    gradient of its (B, N, H, d) output. Those copies cost ~0.8 ms of a 10 ms GPT training step on an
    H200 (24 copy kernels a step). Only what no tensor map can describe is copied."""
    return t if _reads_as_is(t, version) else t.contiguous()


def _reads_as_is(t, version):
    """Can this version's kernels read t, a (B, H, N, d) input, where it lies? Versions 1-3: contiguous
    only. Version 4 (kernels/version4.cuh, tensor_map): its d values contiguous (stride 1) and its
    other strides positive multiples of 16 bytes, the copy engine's rule (a dim of size 1 is never
    stepped along: _strides). Its address must be 16-byte aligned too: checked at the launch
    (_aligned), where torch.compile has real tensors."""
    if not VERSIONS[version].strided:
        return t.is_contiguous()
    size = t.element_size()
    if t.is_contiguous():  # then every stride is a multiple of a row's d values
        return t.shape[-1] * size % 16 == 0
    return t.stride(-1) == 1 and all(s > 0 and s * size % 16 == 0 for s in _strides(t))


def _strides(t):
    """(batch, head, row) strides of a (B, H, N, d) tensor, in values, as the kernels take them: a dim of
    size 1 is never stepped along, and gets a contiguous tensor's stride (torch's is_contiguous
    ignores it too; kernels/bindings.cu's kernel_strides applies the same rule to what mf_run gets)."""
    (B, H, N, d), (batch, head, row, _) = t.shape, t.stride()
    return batch if B > 1 else H * N * d, head if H > 1 else N * d, row if N > 1 else d


def _other_dims(t):
    """(B, N, d) of a (B, H, N, d) tensor: what q, k, v must share when k, v may have fewer heads."""
    return (t.shape[0], *t.shape[2:])


def _check_shapes(q, k, v, version, layout="(B, H, N, d)"):
    """q, k, v of one shape, in the layout the caller passed them in (flash_attention's (B, H, N, d), or
    flash_attn_func's (B, N, H, d), whose k, v may have another N: _unequal_lengths); or, in a version with
    grouped-query heads, k and v with fewer heads than q, a number that divides q's."""
    names = layout.strip("()").split(", ")
    heads, lengths = names.index("H"), names.index("N")
    free = (heads, lengths) if layout == "(B, N, H, d)" else (heads,)  # what may differ between q and k
    others = [tuple(s for i, s in enumerate(t.shape) if i not in free) for t in (q, k)]  # what must agree
    hq, hk = q.shape[heads], k.shape[heads]
    if k.shape == v.shape and others[0] == others[1] and (hq == hk or (
            VERSIONS[version].grouped_heads and hk > 0 and hq % hk == 0)):
        return
    grouped = " or ".join(str(n) for n, x in VERSIONS.items() if x.grouped_heads)
    got = f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if layout == "(B, N, H, d)":
        raise ValueError(f"flash_attn_func takes q (B, N, H, d) and k, v (B, N_k, H_k, d): k and v of one shape, B "
                         f"and d as q's, and H_k = H or, in version {grouped}, a number that divides H (grouped-query "
                         f"attention); {got}")
    other = ("" if q.shape[lengths] == k.shape[lengths] else
             "; for q and k of different lengths N: flash_attn_func, in bf16 or fp16, on (B, N, H, d) tensors "
             "(q.transpose(1, 2)), or flash_attn_varlen_func (causal aligned at the bottom right, as flash-attn has "
             "it; SDPA's is_causal aligns it at the top left)")
    raise ValueError(f"q, k, v must have the same shape {layout}, {got}; or, in version {grouped}, k and v may have "
                     f"fewer heads (H) than q, a number that divides q's (grouped-query attention){other}")


def _aligned(t):
    """The kernels move (B, H, N, d) tensors 16 bytes at a time (float4 loads, cp.async, vector
    atomics, TMA), so each must start at a 16-byte-aligned address. A fresh tensor does; a view that
    starts inside another tensor's storage may not, and is copied into a fresh contiguous tensor. (At
    the launch, not with the input checks: torch.compile cannot trace an address, but the custom
    operators' bodies run eagerly.)"""
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _check_is_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _dtype_names(dtypes):
    return " and ".join(str(x).replace("torch.", "") for x in dtypes)


def _check_tensor(name, t, version):
    _check_is_tensor(name, t)
    if t.dtype not in VERSIONS[version].dtypes:
        runs = [n for n, x in VERSIONS.items() if t.dtype in x.dtypes]
        by_dtypes = {}  # versions grouped by the dtypes they take
        for n, x in VERSIONS.items():
            by_dtypes.setdefault(x.dtypes, []).append(str(n))
        takes = (f"{_dtype_names(dtypes)} (version{'s' * (len(ns) > 1)} {', '.join(ns)})"
                 for dtypes, ns in by_dtypes.items())
        other = (f"{_dtype_names([t.dtype])} runs version {' or '.join(map(str, runs))}" if runs else
                 "the kernels take " + ", ".join(takes))
        raise TypeError(f"{name} has dtype {t.dtype}; version {version}'s kernels take "
                        f"{_dtype_names(VERSIONS[version].dtypes)} only: {other}")


def _check_4d(name, t, layout):
    """A tensor of 4 dims, named in the caller's layout."""
    _check_is_tensor(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")


def _check_outputs(names, tensors, likes, inputs):
    """Tensors given with out=: each like its model (L: like q without d), contiguous and, but L,
    16-byte aligned, because the kernel writes into them; none overlapping another or an input, which
    the kernel would read while it writes."""
    if not isinstance(tensors, (tuple, list)) or len(tensors) != len(names):
        raise TypeError(f"out= must be a tuple ({', '.join(names)}), got {tensors!r:.80}")
    for name, t, like in zip(names, tensors, likes):
        _check_like(name, t, like)
        if not t.is_contiguous():
            raise ValueError(f"{name} (out=) must be contiguous: the kernel writes into it")
        if t.dim() == 4 and t.data_ptr() % 16 != 0:
            raise ValueError(f"{name} (out=) must start at a 16-byte-aligned address: the kernels write it "
                             "16 bytes at a time")
    named = list(zip(names, tensors))
    for i, (name, t) in enumerate(named):
        for other, u in named[i + 1:] + [(None, u) for u in inputs]:
            if _overlap(t, u):
                raise ValueError(f"{name} (out=) shares memory with " + (f"{other} (out=)" if other else "an input")
                                 + ": the kernel would read or write it twice at once")
    return tuple(tensors)


def _overlap(a, b):
    """Do two tensors' bytes overlap? Each spans [its first element, past its last): exactly, for a
    contiguous tensor; a view (version 4's inputs may be) with its gaps, which counts as overlap."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = ((t.data_ptr(), t.data_ptr() + t.element_size() * (1 + sum(
        (n - 1) * s for n, s in zip(t.shape, t.stride())))) for t in (a, b))
    return a0 < b1 and b0 < a1


def _check_like(name, t, like):
    """The backward's other inputs must match q in shape (L: q's without d), dtype and device."""
    _check_is_tensor(name, t)
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be {like.dtype}, as q (L: float32)")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, q on {like.device}: they must be on one device")
    return t


def _check_version(version, q):
    """The version to run: the one asked for, else default_version of q's dtype and device."""
    if version is None:
        return default_version(q.dtype, q.device, _head_dim(q)) if isinstance(q, torch.Tensor) else 2
    if isinstance(version, bool) or version not in VERSIONS:
        choices = " or ".join(f"{n} ({v.name}: kernels/{v.kernels[0]})" for n, v in VERSIONS.items())
        raise ValueError(f"version = {version!r}: {choices}")
    return version


def _check_causal(causal):
    """True or False (1 or 0 too); anything else is a mistake, such as SDPA's attn_mask in its place."""
    if isinstance(causal, bool) or (isinstance(causal, int) and causal in (0, 1)):
        return bool(causal)
    raise TypeError(f"causal = {_short(causal)}: it must be True or False")


def _check_scale(softmax_scale, q, version):
    """The factor on Q K^T as a float: 1/sqrt(d) unless given; a finite number, and > 0 for the
    versions that need it."""
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale = {_short(softmax_scale)}: it must be a number (or None for 1/sqrt(d))")
    scale = float(_scale(q, softmax_scale))
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale = {softmax_scale!r}: it must be finite")
    if abs(scale) > _FLOAT32_MAX or 0 < abs(scale) < 2.0**-126:  # inf, or 0 (flushed), in the kernels
        raise ValueError(f"softmax_scale = {softmax_scale!r}: the kernels take it as a float32, where it must be a "
                         "normal number (from 2**-126 to 3.4e38 in size) or 0")
    if VERSIONS[version].positive_scale and scale <= 0:
        # The kernel keeps the running max of unscaled scores, right only for scale > 0 (and at 0 a
        # masked score's exponent would be -inf * 0 = NaN).
        raise ValueError(f"softmax_scale = {softmax_scale!r}: version {version} takes softmax_scale > 0")
    return scale


_fits = set()  # (kernels, device, pass, d) that passed the check below: asked on every call


def _check_shared_memory(kernels, q, pass_, version):
    if (kernels, q.device, pass_, q.shape[-1]) in _fits:
        return
    d, file = q.shape[-1], VERSIONS[version].kernel_file(pass_)
    needed = kernels.shared_bytes(pass_, d)
    available = kernels.device_shared_bytes(q.device)
    if needed > available:
        where = ("this GPU allows" if q.is_cuda else
                 "the CPU emulation allows (it copies the limit of an H100 or H200, kernels/cpu_cuda.h)")
        largest = next((x for x in range(d - 1, 0, -1) if kernels.shared_bytes(pass_, x) <= available), 0)
        sizes = f" with Br = {kernels.Br}, Bc = {kernels.Bc}" if kernels.Br is not None else ""
        raise ValueError(f"head dim d = {d} needs {needed} bytes of shared memory per block in the {pass_} "
                         f"kernel of version {version} (kernels/{file}){sizes}, more than the {available} {where}: "
                         f"it takes d up to {largest}"
                         + (" with these block sizes (smaller block sizes leave room for more in the kernels "
                            "whose tiles follow them)" if sizes else ""))
    _fits.add((kernels, q.device, pass_, d))


def _check_sdpa_only(attn_mask):
    """scaled_dot_product_attention's options that these kernels do not have."""
    if attn_mask is not None:
        raise ValueError("attn_mask: these kernels take no mask tensor; causal=True (or is_causal=True) "
                         "gives the causal mask; mask_mod= (versions 3 and 4) any other")


def _check_dropout(dropout_p):
    """dropout_p as a float in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p = {_short(dropout_p)}: it must be a number in [0, 1)")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p = {dropout_p}: it must be in [0, 1)")
    return float(dropout_p)


_OFFICIAL_DEFAULTS = dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None)


def _at_default(name, value):
    """Is an official option at the official package's default?"""
    default = _OFFICIAL_DEFAULTS[name]
    return (value is None if default is None else
            isinstance(value, (tuple, list)) and tuple(value) == default if name == "window_size" else
            value == default)


def _exactly(value, default):
    """Is an option its default, of its default's type? (-1.0 is not the -1 of a window side, which the
    full check refuses; _at_default, which asks whether a call wants mods at all, compares values.)"""
    return type(value) is type(default) and value == default and (
        not isinstance(default, tuple) or all(type(x) is type(y) for x, y in zip(value, default)))


def _one_of(values):
    """(32, 64, 96) -> '32, 64 or 96'."""
    words = [str(x) for x in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _short(value):
    """A value for an error message: a tensor by its shape, anything else by a repr of one line."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _either(name, value, default, alias, alias_value):
    """An option given under our name (flash-attn's) or under scaled_dot_product_attention's."""
    if alias_value is None:
        return value
    if value is not default and value != alias_value:
        raise ValueError(f"{name} = {value!r} and {alias} = {alias_value!r}: give one of them")
    return alias_value


def _raise_if(error):
    """The extension returns an error message instead of throwing (see kernels/bindings.cu)."""
    if error.endswith(" failed: interrupted"):  # Ctrl-C stopped a CPU launch (kernels/cpu_cuda.h)
        raise KeyboardInterrupt(f"minimal_flash: {error}")
    if error:
        raise RuntimeError(f"minimal_flash: {error}")


# ---------------------------------------------------------------------------------------------
# The mirrors: Algorithms 1 and 4 tile by tile in PyTorch


@dataclass
class Step:
    """What one (j, i) step of Algorithm 1 computed, for the notebooks to inspect."""
    j: int
    i: int
    rows: range  # the query rows of Q_i
    cols: range  # the key rows of K_j, V_j
    S_ij: torch.Tensor
    P_ij: torch.Tensor  # exp(S_ij - m_tilde), unnormalised
    m: torch.Tensor  # running row max of Q_i's rows after this step
    l: torch.Tensor  # running row sum
    O_i: torch.Tensor  # running (normalised) output rows


def mirror_forward(q, k, v, *, causal=False, softmax_scale=None, Br=32, Bc=32, on_step=None):
    """Algorithm 1 in plain PyTorch, with the loop order and names of kernels/flash.cu.
    A tile here is a slice of all (B, H) slices at once; the kernel gives each its own block.
    Calls on_step(Step) after every (j, i) step. Returns (O, L) like forward()."""
    N = q.shape[-2]
    scale = _scale(q, softmax_scale)
    O = torch.zeros_like(q)  # Algorithm 1, line 2
    l = q.new_zeros(q.shape[:-1])
    m = q.new_full(q.shape[:-1], float("-inf"))
    Tr, Tc = math.ceil(N / Br), math.ceil(N / Bc)
    for j in range(Tc):
        cols = range(j * Bc, min(N, (j + 1) * Bc))
        K_j, V_j = k[..., cols.start:cols.stop, :], v[..., cols.start:cols.stop, :]
        for i in range(j * Bc // Br if causal else 0, Tr):  # causal: tiles above the diagonal skipped
            rows = range(i * Br, min(N, (i + 1) * Br))
            r = slice(rows.start, rows.stop)
            S_ij = scale * q[..., r, :] @ K_j.transpose(-2, -1)
            if causal:
                S_ij = S_ij.masked_fill(_above_diagonal(len(rows), len(cols), rows.start, cols.start, q.device),
                                        float("-inf"))
            m_tilde = S_ij.amax(dim=-1)
            # A row that sees no key of this tile has m_tilde = -inf; it gets P = 0, as in the kernel.
            P_ij = torch.where(S_ij == float("-inf"), 0.0, torch.exp(S_ij - m_tilde[..., None]))
            l_tilde = P_ij.sum(dim=-1)
            m_new = torch.maximum(m[..., r], m_tilde)
            alpha = l[..., r] * torch.exp(m[..., r] - m_new)
            beta = torch.exp(m_tilde - m_new)
            l_new = alpha + beta * l_tilde
            O[..., r, :] = (alpha[..., None] * O[..., r, :] + beta[..., None] * (P_ij @ V_j)) / l_new[..., None]
            m[..., r], l[..., r] = m_new, l_new
            if on_step is not None:
                on_step(Step(j, i, rows, cols, S_ij, P_ij, m[..., r].clone(), l[..., r].clone(),
                             O[..., r, :].clone()))
    return O, m + torch.log(l)


@dataclass
class BackwardStep:
    """What one (j, i) step of Algorithm 4 computed, for the notebooks to inspect."""
    j: int
    i: int
    rows: range
    cols: range
    P_ij: torch.Tensor  # exp(S_ij - L_i): the forward's softmax probabilities, recomputed
    dP_ij: torch.Tensor  # dO_i V_j^T
    dS_ij: torch.Tensor  # P_ij * (dP_ij - D_i)
    dK_j: torch.Tensor  # running sums over the Q tiles seen so far
    dV_j: torch.Tensor


def mirror_backward(dO, q, k, v, O, L, *, causal=False, softmax_scale=None, Br=32, Bc=32, on_step=None):
    """Algorithm 4 in plain PyTorch, with the loop order and names of kernels/flash_backward.cu.
    O and L are the forward's outputs. Calls on_step(BackwardStep) after every (j, i) step.
    Returns (dQ, dK, dV) like backward()."""
    N = q.shape[-2]
    scale = _scale(q, softmax_scale)
    D = (dO * O).sum(dim=-1)  # D_i = rowsum(dO_i * O_i), once per row
    dQ, dK, dV = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    Tr, Tc = math.ceil(N / Br), math.ceil(N / Bc)
    for j in range(Tc):
        cols = range(j * Bc, min(N, (j + 1) * Bc))
        c = slice(cols.start, cols.stop)
        K_j, V_j = k[..., c, :], v[..., c, :]
        dK_j, dV_j = torch.zeros_like(K_j), torch.zeros_like(V_j)
        for i in range(j * Bc // Br if causal else 0, Tr):
            rows = range(i * Br, min(N, (i + 1) * Br))
            r = slice(rows.start, rows.stop)
            Q_i, dO_i = q[..., r, :], dO[..., r, :]
            S_ij = scale * Q_i @ K_j.transpose(-2, -1)
            if causal:
                S_ij = S_ij.masked_fill(_above_diagonal(len(rows), len(cols), rows.start, cols.start, q.device),
                                        float("-inf"))
            P_ij = torch.exp(S_ij - L[..., r, None])  # masked scores give exp(-inf) = 0
            dV_j += P_ij.transpose(-2, -1) @ dO_i
            dP_ij = dO_i @ V_j.transpose(-2, -1)
            dS_ij = P_ij * (dP_ij - D[..., r, None])
            dQ[..., r, :] += scale * dS_ij @ K_j
            dK_j += scale * dS_ij.transpose(-2, -1) @ Q_i
            if on_step is not None:
                on_step(BackwardStep(j, i, rows, cols, P_ij, dP_ij, dS_ij, dK_j.clone(), dV_j.clone()))
        dK[..., c, :], dV[..., c, :] = dK_j, dV_j
    return dQ, dK, dV
