"""The model step over a paged KV cache: one ragged batch of tokens from many sequences.

Letters as in tpustack.model.layers, plus T the step's tokens (flattened over sequences),
S the step's sequences, P pages, L page size, M pages per sequence (its block table).

A step's tokens are any mix of prompt chunks and single decode tokens: token t belongs
to sequence seq_T[t] at position positions_T[t]. The model sees them as one row [1, T];
each layer writes their keys/values to page table[seq, pos // L], slot pos % L, then each
token attends, as its own query row, over its sequence's first pos + 1 slots through
tpustack.kernels.paged_attention (Pallas on TPU/GPU, XLA on CPU). Writing before reading
is what makes a prompt chunk see itself causally and the earlier chunks of its prompt.
Padding tokens use an all-null table row: they write to page 0 and read only it.

On XLA (CPU) the engine hands the step a blocked layout instead (`blocked_layout`, built on
the host): attention reads each sequence's pages once, in blocks of kv_block tokens. A row
feeding one token (decode) is one query against its live blocks; a row feeding a chunk is
cut into tiles of query_tile tokens, each against the blocks up to its last position
(causal). Every (query group, block) pair is one work item: its scores, running max and
sum; items combine per query group as in flash-decoding. So a T-token prompt chunk reads
its pages T / query_tile times instead of T times, and no step reads pages past the
longest live context, whatever max_seq_len is. The shapes are the item counts, bucketed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tpustack.config import ModelConfig
from tpustack.infer.sampling import sample_tokens
from tpustack.infer.speculative import accept, propose
from tpustack.kernels import paged_attention, paged_attention_impl
from tpustack.kernels.paged_attention_cpu import tile_attention_cpu, write_slots_cpu
from tpustack.kernels.compat import MASK_VALUE
from tpustack.model.transformer import Decoder

PAGED_DTYPES = ("float32", "bfloat16", "float16")


@struct.dataclass
class PagedLayerCache:
    """One layer's pages [P, L, K, H], plus the step's attention layout: each token's block
    table [T, M] (per-token paged kernel), or the blocked layout of `blocked_layout` (XLA)."""

    k_PLKH: jax.Array
    v_PLKH: jax.Array
    table_TM: jax.Array | None = None
    layout: dict | None = None
    impl: str = struct.field(pytree_node=False, default="auto")
    interpret: bool | None = struct.field(pytree_node=False, default=None)  # None: on CPU only

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array) -> "PagedLayerCache":
        """Scatter the step's keys/values (B == 1) into their pages."""
        size = self.k_PLKH.shape[1]
        pos_T = positions_BT[0]
        if self.layout is not None:
            page_T = self.layout["page_T"]
        else:
            page_T = jnp.take_along_axis(self.table_TM, (pos_T // size)[:, None], axis=1)[:, 0]
        slot_T = pos_T % size
        return self.replace(k_PLKH=_write_slots(self.k_PLKH, page_T, slot_T, k_BTKH[0], self.impl),
                            v_PLKH=_write_slots(self.v_PLKH, page_T, slot_T, v_BTKH[0], self.impl))

    def attend(self, q_BTNH: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """Each token over its own sequence's keys up to and including its position."""
        if self.layout is not None:
            return blocked_attention(q_BTNH[0], self.k_PLKH, self.v_PLKH, self.layout)[None].astype(q_BTNH.dtype)
        out_TNH = paged_attention(q_BTNH[0], self.k_PLKH, self.v_PLKH, self.table_TM, positions_BT[0] + 1,
                                  impl=self.impl, interpret=self.interpret)
        return out_TNH[None].astype(q_BTNH.dtype)


def _write_slots(pages_PLKH: jax.Array, page_T: jax.Array, slot_T: jax.Array, new_TKH: jax.Array,
                 impl: str) -> jax.Array:
    """pages[page_T, slot_T] = new_TKH. A bf16 pool on CPU goes through the native kernel, which
    writes in place: XLA CPU widens a bf16 scatter to f32, copying the whole pool in every layer."""
    P, L, K, H = pages_PLKH.shape
    if pages_PLKH.dtype == jnp.bfloat16 and paged_attention_impl(L, H, pages_PLKH.dtype, impl) == "cpu":
        return write_slots_cpu(pages_PLKH, page_T, slot_T, new_TKH)
    return pages_PLKH.at[page_T, slot_T].set(new_TKH.astype(pages_PLKH.dtype))


def _items_attention(q_XQNH, pos_XQ, k_PLKH, v_PLKH, item_x, item_pages, item_start, count) -> jax.Array:
    """Queries in groups X of Q (rows or tiles) over work items (group x, a block of pages from
    key position start): softmax over each query's keys at or before its position, in f32.

    Items come in `count` (dynamic) chunks of a fixed size; a loop runs only those, folding each
    chunk's scores into running (max, sum, out) per query, so the item arrays can be sized
    for the longest contexts while a step reads only live blocks. Items of group X (padding)
    are dropped; a query with no visible key gets zeros."""
    X, Q, N, H = q_XQNH.shape
    K = k_PLKH.shape[2]
    G = N // K
    chunk = item_chunk(X, Q)
    q_XQKGH = q_XQNH.astype(jnp.float32).reshape(X, Q, K, G, H) * H ** -0.5

    def fold(c, carry):
        m_XKGQ, l_XKGQ, o_XKGQH = carry
        x_I, pages_IB, start_I = (jax.lax.dynamic_slice_in_dim(a, c * chunk, chunk)
                                  for a in (item_x, item_pages, item_start))
        live_I, xc_I = x_I < X, jnp.minimum(x_I, X - 1)
        k_ICKH = k_PLKH[pages_IB].reshape(chunk, -1, K, H).astype(jnp.float32)
        v_ICKH = v_PLKH[pages_IB].reshape(chunk, -1, K, H).astype(jnp.float32)
        C = k_ICKH.shape[1]
        s_IKGQC = jnp.einsum("iqkgh,ickh->ikgqc", q_XQKGH[xc_I], k_ICKH)
        valid_IQC = (start_I[:, None, None] + jnp.arange(C)[None, None, :]) <= pos_XQ[xc_I][:, :, None]
        valid_IQC &= live_I[:, None, None]
        s_IKGQC = jnp.where(valid_IQC[:, None, None], s_IKGQC, MASK_VALUE)
        m_IKGQ = s_IKGQC.max(-1)
        p_IKGQC = jnp.where(valid_IQC[:, None, None], jnp.exp(s_IKGQC - m_IKGQ[..., None]), 0.0)
        o_IKGQH = jnp.einsum("ikgqc,ickh->ikgqh", p_IKGQC, v_ICKH)
        new_XKGQ = jnp.maximum(m_XKGQ, jax.ops.segment_max(m_IKGQ, x_I, num_segments=X))  # padding ids drop
        w_IKGQ = jnp.where(live_I[:, None, None, None], jnp.exp(m_IKGQ - new_XKGQ[xc_I]), 0.0)
        r_XKGQ = jnp.exp(m_XKGQ - new_XKGQ)
        l_XKGQ = l_XKGQ * r_XKGQ + jax.ops.segment_sum(p_IKGQC.sum(-1) * w_IKGQ, x_I, num_segments=X)
        o_XKGQH = o_XKGQH * r_XKGQ[..., None] + jax.ops.segment_sum(o_IKGQH * w_IKGQ[..., None], x_I,
                                                                    num_segments=X)
        return new_XKGQ, l_XKGQ, o_XKGQH

    init = (jnp.full((X, K, G, Q), MASK_VALUE, jnp.float32), jnp.zeros((X, K, G, Q), jnp.float32),
            jnp.zeros((X, K, G, Q, H), jnp.float32))
    _, l_XKGQ, o_XKGQH = jax.lax.fori_loop(0, count, fold, init)
    o_XKGQH = o_XKGQH / jnp.where(l_XKGQ > 0, l_XKGQ, 1.0)[..., None]
    return jnp.transpose(o_XKGQH, (0, 3, 1, 2, 4)).reshape(X, Q, N, H)


def blocked_attention(q_TNH: jax.Array, k_PLKH: jax.Array, v_PLKH: jax.Array, layout: dict) -> jax.Array:
    """The step's attention on XLA from a `blocked_layout`: one-token rows and query tiles, each
    over its sequence's page blocks; [T, N, H] (tokens in neither group, padding, get zeros).
    A native layout (a_table, b_table) hands the one-token rows and the query tiles to the
    native CPU kernels, which read the pages in place.
    A group with no work is skipped on device (lax.cond): gathering the queries of a step's
    34 empty tiles cost ~4 ms a layer in a pure decode step."""
    T, N, H = q_TNH.shape

    def group(g: str, out_TNH: jax.Array) -> jax.Array:
        tok_XQ = layout[f"{g}_tok"]
        q_XQNH = q_TNH[jnp.minimum(tok_XQ, T - 1)]
        if g == "a" and "a_table" in layout:
            o_XQNH = paged_attention(q_XQNH[:, 0], k_PLKH, v_PLKH, layout["a_table"], layout["a_len"],
                                     impl="cpu")[:, None]
        else:
            o_XQNH = _items_attention(q_XQNH, layout[f"{g}_pos"], k_PLKH, v_PLKH, layout[f"{g}_item"],
                                      layout[f"{g}_pages"], layout[f"{g}_start"], layout[f"{g}_count"])
        return out_TNH.at[tok_XQ.reshape(-1)].set(o_XQNH.reshape(-1, N, H).astype(jnp.float32), mode="drop")

    if "b_table" in layout:  # the native tile kernel reads its queries' rows and writes a whole [T, N, H]
        out_TNH = jax.lax.cond(jnp.any(layout["b_pos"] >= 0),
                               lambda: tile_attention_cpu(q_TNH, k_PLKH, v_PLKH, layout["b_table"], layout["b_pos"],
                                                          layout["b_tok"], H ** -0.5),
                               lambda: jnp.zeros((T, N, H), jnp.float32))
        groups = ("a",)
    else:
        out_TNH, groups = jnp.zeros((T, N, H), jnp.float32), ("a", "b")
    for g in groups:
        live = jnp.any(layout["a_len"] > 0) if g == "a" and "a_table" in layout else layout[f"{g}_count"] > 0
        out_TNH = jax.lax.cond(live, lambda o, g=g: group(g, o), lambda o: o, out_TNH)
    return out_TNH


def item_chunk(groups: int, queries: int) -> int:
    """Work items per loop iteration: one per row for one-token rows, one per two tiles for tiles."""
    return max(groups if queries == 1 else groups // 2, 1)


def blocked_layout(rows: list[tuple[int, int, int, list[int]]], tokens: int, seqs: int, page_size: int,
                   kv_block: int, query_tile: int, context: int, null_page: int = 0,
                   native: bool = False) -> dict[str, np.ndarray]:
    """The blocked attention layout of a step (host side, numpy).

    rows: per sequence row, (first step slot, tokens fed, position of the first, block table).
    A row feeding one token is group a (row r: query slot a_tok[r]); a row feeding more is cut
    into tiles of query_tile slots (group b). Work items list, per group, the page blocks of
    kv_block tokens each query group sees, in chunks of `item_chunk`; the arrays hold room for
    every group at the full `context` (so a shape is just (tokens, seqs)), padded with the
    out-of-range group id, and {a,b}_count says how many chunks are live. page_T: the page each
    step slot writes (padding: the null page). With `native` there are no work items: group a
    is each row's block table a_table [seqs, context / page_size] and key count a_len [seqs]
    (0: not a one-token row), group b each tile's row's block table b_table [tiles, context /
    page_size] beside b_pos, for the native CPU kernels, which read the pages in place.
    """
    bp = max(kv_block // page_size, 1)  # pages per block
    span = bp * page_size
    tiles = math.ceil(tokens / query_tile) + min(seqs, tokens // 2)  # a chunk wastes < 1 tile
    page_T = np.full(tokens, null_page, np.int32)
    a_tok, a_pos = np.full((seqs, 1), tokens, np.int32), np.full((seqs, 1), -1, np.int32)
    b_tok, b_pos = np.full((tiles, query_tile), tokens, np.int32), np.full((tiles, query_tile), -1, np.int32)
    items: dict[str, list] = {"a": [], "b": []}
    if native:
        a_table = np.full((seqs, math.ceil(context / page_size)), null_page, np.int32)
        b_table = np.full((tiles, math.ceil(context / page_size)), null_page, np.int32)
        a_len = np.zeros(seqs, np.int32)
    g = 0
    for r, (at, n, p0, table) in enumerate(rows):
        pos = np.arange(p0, p0 + n)
        padded = np.asarray(table + [null_page] * (-len(table) % bp), np.int32)
        page_T[at:at + n] = padded[pos // page_size]
        if n == 1:
            a_tok[r], a_pos[r] = at, p0
            if native:
                a_table[r, :len(table)], a_len[r] = table, p0 + 1
                continue
            items["a"] += [(r, padded[b * bp:(b + 1) * bp], b * span) for b in range(p0 // span + 1)]
            continue
        for j in range(0, n, query_tile):
            m = min(query_tile, n - j)
            b_tok[g, :m], b_pos[g, :m] = np.arange(at + j, at + j + m), pos[j:j + m]
            if native:
                b_table[g, :len(table)] = table
            else:
                items["b"] += [(g, padded[b * bp:(b + 1) * bp], b * span) for b in range(pos[j + m - 1] // span + 1)]
            g += 1
    out = {"page_T": page_T, "a_tok": a_tok, "a_pos": a_pos, "b_tok": b_tok, "b_pos": b_pos}
    if native:  # no work items: the kernels read each row's block table
        out["a_table"], out["a_len"], out["b_table"] = a_table, a_len, b_table
        return out
    blocks = math.ceil(context / span)
    for name, groups, queries in (("a", seqs, 1), ("b", tiles, query_tile)):
        chunk = item_chunk(groups, queries)
        cap = math.ceil(groups * blocks / chunk) * chunk
        x, pages, start = np.full(cap, groups, np.int32), np.full((cap, bp), null_page, np.int32), np.zeros(cap, np.int32)
        live = items[name]
        if live:
            x[:len(live)] = [i[0] for i in live]
            pages[:len(live)] = np.stack([i[1] for i in live])
            start[:len(live)] = [i[2] for i in live]
        out[f"{name}_item"], out[f"{name}_pages"], out[f"{name}_start"] = x, pages, start
        out[f"{name}_count"] = np.int32(math.ceil(len(live) / chunk))
    return out


def init_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype: str = "float32") -> tuple:
    """Zeroed (k, v) pages for every layer."""
    if dtype not in PAGED_DTYPES:
        raise ValueError(f"paged cache dtype {dtype!r} is not one of {PAGED_DTYPES}")
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.heads_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def pages_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype: str = "float32") -> int:
    """Bytes of the pool: 2 (K and V) * layers * pages * L * K * H * itemsize."""
    return 2 * cfg.num_layers * num_pages * page_size * cfg.num_kv_heads * cfg.heads_dim * jnp.dtype(dtype).itemsize


def paged_step(model: Decoder, variables: dict, pages: tuple, tokens_T: jax.Array, positions_T: jax.Array,
               seq_T: jax.Array, tables_SM: jax.Array, last_S: jax.Array, sampling: dict[str, jax.Array],
               impl: str = "auto", interpret: bool | None = None, top_logprobs: int = 0,
               layout: dict | None = None) -> tuple[dict[str, jax.Array], tuple]:
    """Run the step's tokens, sample one token per sequence at its last token.

    Returns ({"next": [S], "logprob": [S], and with top_logprobs > 0 "top_ids",
    "top_logprobs": [S, top_logprobs]}, new pages). Log-probabilities are the model's
    (log_softmax of the raw logits, before temperature and filtering), as OpenAI reports.
    `sampling` holds per-sequence temperature, top_k, top_p and seed [S]; the key of a
    sequence's token at position p is fold_in(key(seed), p), as in the decode loop, so a
    request samples the same tokens whatever shares its steps. With `layout` (XLA: see
    `blocked_layout`) attention runs blocked and seq_T / tables_SM may be None. `variables`:
    {"params": ...}, or `pack_for_cpu`'s (dense weights packed for the native CPU matmul).
    """
    table_TM = None if layout is not None else tables_SM[seq_T]
    caches = tuple(PagedLayerCache(k, v, table_TM, layout, impl, interpret) for k, v in pages)
    logits_BSV, caches = model.apply(variables, tokens_T[None], positions_T[None], cache=caches,
                                     select_BS=last_S[None])
    params_S = {"temperature": sampling["temperature"], "top_k": sampling["top_k"], "top_p": sampling["top_p"],
                "key": jax.vmap(jax.random.key)(sampling["seed"])}
    next_S = sample_tokens(logits_BSV[0], params_S, positions_T[last_S] + 1)
    logits_SV = logits_BSV[0].astype(jnp.float32)
    logprob_S = jnp.take_along_axis(logits_SV, next_S[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits_SV, axis=-1)
    out = {"next": next_S, "logprob": logprob_S}
    if top_logprobs:
        out["top_logprobs"], out["top_ids"] = jax.lax.top_k(jax.nn.log_softmax(logits_SV, axis=-1), top_logprobs)
    return out, tuple((c.k_PLKH, c.v_PLKH) for c in caches)


def speculative_paged_step(target: Decoder, draft: Decoder, params: tuple, pages: tuple, tokens_T: jax.Array,
                           positions_T: jax.Array, seq_T: jax.Array, tables_SM: jax.Array, last_S: jax.Array,
                           spec_S: jax.Array, sampling: dict[str, jax.Array], k: int, impl: str = "auto",
                           interpret: bool | None = None) -> tuple[dict[str, jax.Array], tuple]:
    """`paged_step` where sequences with spec_S decode speculatively (chapter 30.4f).

    A speculating sequence holds k + 1 contiguous step slots from last_S: its pending token,
    then k placeholders for the draft's proposals. The draft runs the whole step once (so
    prompt chunks fill its pages too; the pending token's logits give d_1), then k single
    tokens per sequence (d_i at pos + i, so its pages cover every proposal); the target
    then scores every slot in one pass and the acceptance rule of
    tpustack.infer.speculative picks the committed tokens, with the same key streams, so a
    request commits what SpeculativeGenerator would. Other sequences sample one token as in
    `paged_step`. Both models share the block tables; pages = (target pages, draft pages).
    Returns ({"tokens": [S, k + 1], "count": [S], "accepted": [S]}, pages).
    """
    target_params, draft_params = params
    target_pages, draft_pages = pages
    t, s, r = tokens_T.shape[0], last_S.shape[0], k + 1
    table_TM = tables_SM[seq_T]
    keyed = {"temperature": sampling["temperature"], "top_k": sampling["top_k"], "top_p": sampling["top_p"],
             "key": jax.vmap(jax.random.key)(sampling["seed"])}
    pos_S = positions_T[last_S]  # a speculating sequence's pending position

    caches = tuple(PagedLayerCache(kp, vp, table_TM, None, impl, interpret) for kp, vp in draft_pages)
    logits_BSV, caches = draft.apply({"params": draft_params}, tokens_T[None], positions_T[None], cache=caches,
                                     select_BS=last_S[None])
    spec_tables_SM = jnp.where(spec_S[:, None], tables_SM[:s], 0)  # others write their serial steps to page 0
    caches = tuple(c.replace(table_TM=spec_tables_SM) for c in caches)

    def draft_step(carry, i):
        logits_SV, caches = carry
        proposal_S, q_SV = propose(logits_SV, keyed, pos_S + i)
        logits_BSV, caches = draft.apply({"params": draft_params}, proposal_S[None], (pos_S + i)[None], cache=caches)
        return (logits_BSV[0], caches), (proposal_S, q_SV)

    (_, caches), (drafts_KS, q_KSV) = jax.lax.scan(draft_step, (logits_BSV[0], caches), jnp.arange(1, k + 1))
    draft_pages = tuple((c.k_PLKH, c.v_PLKH) for c in caches)
    drafts_SK, q_SKV = drafts_KS.T, jnp.swapaxes(q_KSV, 0, 1)

    slots_SR = jnp.minimum(last_S[:, None] + jnp.arange(r)[None, :], t - 1)
    fill_SK = jnp.where(spec_S[:, None], slots_SR[:, 1:], t)  # t: dropped
    tokens_T = tokens_T.at[fill_SK].set(drafts_SK, mode="drop")
    caches = tuple(PagedLayerCache(kp, vp, table_TM, None, impl, interpret) for kp, vp in target_pages)
    logits_BXV, caches = target.apply({"params": target_params}, tokens_T[None], positions_T[None], cache=caches,
                                      select_BS=slots_SR.reshape(1, s * r))
    logits_SRV = logits_BXV[0].reshape(s, r, -1)
    target_pages = tuple((c.k_PLKH, c.v_PLKH) for c in caches)

    new_SR, n_S = accept(logits_SRV, q_SKV, drafts_SK, keyed, pos_S)

    plain_S = sample_tokens(logits_SRV[:, 0], keyed, pos_S + 1)  # sequences not speculating
    tokens_SR = jnp.where(spec_S[:, None], new_SR, jnp.zeros_like(new_SR).at[:, 0].set(plain_S))
    out = {"tokens": tokens_SR, "count": jnp.where(spec_S, n_S + 1, 1), "accepted": jnp.where(spec_S, n_S, 0)}
    return out, (target_pages, draft_pages)
