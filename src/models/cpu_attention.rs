//! Decode attention on CPU in f32 straight over the engine's slot cache: every sequence of a decode
//! step (one new token each) attends to its own slot in place, whatever the slot order, without
//! gathering, masks or candle's small batched matmuls (which cost more in dispatch than in math at
//! decode sizes: 3 query rows x 64 x a few hundred keys per KV head).
//!
//! Per sequence and KV head: `scores[r, j] = q[r] . k[j] * scale` (soft-capped for Gemma2) for the
//! keys `j` the query may see (`0..=pos`, or the sliding window), softmax over `j`, then
//! `out[r] = sum_j w[r, j] v[j]`. Each sequence is computed the same way alone or in any batch, so, with
//! the packed projections, decode logits are bit-identical whatever the batch mates.
//!
//! The loops are plain Rust over 16-lane accumulators, compiled a second time with AVX-512 enabled and
//! picked at run time (the default x86-64 target only has SSE2).

use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::engine::kv_cache::SlotLayout;
use crate::models::cpu_matmul::cpu_has_avx512f;
use crate::models::layers::AttnSpec;
use crate::models::SeqChunk;

/// Lanes of the partial sums (one AVX-512 vector of f32).
const LANES: usize = 16;
/// Below this many multiply-adds a step's attention runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Whether [`decode_attention`] handles tensors of this device and dtype.
pub(crate) fn applies(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// Attention of one-token sequences: `q` `(seqs, num_heads, head_dim)` (any layout), caches
/// `(slots, kv_heads, max_ctx, head_dim)` contiguous f32 with each sequence's keys at positions
/// `0..=seq.start_pos` of its slot. Returns `(seqs, num_heads * head_dim)`.
pub(crate) fn decode_attention(
    q: &Tensor,
    seqs: &[SeqChunk],
    k_cache: &Tensor,
    v_cache: &Tensor,
    spec: &AttnSpec,
) -> Result<Tensor> {
    let queries = q.flatten_all()?.to_vec1::<f32>()?; // (seqs, heads, hd)
    decode_attention_rows(&queries, seqs, k_cache, v_cache, spec)
}

/// [`decode_attention`] with the queries as host values `(seqs, num_heads * head_dim)` (the CPU
/// decode path has them so already). Returns a CPU tensor `(seqs, num_heads * head_dim)`.
pub(crate) fn decode_attention_rows(
    queries: &[f32],
    seqs: &[SeqChunk],
    k_cache: &Tensor,
    v_cache: &Tensor,
    spec: &AttnSpec,
) -> Result<Tensor> {
    let (heads, kv_heads, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
    if queries.len() != seqs.len() * heads * hd {
        bail!(
            "decode attention: q has {} values, expected {} seqs x {heads} heads x {hd}",
            queries.len(),
            seqs.len()
        );
    }
    let (k_storage, k_layout) = k_cache.storage_and_layout();
    let (v_storage, v_layout) = v_cache.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(k_all)), Storage::Cpu(CpuStorage::F32(v_all))) =
        (&*k_storage, &*v_storage)
    else {
        bail!("decode attention needs f32 caches on the CPU");
    };
    let (Some((k_start, k_end)), Some((v_start, v_end))) =
        (k_layout.contiguous_offsets(), v_layout.contiguous_offsets())
    else {
        bail!("decode attention needs contiguous caches");
    };
    let (slots, cache_kv_heads, max_ctx, cache_hd) = k_cache.dims4()?;
    if (cache_kv_heads, cache_hd) != (kv_heads, hd) || v_cache.dims4()? != k_cache.dims4()? {
        bail!(
            "decode attention: cache shape {:?} does not fit the layer",
            k_cache.dims()
        );
    }
    for seq in seqs {
        if seq.len != 1 || seq.slot >= slots || seq.start_pos >= max_ctx {
            bail!("decode attention: {seq:?} is not a one-token step inside the cache");
        }
    }
    let cache = CacheView {
        keys: &k_all[k_start..k_end],
        values: &v_all[v_start..v_end],
        layout: SlotLayout {
            kv_heads,
            max_ctx,
            head_dim: hd,
        },
    };
    let row = heads * hd;
    let mut out = vec![0f32; seqs.len() * row];
    let macs: usize = seqs.iter().map(|s| 2 * (s.start_pos + 1) * row).sum();
    // Checked once per call, not per sequence.
    let avx512 = cpu_has_avx512f();
    let run = |(index, out_row): (usize, &mut [f32])| {
        let query = &queries[index * row..(index + 1) * row];
        one_sequence(avx512, query, &seqs[index], &cache, spec, out_row);
    };
    if macs < PARALLEL_MIN_MACS || candle_core::utils::get_num_threads() <= 1 {
        out.chunks_mut(row).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(row).enumerate().for_each(run);
    }
    Tensor::from_vec(out, (seqs.len(), row), k_cache.device())
}

/// The caches of one layer as flat slices of `layout`.
struct CacheView<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    layout: SlotLayout,
}

impl CacheView<'_> {
    /// Offset of `(slot, head, 0, 0)`.
    fn base(&self, slot: usize, head: usize) -> usize {
        self.layout.offset(slot, head, 0)
    }
}

/// Attention of one sequence's token: `query` `(heads, hd)` into `out` `(heads * hd)`; `avx512` is
/// [`cpu_has_avx512f`].
fn one_sequence(
    avx512: bool,
    query: &[f32],
    seq: &SeqChunk,
    cache: &CacheView<'_>,
    spec: &AttnSpec,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (`cpu_has_avx512f`); `decode_attention` checked that the
        // query, output and the sequence's cache rows are inside their buffers.
        if avx512 && unsafe { avx512::one_sequence(query, seq, cache, spec, out) } {
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx512;
    one_sequence_portable(query, seq, cache, spec, out);
}

/// The positions a decode token at `pos` attends to: `first..=pos`.
fn first_visible(pos: usize, spec: &AttnSpec) -> usize {
    match spec.sliding_window {
        Some(window) => (pos + 1).saturating_sub(window),
        None => 0,
    }
}

/// Portable attention of one sequence (any head size).
fn one_sequence_portable(
    query: &[f32],
    seq: &SeqChunk,
    cache: &CacheView<'_>,
    spec: &AttnSpec,
    out: &mut [f32],
) {
    let hd = cache.layout.head_dim;
    let n_rep = spec.num_heads / spec.num_kv_heads;
    let pos = seq.start_pos;
    let first = first_visible(pos, spec);
    let visible = pos + 1 - first;
    let mut weights = vec![0f32; visible];
    for kv_head in 0..spec.num_kv_heads {
        let base = cache.base(seq.slot, kv_head);
        let keys = &cache.keys[base + first * hd..base + (pos + 1) * hd];
        let values = &cache.values[base + first * hd..base + (pos + 1) * hd];
        for rep in 0..n_rep {
            let head = kv_head * n_rep + rep;
            let q = &query[head * hd..(head + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (w, key) in weights.iter_mut().zip(keys.chunks_exact(hd)) {
                let mut score = dot(q, key) * spec.scale as f32;
                if let Some(cap) = spec.softcap {
                    let cap = cap as f32;
                    score = (score / cap).tanh() * cap;
                }
                *w = score;
                max = max.max(score);
            }
            let mut total = 0f32;
            for w in weights.iter_mut() {
                *w = (*w - max).exp();
                total += *w;
            }
            let o = &mut out[head * hd..(head + 1) * hd];
            o.fill(0.0);
            for (w, value) in weights.iter().zip(values.chunks_exact(hd)) {
                let w = w / total;
                for (acc, v) in o.iter_mut().zip(value) {
                    *acc += w * v;
                }
            }
        }
    }
}

/// The AVX-512 attention of one sequence, for head sizes that are whole vectors (16 to 256 lanes).
///
/// Per query head: scores four keys at a time (`head_dim / 16` FMAs into one accumulator per key,
/// then a fixed-order lane reduction), a vectorized max, `exp` and sum, weights divided by the sum,
/// and `out = sum_j w_j v_j` in registers (two interleaved accumulator sets for `head_dim <= 128`).
/// The query heads of a KV group read the same keys and values, which stay in L1 after the first.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_div_ps, _mm512_fmadd_ps, _mm512_loadu_ps,
        _mm512_mask_blend_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_max_ps,
        _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps, _mm512_sub_ps, _mm_prefetch, _MM_HINT_T0,
    };

    use super::{first_visible, CacheView, LANES};
    use crate::models::cpu_elementwise::avx512::{exp, first_lanes};
    use crate::models::layers::AttnSpec;
    use crate::models::SeqChunk;

    /// Runs [`run`] for this head size and returns `true`, or returns `false` (nothing written) when
    /// the head size is not 16 to 256 in steps of 16.
    ///
    /// # Safety
    /// AVX-512F; `query` and `out` hold `num_heads * head_dim` values and the sequence's slot holds
    /// positions `0..=seq.start_pos` (checked by `decode_attention`).
    pub(super) unsafe fn one_sequence(
        query: &[f32],
        seq: &SeqChunk,
        cache: &CacheView<'_>,
        spec: &AttnSpec,
        out: &mut [f32],
    ) -> bool {
        if !cache.layout.head_dim.is_multiple_of(LANES) {
            return false;
        }
        macro_rules! by_vectors {
            ($($v:literal)*) => {
                match cache.layout.head_dim / LANES {
                    $($v => run::<$v>(query, seq, cache, spec, out),)*
                    _ => return false,
                }
            };
        }
        by_vectors!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
        true
    }

    /// Attention with `head_dim = 16 V`.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const V: usize>(
        query: &[f32],
        seq: &SeqChunk,
        cache: &CacheView<'_>,
        spec: &AttnSpec,
        out: &mut [f32],
    ) {
        let hd = V * LANES;
        let n_rep = spec.num_heads / spec.num_kv_heads;
        let pos = seq.start_pos;
        let first = first_visible(pos, spec);
        let visible = pos + 1 - first;
        let scale = spec.scale as f32;
        // Room for whole vectors: the softmax passes read and write full 16-lane blocks.
        let mut weights = vec![0f32; visible.next_multiple_of(LANES)];
        for kv_head in 0..spec.num_kv_heads {
            let base = cache.base(seq.slot, kv_head);
            let keys = &cache.keys[base + first * hd..base + (pos + 1) * hd];
            let values = &cache.values[base + first * hd..base + (pos + 1) * hd];
            // The next KV head's keys, fetched while the last query head of this group sums values.
            let next_keys = (kv_head + 1 < spec.num_kv_heads).then(|| {
                let next = cache.base(seq.slot, kv_head + 1);
                &cache.keys[next + first * hd..next + (pos + 1) * hd]
            });
            for rep in 0..n_rep {
                let head = kv_head * n_rep + rep;
                let q = &query[head * hd..(head + 1) * hd];
                // The first query head of the group fetches the values while it scores the keys.
                let ahead = (rep == 0).then_some(values);
                scores::<V>(q, keys, ahead, scale, &mut weights[..visible]);
                if let Some(cap) = spec.softcap {
                    let cap = cap as f32;
                    for w in &mut weights[..visible] {
                        *w = (*w / cap).tanh() * cap;
                    }
                }
                softmax(&mut weights, visible);
                let ahead = if rep + 1 == n_rep { next_keys } else { None };
                weighted_sum::<V>(
                    &weights[..visible],
                    values,
                    ahead,
                    &mut out[head * hd..(head + 1) * hd],
                );
            }
        }
    }

    /// Asks for row `j` of `rows` (`hd`-wide, `16 V` f32 = `V` cache lines) to be brought into L1.
    #[inline(always)]
    unsafe fn prefetch_row<const V: usize>(rows: Option<&[f32]>, j: usize) {
        if let Some(rows) = rows {
            if (j + 1) * V * LANES <= rows.len() {
                let row = rows.as_ptr().add(j * V * LANES);
                for c in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(c * LANES).cast::<i8>());
                }
            }
        }
    }

    /// `scores[j] = (q . keys[j]) * scale` for each `hd`-wide key row; fetches row `j` of `ahead`
    /// alongside key `j` (one cache stream more in flight for the next pass).
    #[inline(always)]
    unsafe fn scores<const V: usize>(
        q: &[f32],
        keys: &[f32],
        ahead: Option<&[f32]>,
        scale: f32,
        scores: &mut [f32],
    ) {
        let hd = V * LANES;
        let mut qv = [_mm512_setzero_ps(); V];
        for (c, lane) in qv.iter_mut().enumerate() {
            *lane = _mm512_loadu_ps(q.as_ptr().add(c * LANES));
        }
        let dot = |key: *const f32| {
            let mut acc = _mm512_setzero_ps();
            for (c, lane) in qv.iter().enumerate() {
                acc = _mm512_fmadd_ps(*lane, _mm512_loadu_ps(key.add(c * LANES)), acc);
            }
            acc
        };
        let n = scores.len();
        let k = keys.as_ptr();
        let mut j = 0;
        // Four keys in flight: independent chains hide the load and FMA latency.
        while j + 4 <= n {
            for u in 0..4 {
                prefetch_row::<V>(ahead, j + u);
            }
            let acc = [
                dot(k.add(j * hd)),
                dot(k.add((j + 1) * hd)),
                dot(k.add((j + 2) * hd)),
                dot(k.add((j + 3) * hd)),
            ];
            for (u, a) in acc.iter().enumerate() {
                scores[j + u] = _mm512_reduce_add_ps(*a) * scale;
            }
            j += 4;
        }
        while j < n {
            prefetch_row::<V>(ahead, j);
            scores[j] = _mm512_reduce_add_ps(dot(k.add(j * hd))) * scale;
            j += 1;
        }
    }

    /// Softmax over the first `visible` entries of `weights` (its length a multiple of 16).
    #[inline(always)]
    unsafe fn softmax(weights: &mut [f32], visible: usize) {
        let blocks = visible.div_ceil(LANES);
        let p = weights.as_mut_ptr();
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for b in 0..blocks {
            let mask = first_lanes(visible - b * LANES);
            let lanes = _mm512_maskz_loadu_ps(mask, p.add(b * LANES));
            max = _mm512_max_ps(max, _mm512_mask_blend_ps(mask, max, lanes));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut total = _mm512_setzero_ps();
        for b in 0..blocks {
            let mask = first_lanes(visible - b * LANES);
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(b * LANES)), max));
            let e = _mm512_mask_blend_ps(mask, _mm512_setzero_ps(), e);
            _mm512_storeu_ps(p.add(b * LANES), e);
            total = _mm512_add_ps(total, e);
        }
        let total = _mm512_set1_ps(_mm512_reduce_add_ps(total));
        for b in 0..blocks {
            let mask = first_lanes(visible - b * LANES);
            let w = _mm512_div_ps(_mm512_loadu_ps(p.add(b * LANES)), total);
            _mm512_mask_storeu_ps(p.add(b * LANES), mask, w);
        }
    }

    /// `out = sum_j weights[j] values[j]` over `hd`-wide value rows; fetches row `j` of `ahead`
    /// alongside value `j`.
    #[inline(always)]
    unsafe fn weighted_sum<const V: usize>(
        weights: &[f32],
        values: &[f32],
        ahead: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let hd = V * LANES;
        let v = values.as_ptr();
        let mut even = [_mm512_setzero_ps(); V];
        let mut odd = [_mm512_setzero_ps(); V];
        let accumulate = |acc: &mut [__m512; V], w: f32, row: *const f32| {
            let w = _mm512_set1_ps(w);
            for (c, lane) in acc.iter_mut().enumerate() {
                *lane = _mm512_fmadd_ps(w, _mm512_loadu_ps(row.add(c * LANES)), *lane);
            }
        };
        let n = weights.len();
        let mut j = 0;
        if V <= 8 {
            // Two accumulator sets: half as long a dependency chain per register.
            while j + 2 <= n {
                prefetch_row::<V>(ahead, j);
                prefetch_row::<V>(ahead, j + 1);
                accumulate(&mut even, weights[j], v.add(j * hd));
                accumulate(&mut odd, weights[j + 1], v.add((j + 1) * hd));
                j += 2;
            }
        }
        while j < n {
            prefetch_row::<V>(ahead, j);
            accumulate(&mut even, weights[j], v.add(j * hd));
            j += 1;
        }
        for (c, (e, o)) in even.iter().zip(&odd).enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(c * LANES), _mm512_add_ps(*e, *o));
        }
    }
}

/// `a . b` with 16 lane-wise partial sums added in a fixed order (vectorizes without reassociation).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut a_blocks = a.chunks_exact(LANES);
    let mut b_blocks = b.chunks_exact(LANES);
    for (x, y) in (&mut a_blocks).zip(&mut b_blocks) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Attention of one query row the plain way, in f64.
    fn reference(q: &[f32], keys: &[&[f32]], vals: &[&[f32]], spec: &AttnSpec) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                let s = q
                    .iter()
                    .zip(*k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * spec.scale;
                match spec.softcap {
                    Some(cap) => (s / cap).tanh() * cap,
                    None => s,
                }
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        let mut out = vec![0f64; q.len()];
        for (e, v) in exps.iter().zip(vals) {
            for (o, x) in out.iter_mut().zip(*v) {
                *o += e / total * f64::from(*x);
            }
        }
        out
    }

    /// Head sizes 32, 64 and 144 take the AVX-512 kernel on a CPU that has it; 20 the portable loop.
    #[test]
    fn matches_a_reference_with_gqa_windows_softcap_and_any_slot_order() {
        for hd in [20, 32, 64, 144] {
            matches_a_reference_at_head_size(hd);
        }
    }

    fn matches_a_reference_at_head_size(hd: usize) {
        let (slots, kv_heads, max_ctx, heads) = (4, 2, 40, 6);
        let dev = Device::Cpu;
        let k_all = values(slots * kv_heads * max_ctx * hd, 3);
        let v_all = values(slots * kv_heads * max_ctx * hd, 5);
        let shape = (slots, kv_heads, max_ctx, hd);
        let k_cache = Tensor::from_vec(k_all.clone(), shape, &dev).unwrap();
        let v_cache = Tensor::from_vec(v_all.clone(), shape, &dev).unwrap();
        let seqs = [
            SeqChunk {
                slot: 3,
                start_pos: 0,
                len: 1,
            },
            SeqChunk {
                slot: 0,
                start_pos: 39,
                len: 1,
            },
            SeqChunk {
                slot: 2,
                start_pos: 17,
                len: 1,
            },
        ];
        let q_all = values(seqs.len() * heads * hd, 7);
        let q = Tensor::from_vec(q_all.clone(), (seqs.len(), heads, hd), &dev).unwrap();
        for (window, softcap) in [(None, None), (Some(8), None), (None, Some(5.0))] {
            let spec = AttnSpec {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: hd,
                scale: 0.3,
                softcap,
                sliding_window: window,
            };
            let got = decode_attention(&q, &seqs, &k_cache, &v_cache, &spec)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (s, seq) in seqs.iter().enumerate() {
                let first = window.map_or(0, |w: usize| (seq.start_pos + 1).saturating_sub(w));
                for head in 0..heads {
                    let g = head / (heads / kv_heads);
                    let at = |all: &'static str, j: usize| {
                        let base = ((seq.slot * kv_heads + g) * max_ctx + j) * hd;
                        match all {
                            "k" => &k_all[base..base + hd],
                            _ => &v_all[base..base + hd],
                        }
                    };
                    let keys: Vec<&[f32]> = (first..=seq.start_pos).map(|j| at("k", j)).collect();
                    let vals: Vec<&[f32]> = (first..=seq.start_pos).map(|j| at("v", j)).collect();
                    let qh = &q_all[(s * heads + head) * hd..(s * heads + head + 1) * hd];
                    let want = reference(qh, &keys, &vals, &spec);
                    for (d, w) in want.iter().enumerate() {
                        let g = got[s][head * hd + d];
                        assert!(
                            (f64::from(g) - w).abs() < 1e-5,
                            "hd {hd} seq {s} head {head} dim {d} window {window:?} cap {softcap:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
        // A step that is not one token, or a slot outside the cache, is an error, not a wrong read.
        let spec = AttnSpec {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            scale: 1.0,
            softcap: None,
            sliding_window: None,
        };
        let mut bad = seqs;
        bad[0].slot = 4;
        assert!(decode_attention(&q, &bad, &k_cache, &v_cache, &spec).is_err());
        bad = seqs;
        bad[1].len = 2;
        assert!(decode_attention(&q, &bad, &k_cache, &v_cache, &spec).is_err());
    }
}
