"""fastattn.flash_attn against flash-attn 2.8's documented contract (flash_attn_interface docstrings).

Each test states what flash-attn's docstring says and checks ours against a plain PyTorch
computation of exactly that, written here in flash-attn's (batch, seqlen, heads, headdim) layout
(``explicit``: scores, the documented bias and mask, softmax), independent of fastattn's reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastattn import flash_attn as fa
from conftest import assert_close

ATOL, RTOL = 2e-5, 1e-4


def explicit(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None,
             key_valid=None, dropout_keep=None, dropout_p=0.0, return_probs=False):
    """flash-attn's documented attention, materialised: q (B, Nq, H, D), k/v (B, Nk, Hk, D).

    Query i sees key j iff i + Nk - Nq - left <= j <= i + Nk - Nq + right (causal: right = 0),
    ALiBi adds -slope * |i + Nk - Nq - j|, a soft-cap makes the scaled score softcap * tanh(s / softcap);
    rows that see nothing give 0. key_valid (B, Nk) bool hides keys (and defines Nk per row: as
    flash-attn's kvcache test, positions count from the first valid key). dropout_keep (B, H, Nq, Nk)
    bool: the kept weights, rescaled by 1 / (1 - dropout_p). return_probs: also the softmax (B, H, Nq, Nk).
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    k = k.double().repeat_interleave(H // Hk, dim=2)
    v = v.double().repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    out_rows, probs = [], []
    for b in range(B):
        valid = key_valid[b] if key_valid is not None else torch.ones(Nk, dtype=torch.bool)
        first = int(valid.nonzero()[0]) if valid.any() else 0
        nk = int(valid.sum())
        jj = j - first  # positions from the first valid key (flash-attn's cache_leftpad)
        d = i + nk - Nq
        keep = valid[None, :].expand(Nq, Nk).clone()
        if left >= 0:
            keep &= jj >= d - left
        if right >= 0:
            keep &= jj <= d + right
        sb = s[b].clone()
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            sb = sb - slopes.double()[:, None, None] * (d - jj).abs()
        sb = sb.masked_fill(~keep, float("-inf"))
        p = torch.softmax(sb, -1).nan_to_num(0.0)
        probs.append(p)
        if dropout_keep is not None:
            p = p * dropout_keep[b] / (1 - dropout_p)
        out_rows.append(torch.einsum("hij,jhd->ihd", p, v[b]))
    return (torch.stack(out_rows), torch.stack(probs)) if return_probs else torch.stack(out_rows)


def rand(*shape, requires_grad=False):
    return torch.randn(*shape).requires_grad_(requires_grad)


def test_causal_is_aligned_bottom_right_as_documented():
    """"If seqlen_q = 2 and seqlen_k = 5, the causal mask is 1 1 1 1 0 / 1 1 1 1 1. If seqlen_q = 5 and
    seqlen_k = 2: 0 0 / 0 0 / 0 0 / 1 0 / 1 1. If the row of the mask is all zero, the output will be zero.\""""
    def visible(nq, nk):  # zero keys: uniform weights over the visible ones; one-hot values read them off
        v = torch.zeros(1, nk, 1, 8)
        v[0, :, 0, :nk] = torch.eye(nk)
        out = fa.flash_attn_func(rand(1, nq, 1, 8), torch.zeros(1, nk, 1, 8), v, causal=True)
        return (out[0, :, 0, :nk] > 0).int().tolist()

    assert visible(2, 5) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible(5, 2) == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


@pytest.mark.parametrize("Nq,Nk", [(7, 7), (5, 13), (13, 5), (1, 40)])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(3, 2)), dict(window_size=(4, 0)),
                                dict(causal=True, window_size=(6, 9)), dict(softcap=2.0), dict(alibi="heads"),
                                dict(alibi="batch", causal=True), dict(softmax_scale=0.3)],
                         ids=["plain", "causal", "window", "window-left", "causal-window", "softcap", "alibi",
                              "alibi-batch-causal", "scale"])
def test_flash_attn_func_matches_the_documented_semantics(Nq, Nk, kw):
    torch.manual_seed(Nq * 31 + Nk)
    B, H, Hk, D = 2, 4, 2, 16
    kw = dict(kw)
    if kw.get("alibi"):
        kw["alibi_slopes"] = torch.rand((H,) if kw.pop("alibi") == "heads" else (B, H)) * 0.3
    q, k, v = rand(B, Nq, H, D, requires_grad=True), rand(B, Nk, Hk, D, requires_grad=True), rand(B, Nk, Hk, D)
    v.requires_grad_(True)
    out = fa.flash_attn_func(q, k, v, **kw)
    assert out.shape == (B, Nq, H, D)
    scale = kw.pop("softmax_scale", None)
    want = explicit(q.detach(), k.detach(), v.detach(), scale=scale, **kw)
    assert_close("out", out, want, atol=ATOL, rtol=RTOL)
    # gradients: the same computation in float64 through autograd
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    g = torch.randn_like(out)
    mine = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(explicit(*leaves, scale=scale, **kw), leaves, g.double())
    for name, a, b in zip(("dq", "dk", "dv"), mine, theirs):
        assert_close(name, a, b, atol=5e-5, rtol=1e-4)


def test_return_attn_probs_gives_out_the_documented_lse_and_s_dmask():
    """"softmax_lse: (batch_size, nheads, seqlen). The logsumexp of each row of the matrix QK^T * scaling";
    "S_dmask: (batch_size, nheads, seqlen, seqlen). The output of softmax (possibly with different
    scaling). It also encodes the dropout pattern (negative means that location was dropped,
    nonnegative means it was kept)." Without dropout, ours is exp(s - rowmax(s)): the softmax scaled
    so each row's largest weight is 1, i.e. flash-attn's scaling for a single key block (exact-sized)."""
    q, k, v = rand(2, 6, 4, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    kw = dict(causal=True, window_size=(3, 0), softcap=2.0)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert lse.shape == (2, 4, 6) and lse.dtype == torch.float32
    want, probs = explicit(q, k, v, return_probs=True, **kw)
    scores = 2.0 * torch.tanh(torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, 2)) / math.sqrt(8) / 2.0)
    visible = probs > 0
    assert_close("lse", lse, torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1), atol=1e-5, rtol=1e-5)
    assert s_dmask.shape == (2, 4, 6, 9) and s_dmask.dtype == q.dtype
    row_max = scores.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    assert_close("S_dmask", s_dmask, torch.exp(scores - row_max).masked_fill(~visible, 0.0), atol=1e-6, rtol=1e-5)
    assert fa._get_block_size_n(q.device, 8, False, True) >= 9  # one block: the scaling above
    assert_close("out", out, fa.flash_attn_func(q, k, v, **kw), atol=0, rtol=0)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_s_dmask_encodes_the_dropout_pattern(varlen):
    """With dropout, S_dmask's sign is the call's own dropout mask: the output is the explicit attention with
    exactly those weights dropped (flash-attn's own tests check their kernels this way), at about rate p."""
    torch.manual_seed(5)
    p = 0.3
    if not varlen:
        q, k, v = rand(2, 40, 4, 16), rand(2, 70, 2, 16), rand(2, 70, 2, 16)
        out, _, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
        keep = s_dmask >= 0
        want, probs = explicit(q, k, v, causal=True, dropout_keep=keep, dropout_p=p, return_probs=True)
        assert_close("out", out, want, atol=ATOL, rtol=RTOL)
        assert_close("|S_dmask|", s_dmask.abs(), probs / probs.amax(-1, keepdim=True).clamp_min(1e-30), atol=1e-6,
                     rtol=1e-5)
        visible = probs > 0
    else:
        lens_q, lens_k = [30, 0, 45], [50, 3, 45]
        q, cu_q = _varlen(lens_q, 4, 16)
        k, cu_k = _varlen(lens_k, 2, 16)
        v = rand(sum(lens_k), 2, 16)
        out, _, s_dmask = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 45, 50, dropout_p=p, causal=True,
                                                    return_attn_probs=True)
        assert s_dmask.shape == (3, 4, 45, 50)
        visible = torch.zeros(s_dmask.shape, dtype=torch.bool)
        for b in range(3):
            sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            nq, nk = lens_q[b], lens_k[b]
            assert torch.all(s_dmask[b, :, nq:] == 0) and torch.all(s_dmask[b, :, :, nk:] == 0)
            keep = s_dmask[b:b + 1, :, :nq, :nk] >= 0
            want, probs = explicit(q[None, sq], k[None, sk], v[None, sk], causal=True, dropout_keep=keep,
                                   dropout_p=p, return_probs=True)
            assert_close(f"out seq {b}", out[sq], want[0], atol=ATOL, rtol=RTOL)
            visible[b, :, :nq, :nk] = probs[0] > 0
    dropped = ((s_dmask < 0) & visible).sum() / visible.sum()
    assert abs(float(dropped) - p) < 0.03, float(dropped)


def test_packed_functions_equal_the_unpacked_ones_and_their_gradients_reach_the_pack():
    torch.manual_seed(1)
    qkv = rand(2, 11, 3, 4, 16, requires_grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(5, 0))
    q, k, v = (qkv.detach()[:, :, i].clone().requires_grad_(True) for i in range(3))
    ref = fa.flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
    assert_close("qkvpacked", out, ref, atol=0, rtol=0)
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    assert_close("dqkv", dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), g), dim=2), atol=0, rtol=0)

    q = rand(2, 5, 4, 16)
    kv = rand(2, 9, 2, 2, 16)
    assert_close("kvpacked", fa.flash_attn_kvpacked_func(q, kv, causal=True),
                 fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True), atol=0, rtol=0)


def _varlen(lens, H, D):
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return rand(total, H, D), cu


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(2, 1)), dict(alibi=True, softcap=3.0)],
                         ids=["causal", "window", "alibi-softcap"])
def test_varlen_functions_are_per_sequence_dense_calls(kw):
    """varlen: the same semantics within each sequence (causal bottom-right per sequence)."""
    torch.manual_seed(2)
    lens_q, lens_k = [3, 0, 7, 1], [5, 4, 7, 9]
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(4, 4) * 0.3
    q, cu_q = _varlen(lens_q, 4, 16)
    k, cu_k = _varlen(lens_k, 2, 16)
    v = rand(sum(lens_k), 2, 16)
    out, lse, s_dmask = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                  return_attn_probs=True, **kw)
    assert lse.shape == (4, sum(lens_q)) and s_dmask.shape == (4, 4, max(lens_q), max(lens_k))
    for b in range(4):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        per = dict(kw)
        if "alibi_slopes" in per:
            per["alibi_slopes"] = per["alibi_slopes"][b]
        want = explicit(q[None, sq], k[None, sk], v[None, sk], **per)[0]
        assert_close(f"sequence {b}", out[sq], want, atol=ATOL, rtol=RTOL)
    kv = torch.stack((k, v), dim=1)
    assert_close("varlen kvpacked", fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lens_q), max(lens_k),
                                                                        **kw), out, atol=0, rtol=0)
    qkv, cu = _varlen([4, 6], 2, 8)
    qkv = rand(10, 3, 2, 8)
    assert_close("varlen qkvpacked", fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, causal=True),
                 fa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 6, 6, causal=True), atol=0, rtol=0)


def test_varlen_with_a_block_table_reads_the_pages():
    torch.manual_seed(3)
    page, lens_k = 4, [6, 9]
    k_pages, v_pages = rand(8, page, 2, 16), rand(8, page, 2, 16)
    table = torch.tensor([[5, 2, 0], [1, 7, 3]], dtype=torch.int32)
    q, cu_q = _varlen([2, 3], 2, 16)
    cu_k = torch.tensor([0, 6, 15], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 3, 9, causal=True, block_table=table)
    k = torch.cat([k_pages[table[b].long()].reshape(-1, 2, 16)[:n] for b, n in enumerate(lens_k)])
    v = torch.cat([v_pages[table[b].long()].reshape(-1, 2, 16)[:n] for b, n in enumerate(lens_k)])
    assert_close("paged", out, fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 9, causal=True), atol=0, rtol=0)


def test_deterministic_is_accepted_and_dropout_runs():
    torch.manual_seed(4)
    q, k, v = (rand(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    a = fa.flash_attn_func(q, k, v, dropout_p=0.3, deterministic=True)
    torch.manual_seed(5)
    b = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, fa.flash_attn_func(q, k, v))
    a.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------------------------
def rotary_reference(x, cos, sin, positions, interleaved):
    """flash-attn's apply_rotary_emb, written out per element: x (B, N, H, D) at positions (B, N)."""
    out = x.clone().double()
    rd = 2 * cos.shape[1]
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            c, s = cos[positions[b, n]].double(), sin[positions[b, n]].double()
            for t in range(rd // 2):
                i0, i1 = (2 * t, 2 * t + 1) if interleaved else (t, t + rd // 2)
                x0, x1 = x[b, n, :, i0].double(), x[b, n, :, i1].double()
                out[b, n, :, i0] = x0 * c[t] - x1 * s[t]
                out[b, n, :, i1] = x0 * s[t] + x1 * c[t]
    return out.to(x.dtype)


@pytest.mark.parametrize("new_kv", [False, True])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (5, 0)), (False, (3, 2))])
@pytest.mark.parametrize("extras", ["plain", "batch_idx", "leftpad", "paged", "alibi"])
def test_kvcache_appends_in_place_and_attends_over_the_cache(new_kv, causal, window, extras):
    """"If k and v are not None, k_cache and v_cache will be updated *inplace* with the new values from k and v",
    starting at cache_seqlens; q then attends to the cache up to cache_seqlens + seqlen_new (from cache_leftpad),
    causal/local aligned bottom-right; cache_batch_idx picks the cache rows; block_table pages the cache."""
    torch.manual_seed(7)
    B, H, Hk, D, Nq, S = 2, 4, 2, 16, 3, 24
    batch_cache = 3 if extras == "batch_idx" else B
    k_cache, v_cache = rand(batch_cache, S, Hk, D), rand(batch_cache, S, Hk, D)
    q = rand(B, Nq, H, D)
    n_new = 2 if new_kv else 0
    k_new, v_new = (rand(B, n_new, Hk, D), rand(B, n_new, Hk, D)) if new_kv else (None, None)
    cache_seqlens = torch.tensor([9, 17], dtype=torch.int32)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32) if extras == "batch_idx" else None
    leftpad = torch.tensor([3, 0], dtype=torch.int32) if extras == "leftpad" else None
    slopes = torch.rand(B, H) * 0.3 if extras == "alibi" else None
    rows = batch_idx.long() if batch_idx is not None else torch.arange(B)
    # what the cache must hold afterwards, and what q must see
    k_ref, v_ref = k_cache[rows].clone(), v_cache[rows].clone()
    for b in range(B):
        s = int(cache_seqlens[b])
        if new_kv:
            k_ref[b, s:s + n_new], v_ref[b, s:s + n_new] = k_new[b], v_new[b]
    valid = torch.arange(S)[None, :] < (cache_seqlens.long() + n_new)[:, None]
    if leftpad is not None:
        valid &= torch.arange(S)[None, :] >= leftpad.long()[:, None]
    kw = dict(cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx, cache_leftpad=leftpad, causal=causal,
              window_size=window, alibi_slopes=slopes, return_softmax_lse=True)
    if extras == "paged":
        page = 8
        table = torch.tensor([[4, 1, 6], [0, 5, 2]], dtype=torch.int32)
        k_pages, v_pages = rand(7, page, Hk, D), rand(7, page, Hk, D)
        for b in range(B):
            k_pages[table[b].long()] = k_cache[b].reshape(3, page, Hk, D)
            v_pages[table[b].long()] = v_cache[b].reshape(3, page, Hk, D)
        out, lse = fa.flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, block_table=table, **kw)
        k_after = torch.stack([k_pages[table[b].long()].reshape(S, Hk, D) for b in range(B)])
        v_after = torch.stack([v_pages[table[b].long()].reshape(S, Hk, D) for b in range(B)])
    else:
        out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
        k_after, v_after = k_cache[rows], v_cache[rows]
    assert torch.equal(k_after, k_ref) and torch.equal(v_after, v_ref)
    want = explicit(q, k_ref, v_ref, causal=causal, window_size=window, alibi_slopes=slopes, key_valid=valid)
    assert out.shape == (B, Nq, H, D) and lse.shape == (B, H, Nq)
    assert_close("out", out, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary_rotates_k_at_its_positions_and_q_as_documented(interleaved, causal):
    """"The key k will be rotated by rotary_cos and rotary_sin at indices cache_seqlens, cache_seqlens + 1, etc.
    If causal or local, the query q will be rotated at indices cache_seqlens, cache_seqlens + 1, etc. If not
    causal and not local, ... at indices cache_seqlens only"; rotary_interleaved combines dims 0 & 1, 2 & 3
    (True) or 0 & rotary_dim / 2 (False, GPT-NeoX); dims past rotary_dim are untouched."""
    torch.manual_seed(8)
    B, H, D, Nq, S, rd = 2, 2, 32, 2, 20, 16
    k_cache, v_cache = rand(B, S, H, D), rand(B, S, H, D)
    q, k_new, v_new = rand(B, Nq, H, D), rand(B, Nq, H, D), rand(B, Nq, H, D)
    angle = torch.rand(S, rd // 2) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    seqlens = torch.tensor([4, 11], dtype=torch.int32)
    positions = seqlens.long()[:, None] + torch.arange(Nq)[None, :]
    k_rot = rotary_reference(k_new, cos, sin, positions, interleaved)
    q_positions = positions if causal else seqlens.long()[:, None].expand(B, Nq)
    q_rot = rotary_reference(q, cos, sin, q_positions, interleaved)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    for b in range(B):
        s = int(seqlens[b])
        k_ref[b, s:s + Nq], v_ref[b, s:s + Nq] = k_rot[b], v_new[b]
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                     cache_seqlens=seqlens, causal=causal, rotary_interleaved=interleaved)
    assert_close("k_cache", k_cache, k_ref, atol=1e-6, rtol=1e-6)
    valid = torch.arange(S)[None, :] < (seqlens.long() + Nq)[:, None]
    assert_close("out", out, explicit(q_rot, k_ref, v_ref, causal=causal, key_valid=valid), atol=ATOL, rtol=RTOL)


def test_kvcache_int_seqlens_and_no_new_tokens_reads_the_cache():
    k_cache, v_cache, q = rand(2, 10, 2, 8), rand(2, 10, 2, 8), rand(2, 1, 2, 8)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True)
    assert_close("out", out, fa.flash_attn_func(q, k_cache[:, :6], v_cache[:, :6], causal=True), atol=0, rtol=0)
    full = fa.flash_attn_with_kvcache(q, k_cache, v_cache)  # no cache_seqlens: the whole cache
    assert_close("out", full, fa.flash_attn_func(q, k_cache, v_cache), atol=0, rtol=0)


def test_kvcache_refuses_an_overflowing_append():
    k_cache, v_cache, q = rand(1, 8, 1, 8), rand(1, 8, 1, 8), rand(1, 2, 1, 8)
    with pytest.raises(ValueError, match="the cache holds 8 tokens"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, rand(1, 2, 1, 8), rand(1, 2, 1, 8), cache_seqlens=7)
