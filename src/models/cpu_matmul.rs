//! Dense f32 projections `y = x W^T` on x86-64 CPUs with AVX-512: the weight is packed once at load
//! into 16-row panels, and one register-blocked kernel serves every batch size, from the batch-1 decode
//! step (memory-bound) to a 32-sequence decode step and prefill chunks (compute-bound).
//!
//! Why not candle's matmul: candle 0.11 calls the `gemm` crate, whose f32 kernels on stable Rust are
//! AVX2 (8 lanes); on this kind of machine a 32-row decode step ran at ~75 GFLOP/s on one core, half
//! of what AVX-512 FMA gives (see `docs/BENCHMARKS.md`).
//!
//! Layout: `W` is `(out, in)` row-major in the checkpoint. Packed, panel `p` holds rows
//! `16p..16p+16` of `W` transposed, one 64-byte [`Lanes`] per input column: `panels[p * in + k].0[l] =
//! W[16p + l, k]` (rows past `out` are zero). The kernel keeps `MR x NP` accumulators of 16 outputs
//! (`MR` rows of `x`, `NP` panels), and for every `k` loads `NP` panel vectors and broadcasts `MR`
//! values of `x`: no horizontal sums, contiguous weight reads.
//!
//! Batch invariance: every output element is one FMA chain over `k = 0..in` in order, whatever the
//! number of rows, the tile a row lands in, or the thread count. So a sequence gets bit-identical logits
//! alone or in any batch (`tests` below checks this exactly), which candle's matmul does not promise.
//!
//! The tied embedding reads token rows straight from the packed output projection ([`PackedMatrix::
//! embed`]), so packing costs no extra memory. Other CPUs, other dtypes and CUDA keep candle's path.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Lanes of one AVX-512 f32 vector, and rows of `W` per panel.
const LANES: usize = 16;
/// Most rows of `x` per kernel call (`MR_MAX x 2` accumulators + 2 weight vectors + 1 broadcast fit
/// the 32 vector registers).
const MR_MAX: usize = 12;

/// `false` turns the packed kernels off process-wide (checkpoints loaded afterwards use candle's
/// matmul); for comparisons and as an escape hatch (`WICK_CPU_MATMUL=candle`).
static PACKED_ENABLED: AtomicBool = AtomicBool::new(true);

/// Which implementation dense f32 and Q8_0 CPU projections use for models loaded from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMatmul {
    /// wick's packed AVX-512 kernels when the CPU has AVX-512F (f32) / AVX-512 VNNI (Q8_0),
    /// candle's matmul otherwise.
    Auto,
    /// Always candle's matmul.
    Candle,
}

/// Sets the implementation for models loaded after this call.
pub fn set_cpu_matmul(choice: CpuMatmul) {
    PACKED_ENABLED.store(choice == CpuMatmul::Auto, Ordering::Relaxed);
}

/// Whether a weight loaded now on `device` in `dtype` would use the packed kernels.
pub fn packed_kernels_apply(device: &candle_core::Device, dtype: DType) -> bool {
    device.is_cpu()
        && dtype == DType::F32
        && PACKED_ENABLED.load(Ordering::Relaxed)
        && cpu_has_avx512f()
}

/// Whether the packed kernels (f32 and Q8_0) are enabled ([`set_cpu_matmul`]).
pub(crate) fn packed_enabled() -> bool {
    PACKED_ENABLED.load(Ordering::Relaxed)
}

/// Whether this CPU has AVX-512F.
pub(crate) fn cpu_has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// 16 f32 values on one 64-byte line: one input column of one panel.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct Lanes([f32; LANES]);

/// A `(rows, cols)` f32 matrix packed for [`PackedMatrix::matmul_t`] (see the module docs).
pub(crate) struct PackedMatrix {
    /// `(panels, cols)` lane blocks.
    panels: Vec<Lanes>,
    /// `out` of the projection (rows of `W`).
    rows: usize,
    /// `in` of the projection (columns of `W`).
    cols: usize,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl PackedMatrix {
    /// Packs `w` `(rows, cols)`. `None` when the packed kernels do not apply to it (see
    /// [`packed_kernels_apply`]); the caller keeps candle's path.
    pub(crate) fn pack(w: &Tensor) -> Result<Option<Self>> {
        if w.rank() != 2 || !packed_kernels_apply(w.device(), w.dtype()) {
            return Ok(None);
        }
        let (rows, cols) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(all)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("packing needs a contiguous f32 CPU tensor");
        };
        let values = &all[start..end]; // (rows, cols) row-major, read in place
        let n_panels = rows.div_ceil(LANES);
        let mut panels = vec![Lanes([0.0; LANES]); n_panels * cols];
        // Panel by panel: 16 source rows read side by side, each 64-byte block written once; the
        // panels are independent, so they are filled on all engine threads.
        panels
            .par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(panel, blocks)| {
                let first = panel * LANES;
                let lanes = (rows - first).min(LANES);
                let source = &values[first * cols..(first + lanes) * cols];
                for (k, block) in blocks.iter_mut().enumerate() {
                    for (lane, value) in block.0.iter_mut().take(lanes).enumerate() {
                        *value = source[lane * cols + k];
                    }
                }
            });
        Ok(Some(Self { panels, rows, cols }))
    }

    /// The matrices stacked by rows (`[a; b; ...]`), so projections of the same input run as one
    /// matmul. `None` unless all have the same `cols` and every part but the last fills whole panels.
    pub(crate) fn stack(parts: &[&Self]) -> Option<Self> {
        let dims: Vec<_> = parts.iter().map(|p| (p.rows, p.cols)).collect();
        let (rows, cols) = stacked_dims(&dims)?;
        Some(Self {
            panels: parts
                .iter()
                .flat_map(|p| p.panels.iter().copied())
                .collect(),
            rows,
            cols,
        })
    }

    /// `gate` and `up` (same shape, whole panels) as one matrix whose panels alternate gate panel
    /// `p`, up panel `p`, for [`Epilogue::SiluGate`] only (its rows are not in checkpoint order).
    /// `None` unless both are `(rows, cols)` with `rows` a multiple of 16.
    pub(crate) fn interleave_gate_up(gate: &Self, up: &Self) -> Option<Self> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) || !gate.rows.is_multiple_of(LANES) {
            return None;
        }
        Some(Self {
            panels: interleave_panels(&gate.panels, &up.panels, gate.cols),
            rows: 2 * gate.rows,
            cols: gate.cols,
        })
    }

    /// `xs (m, cols) -> xs W^T (m, rows)`, f32 on CPU. `xs` may be any layout (made contiguous).
    pub(crate) fn matmul_t(&self, xs: &Tensor) -> Result<Tensor> {
        matmul_t(self, xs)
    }

    /// Rows `ids` of the unpacked matrix: `(ids.len(), cols)` (an embedding lookup).
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in &ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!(
                    "token id {id} is outside the embedding ({} rows)",
                    self.rows
                );
            }
            let (panel, lane) = (id / LANES, id % LANES);
            let blocks = &self.panels[panel * self.cols..(panel + 1) * self.cols];
            out.extend(blocks.iter().map(|block| block.0[lane]));
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)
    }
}

impl PanelKernel for PackedMatrix {
    type Input<'a> = &'a [f32];
    const MR_MAX: usize = MR_MAX;
    const PARALLEL_MIN_MACS: usize = 1 << 18;

    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn prepare<'a>(&self, a: &'a [f32], _m: usize) -> &'a [f32] {
        a
    }

    unsafe fn tile(&self, a: &&[f32], row: usize, mr: usize, panel: usize, np: usize, out: Out) {
        #[cfg(target_arch = "x86_64")]
        {
            let tile = Tile {
                a: a.as_ptr().add(row * self.cols),
                b: self.panels.as_ptr().add(panel * self.cols),
                k: self.cols,
                out: out.tile_at(row, panel, self.rows),
            };
            if np == 2 {
                avx512::dispatch::<2>(mr, &tile);
            } else {
                avx512::dispatch::<1>(mr, &tile);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, row, mr, panel, np, out);
            unreachable!("PackedMatrix::pack returns None off x86-64");
        }
    }
}

/// A matrix packed in 16-row panels plus its register-blocked kernel; [`matmul_new`] drives it.
pub(crate) trait PanelKernel: Sync {
    /// The activations as the kernel reads them (f32 as they are, or quantized).
    type Input<'a>: Sync
    where
        Self: 'a;
    /// Most rows of `x` per kernel call.
    const MR_MAX: usize;
    /// Below this many multiply-adds a matmul runs on the calling thread (a thread hand-off costs
    /// more than it saves).
    const PARALLEL_MIN_MACS: usize;

    /// `(rows, cols)` of the unpacked matrix.
    fn dims(&self) -> (usize, usize);

    /// Prepares the `(m, cols)` activations once per matmul.
    fn prepare<'a>(&'a self, a: &'a [f32], m: usize) -> Self::Input<'a>;

    /// Output rows `row..row + mr` (`mr <= MR_MAX`), columns of panels `panel..panel + np`
    /// (`np` 1 or 2).
    ///
    /// # Safety
    /// `out` describes an output whose cells in those rows and columns nobody else touches
    /// meanwhile; `x` was prepared from `m >= row + mr` rows; the panels exist; with
    /// [`Epilogue::SiluGate`], `np` is 2 and `panel` even.
    unsafe fn tile(
        &self,
        x: &Self::Input<'_>,
        row: usize,
        mr: usize,
        panel: usize,
        np: usize,
        out: Out,
    );
}

/// [`matmul_new`] (plain) into a caller's buffer, for the kernels' tests.
#[cfg(test)]
pub(crate) fn matmul_into<K: PanelKernel>(
    weight: &K,
    a: &[f32],
    m: usize,
    c: &mut [f32],
    threads: usize,
) {
    assert_eq!(c.len(), m * weight.dims().0, "c is (m, rows)");
    let out = Out {
        c: c.as_mut_ptr(),
        ldc: weight.dims().0,
        residual: std::ptr::null(),
        gated: false,
    };
    // SAFETY: `c` is an exclusively borrowed `(m, rows)` buffer.
    unsafe { matmul_to(weight, a, m, out, threads) }
}

/// `c = a (m, cols) W^T` with `epilogue`, into a new buffer (`(m, rows)`, or `(m, rows / 2)` with
/// [`Epilogue::SiluGate`]), on up to `threads` threads.
///
/// The panels are cut into chunks of whole panel pairs (the widest tile), about
/// [`CHUNKS_PER_THREAD`] per thread, and every thread (the calling one first, at once) takes the next
/// chunk from a shared counter until none are left. A pool worker that wakes late so takes a smaller
/// share instead of holding up the matmul. Each output is computed by one kernel call whichever
/// thread runs it, so the split never changes a bit of the result.
///
/// `c` is not zeroed first: every cell is written (the panels cover all columns and the row blocks
/// all `m` rows).
///
/// # Panics
/// `a` is not `(m, cols)`, a residual is not `(m, rows)`, or a gated weight does not have an even
/// number of whole panels.
pub(crate) fn matmul_new<K: PanelKernel>(
    weight: &K,
    a: &[f32],
    m: usize,
    epilogue: Epilogue<'_>,
    threads: usize,
) -> Vec<f32> {
    let rows = weight.dims().0;
    let (width, residual, gated) = match epilogue {
        Epilogue::Plain => (rows, std::ptr::null(), false),
        Epilogue::Residual(residual) => {
            assert_eq!(residual.len(), m * rows, "the residual is (m, rows)");
            (rows, residual.as_ptr(), false)
        }
        Epilogue::SiluGate => {
            assert!(
                rows.is_multiple_of(2 * LANES),
                "a gated weight alternates whole gate and up panels"
            );
            (rows / 2, std::ptr::null(), true)
        }
    };
    let len = m * width;
    let mut c: Vec<f32> = Vec::with_capacity(len);
    let out = Out {
        c: c.as_mut_ptr(),
        ldc: width,
        residual,
        gated,
    };
    // SAFETY: `c` has room for `(m, width)` values and nobody else sees it; `matmul_to` writes every
    // one of them before the length is set (a panic in between leaves the length 0); the residual
    // is `(m, rows)` (checked above) and outlives the call.
    unsafe {
        matmul_to(weight, a, m, out, threads);
        c.set_len(len);
    }
    c
}

/// The matmul of [`matmul_new`] into `out`.
///
/// # Safety
/// `out` points at an output (and residual) of `m` rows that nothing else reads or writes
/// meanwhile; a gated `out` goes with a weight of an even number of panels.
unsafe fn matmul_to<K: PanelKernel>(weight: &K, a: &[f32], m: usize, out: Out, threads: usize) {
    let (rows, cols) = weight.dims();
    assert_eq!(a.len(), m * cols, "a is (m, cols)");
    let panels = rows.div_ceil(LANES);
    if m == 0 || panels == 0 {
        return;
    }
    let x = weight.prepare(a, m);
    let pairs = panels.div_ceil(2);
    let threads = threads.clamp(1, pairs);
    if threads == 1 || m * rows * cols < K::PARALLEL_MIN_MACS {
        // SAFETY: `out` is an output only this call writes (the caller's contract); panels in
        // range; a gated weight has an even number of panels, so every tile is a pair.
        unsafe { run_panels(weight, &x, m, out, 0, panels) };
        return;
    }
    // An even number of panels per chunk keeps every gate panel with its up panel.
    let chunk_panels = 2 * (pairs / (threads * CHUNKS_PER_THREAD)).max(1);
    let chunks = panels.div_ceil(chunk_panels);
    let next = AtomicUsize::new(0);
    let work = || loop {
        let chunk = next.fetch_add(1, Ordering::Relaxed);
        if chunk >= chunks {
            break;
        }
        let first = chunk * chunk_panels;
        // SAFETY: each chunk index is handed out once, so each task writes only the columns of its
        // own panels `first..end` (disjoint across chunks) of the output, which outlives the scope;
        // chunks start on even panels.
        unsafe {
            run_panels(
                weight,
                &x,
                m,
                out,
                first,
                (first + chunk_panels).min(panels),
            )
        };
    };
    rayon::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| work());
        }
        work();
    });
}

/// Chunks of a parallel matmul per thread (see [`matmul_new`]).
const CHUNKS_PER_THREAD: usize = 8;

/// Output columns of panels `first..end` for all `m` rows.
///
/// # Safety
/// As [`PanelKernel::tile`], for all rows and those panels.
unsafe fn run_panels<K: PanelKernel>(
    weight: &K,
    x: &K::Input<'_>,
    m: usize,
    out: Out,
    first: usize,
    end: usize,
) {
    let mut panel = first;
    while panel < end {
        let np = (end - panel).min(2);
        let mut row = 0;
        while row < m {
            let mr = (m - row).min(K::MR_MAX);
            weight.tile(x, row, mr, panel, np, out);
            row += mr;
        }
        panel += np;
    }
}

/// `xs (..., cols) -> xs W^T (..., rows)` on the CPU for any packed weight.
pub(crate) fn matmul_t<K: PanelKernel>(weight: &K, xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&MatmulT {
        weight,
        gated: false,
    })
}

/// `xs (..., cols) -> xs W^T + residual (..., rows)` in one pass (see [`Epilogue::Residual`]).
pub(crate) fn matmul_t_residual<K: PanelKernel>(
    weight: &K,
    xs: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    xs.contiguous()?.apply_op2_no_bwd(
        &residual.contiguous()?,
        &MatmulT {
            weight,
            gated: false,
        },
    )
}

/// `xs (..., cols) -> silu(gate) * up (..., rows / 2)` for a weight packed with
/// [`PackedMatrix::interleave_gate_up`] (see [`Epilogue::SiluGate`]).
pub(crate) fn matmul_t_silu_gate<K: PanelKernel>(weight: &K, xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&MatmulT {
        weight,
        gated: true,
    })
}

/// What a matmul does with its sums before writing them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// `c = x W^T`.
    Plain,
    /// `c = x W^T + residual`, `residual` `(m, rows)` row-major (one add after each finished dot
    /// product: the same value as adding afterwards).
    Residual(&'a [f32]),
    /// The weight's panels alternate gate and up ([`PackedMatrix::interleave_gate_up`]): each pair
    /// of panels writes `silu(gate) * up` to 16 columns of `c` `(m, rows / 2)` (the same arithmetic as
    /// [`crate::models::cpu_elementwise::silu_mul_stacked`]).
    SiluGate,
}

/// The output of one matmul, shared by its tasks (each writes its own columns).
#[derive(Clone, Copy)]
pub(crate) struct Out {
    /// `(m, ldc)` output.
    c: *mut f32,
    /// Row stride of `c` and `residual`.
    ldc: usize,
    /// Added to the sums when not null (same layout as `c`).
    residual: *const f32,
    /// [`Epilogue::SiluGate`].
    gated: bool,
}
// SAFETY: tasks write disjoint columns (see `matmul_to`) and the scope joins them before `c` is
// used again; `residual` is only read.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// Where the tile of rows from `row`, panels from `panel` (of a weight with `rows` rows) goes.
    ///
    /// # Safety
    /// `row` and `panel` are inside the matmul this `Out` was made for.
    pub(crate) unsafe fn tile_at(&self, row: usize, panel: usize, rows: usize) -> TileOut {
        let (column, width) = if self.gated {
            (panel / 2 * LANES, rows / 2)
        } else {
            (panel * LANES, rows)
        };
        let at = row * self.ldc + column;
        TileOut {
            c: self.c.add(at),
            ldc: self.ldc,
            valid: width - column,
            residual: if self.residual.is_null() {
                self.residual
            } else {
                self.residual.add(at)
            },
            gated: self.gated,
        }
    }
}

/// Where one kernel call's `MR x 16 NP` sums go, and what happens to them on the way
/// ([`avx512::store`]).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct TileOut {
    /// Output of the first row, first panel column (row stride `ldc`).
    c: *mut f32,
    /// Row stride of the output (and the residual).
    ldc: usize,
    /// Output columns from the first panel's first column to the end of the row.
    valid: usize,
    /// Residual cell of the first output (same strides), or null.
    residual: *const f32,
    /// Panel pairs write `silu(gate) * up` ([`Epilogue::SiluGate`]).
    gated: bool,
}

/// One kernel call: `MR` rows of `x` against `NP` panels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile {
    /// First row of `x` (row stride `k`).
    a: *const f32,
    /// First panel (panel stride `k` lane blocks).
    b: *const Lanes,
    /// Input columns.
    k: usize,
    /// Where the sums go.
    out: TileOut,
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
    };

    use super::{Tile, TileOut, LANES};
    use crate::models::cpu_elementwise::avx512::{first_lanes, silu_times};

    /// Runs the `(mr, NP)` kernel; `mr` in `1..=MR_MAX`.
    ///
    /// # Safety
    /// The CPU has AVX-512F (checked when the matrix was packed) and `tile` describes valid buffers.
    pub(super) unsafe fn dispatch<const NP: usize>(mr: usize, tile: &Tile) {
        match mr {
            1 => kernel::<1, NP>(tile),
            2 => kernel::<2, NP>(tile),
            3 => kernel::<3, NP>(tile),
            4 => kernel::<4, NP>(tile),
            5 => kernel::<5, NP>(tile),
            6 => kernel::<6, NP>(tile),
            7 => kernel::<7, NP>(tile),
            8 => kernel::<8, NP>(tile),
            9 => kernel::<9, NP>(tile),
            10 => kernel::<10, NP>(tile),
            11 => kernel::<11, NP>(tile),
            _ => kernel::<12, NP>(tile),
        }
    }

    /// `MR x (16 NP)` outputs: for each `k`, `NP` aligned panel loads, `MR` broadcasts, `MR x NP` FMAs.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const MR: usize, const NP: usize>(tile: &Tile) {
        let k = tile.k;
        let mut acc: [[__m512; NP]; MR] = [[_mm512_setzero_ps(); NP]; MR];
        for kk in 0..k {
            let mut weights: [__m512; NP] = [_mm512_setzero_ps(); NP];
            for (j, w) in weights.iter_mut().enumerate() {
                // Lane blocks are 64-byte aligned (`Lanes` is `align(64)`).
                *w = _mm512_load_ps(tile.b.add(j * k + kk).cast::<f32>());
            }
            for (i, row_acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*tile.a.add(i * k + kk));
                for (j, lane_acc) in row_acc.iter_mut().enumerate() {
                    *lane_acc = _mm512_fmadd_ps(x, weights[j], *lane_acc);
                }
            }
        }
        store(&acc, &tile.out);
    }

    /// Writes `MR x NP` accumulators to `out` (rows of `c`, stride `ldc`, only the first `valid`
    /// columns): plus the `residual` cells when that is not null, or, when `gated` (`NP` is 2: a
    /// gate panel and its up panel), `silu(gate) * up` as 16 columns.
    ///
    /// Out of line on purpose: inlined, its SiLU arithmetic made the register allocator keep the
    /// kernels' accumulators in memory through the whole `k` loop (f32 matmuls ran 1.7x slower);
    /// as a call they are written out once per tile.
    ///
    /// # Safety
    /// AVX-512F; `c` (and a non-null `residual`) has `MR` rows of at least `min(valid, 16 NP)`
    /// columns (16 when gated).
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store<const MR: usize, const NP: usize>(
        acc: &[[__m512; NP]; MR],
        out: &TileOut,
    ) {
        let TileOut {
            c,
            ldc,
            valid,
            residual,
            gated,
        } = *out;
        if gated && NP == 2 {
            let mask = first_lanes(valid);
            for (i, row_acc) in acc.iter().enumerate() {
                let hidden = silu_times(row_acc[0], row_acc[1]);
                _mm512_mask_storeu_ps(c.add(i * ldc), mask, hidden);
            }
            return;
        }
        for (i, row_acc) in acc.iter().enumerate() {
            for (j, lane_acc) in row_acc.iter().enumerate() {
                let mask = first_lanes(valid.saturating_sub(j * LANES));
                let at = i * ldc + j * LANES;
                let value = if residual.is_null() {
                    *lane_acc
                } else {
                    _mm512_add_ps(*lane_acc, _mm512_maskz_loadu_ps(mask, residual.add(at)))
                };
                _mm512_mask_storeu_ps(c.add(at), mask, value);
            }
        }
    }
}

/// The panels of two packed matrices of the same shape taken in turn (`a`'s panel `p`, then `b`'s),
/// each panel `per_panel` items: the gate/up interleaving of both packed formats.
pub(crate) fn interleave_panels<T: Copy>(a: &[T], b: &[T], per_panel: usize) -> Vec<T> {
    a.chunks_exact(per_panel.max(1))
        .zip(b.chunks_exact(per_panel.max(1)))
        .flat_map(|(a_panel, b_panel)| a_panel.iter().chain(b_panel).copied())
        .collect()
}

/// Checks that `parts` can be stacked by rows (same `cols`; every part but the last fills whole
/// panels) and returns the stacked `(rows, cols)`.
pub(crate) fn stacked_dims(parts: &[(usize, usize)]) -> Option<(usize, usize)> {
    let (&(_, cols), init) = parts.split_last()?;
    if init.iter().any(|&(rows, _)| rows % LANES != 0) || parts.iter().any(|&(_, c)| c != cols) {
        return None;
    }
    Some((parts.iter().map(|&(rows, _)| rows).sum(), cols))
}

/// `x W^T` as a candle op over a packed `W`: plain or gated as one-input op, plus a residual as a
/// two-input op.
struct MatmulT<'w, K> {
    weight: &'w K,
    /// [`Epilogue::SiluGate`].
    gated: bool,
}

impl<K: PanelKernel> MatmulT<'_, K> {
    /// The matmul of a contiguous f32 input with `residual` (when given, of the output's shape).
    fn run(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("packed matmul takes f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed matmul needs a contiguous input");
        };
        let (rows, cols) = self.weight.dims();
        let Some((&in_dim, batch_dims)) = layout.dims().split_last() else {
            candle_core::bail!("packed matmul needs at least one dimension");
        };
        if in_dim != cols {
            candle_core::bail!("packed matmul: input has {in_dim} columns, the weight {cols}");
        }
        if self.gated && !rows.is_multiple_of(2 * LANES) {
            candle_core::bail!("gated matmul: {rows} rows are not whole gate and up panels");
        }
        let m: usize = batch_dims.iter().product();
        let mut out_dims = batch_dims.to_vec();
        out_dims.push(if self.gated { rows / 2 } else { rows });
        let epilogue = match residual {
            None if self.gated => Epilogue::SiluGate,
            None => Epilogue::Plain,
            Some((CpuStorage::F32(r), r_layout)) => {
                let Some((r_start, r_end)) = r_layout.contiguous_offsets() else {
                    candle_core::bail!("packed matmul: the residual must be contiguous");
                };
                if self.gated || r_layout.dims() != out_dims.as_slice() {
                    candle_core::bail!(
                        "packed matmul: residual {:?} for an output {out_dims:?}",
                        r_layout.dims()
                    );
                }
                Epilogue::Residual(&r[r_start..r_end])
            }
            Some(_) => candle_core::bail!("packed matmul: the residual must be f32"),
        };
        let out = matmul_new(
            self.weight,
            &values[start..end],
            m,
            epilogue,
            candle_core::utils::get_num_threads(),
        );
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

impl<K: PanelKernel> candle_core::CustomOp1 for MatmulT<'_, K> {
    fn name(&self) -> &'static str {
        "wick-packed-matmul-t"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(storage, layout, None)
    }
}

impl<K: PanelKernel> candle_core::CustomOp2 for MatmulT<'_, K> {
    fn name(&self) -> &'static str {
        "wick-packed-matmul-t-residual"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(storage, layout, Some((residual, residual_layout)))
    }
}

/// Checks the epilogues of a packed kernel against its plain product: [`Epilogue::Residual`] gives
/// the bits of the product plus the residual, [`Epilogue::SiluGate`] over `gated` (`gate` and `up`
/// interleaved) the bits of [`crate::models::cpu_elementwise::silu_mul_stacked`] over the two
/// products; at several row counts and thread counts.
#[cfg(test)]
pub(crate) fn assert_epilogues_match<K: PanelKernel>(gate: &K, up: &K, gated: &K) {
    let (rows, cols) = gate.dims();
    for m in [1, 5, 13, 32] {
        for threads in [1, 2, 3] {
            let a = test_values(m * cols, m as u64 + 3);
            let plain = matmul_new(gate, &a, m, Epilogue::Plain, threads);
            let residual = test_values(m * rows, 99);
            let summed = matmul_new(gate, &a, m, Epilogue::Residual(&residual), threads);
            for ((s, p), r) in summed.iter().zip(&plain).zip(&residual) {
                assert_eq!(
                    s.to_bits(),
                    (p + r).to_bits(),
                    "residual, m={m} threads={threads}"
                );
            }
            let up_out = matmul_new(up, &a, m, Epilogue::Plain, threads);
            let stacked: Vec<f32> = plain
                .chunks_exact(rows)
                .zip(up_out.chunks_exact(rows))
                .flat_map(|(g, u)| g.iter().chain(u).copied())
                .collect();
            let stacked = Tensor::from_vec(stacked, (m, 2 * rows), &candle_core::Device::Cpu)
                .expect("test tensor");
            let want = crate::models::cpu_elementwise::silu_mul_stacked(&stacked, rows)
                .expect("silu_mul_stacked")
                .expect("AVX-512 is there: the kernels packed")
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("host values");
            let got = matmul_new(gated, &a, m, Epilogue::SiluGate, threads);
            assert_eq!(got.len(), m * rows);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "silu gate, m={m} threads={threads}");
        }
    }
}

/// Deterministic values in [-1, 1) (xorshift) for the kernels' tests, so failures reproduce.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use candle_core::Device;

    fn packed(rows: usize, cols: usize, seed: u64) -> Option<(PackedMatrix, Vec<f32>)> {
        let w = test_values(rows * cols, seed);
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        let Some(p) = PackedMatrix::pack(&t).unwrap() else {
            eprintln!("skipped: this CPU has no AVX-512F, the packed kernels are not used here");
            return None;
        };
        Some((p, w))
    }

    /// `x W^T` summed in f64, the reference.
    fn reference(a: &[f32], w: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols)
                    .map(|k| f64::from(a[i * cols + k]) * f64::from(w[r * cols + k]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matmul_matches_an_f64_reference_for_ragged_shapes() {
        for &(m, rows, cols) in &[
            (1, 16, 1),
            (1, 17, 7),
            (2, 40, 64),
            (5, 33, 577),
            (12, 48, 96),
            (13, 576, 64),
            (32, 192, 576),
            (37, 50, 130),
        ] {
            let Some((p, w)) = packed(rows, cols, (m * 1000 + rows + cols) as u64) else {
                return;
            };
            let a = test_values(m * cols, 7 + m as u64);
            for threads in [1, 2, 3] {
                // NaN first: a cell the kernels miss fails the comparison.
                let mut c = vec![f32::NAN; m * rows];
                matmul_into(&p, &a, m, &mut c, threads);
                // The unzeroed buffer holds the same values.
                let fresh = matmul_new(&p, &a, m, Epilogue::Plain, threads);
                assert!(fresh
                    .iter()
                    .zip(&c)
                    .all(|(x, y)| x.to_bits() == y.to_bits()));
                for (got, want) in c.iter().zip(reference(&a, &w, m, rows, cols)) {
                    let tolerance = 1e-5 * (cols as f64).sqrt() + 1e-6;
                    assert!(
                        (f64::from(*got) - want).abs() <= tolerance,
                        "m={m} rows={rows} cols={cols} threads={threads}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn residual_and_silu_gate_epilogues_give_the_bits_of_the_separate_ops() {
        // 10 panels per part (an even and an odd count of pairs across threads); big enough at 32
        // rows to run in parallel.
        for (rows, cols) in [(48, 40), (160, 96)] {
            let (Some((gate, _)), Some((up, _))) = (packed(rows, cols, 5), packed(rows, cols, 6))
            else {
                return;
            };
            let gated = PackedMatrix::interleave_gate_up(&gate, &up).unwrap();
            assert_epilogues_match(&gate, &up, &gated);
        }
        // Parts that are not whole panels, or of different shapes, are not interleaved.
        let (Some((a, _)), Some((b, _)), Some((c, _))) =
            (packed(40, 32, 1), packed(40, 32, 2), packed(48, 32, 3))
        else {
            return;
        };
        assert!(PackedMatrix::interleave_gate_up(&a, &b).is_none());
        assert!(PackedMatrix::interleave_gate_up(&c, &a).is_none());
    }

    #[test]
    fn every_row_is_bit_identical_alone_and_in_any_batch_or_thread_count() {
        let (rows, cols, m) = (200, 300, 29);
        let Some((p, _)) = packed(rows, cols, 3) else {
            return;
        };
        let a = test_values(m * cols, 11);
        let mut batched = vec![0f32; m * rows];
        matmul_into(&p, &a, m, &mut batched, 2);
        for i in 0..m {
            let mut alone = vec![0f32; rows];
            matmul_into(&p, &a[i * cols..(i + 1) * cols], 1, &mut alone, 1);
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                batched[i * rows..(i + 1) * rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "row {i} differs between batch 1 and batch {m}"
            );
        }
    }

    #[test]
    fn tensor_op_and_embedding_read_the_original_matrix() {
        let (rows, cols) = (70, 24);
        let Some((p, w)) = packed(rows, cols, 5) else {
            return;
        };
        let ids = Tensor::new(&[0u32, 69, 16, 15, 33], &Device::Cpu).unwrap();
        let rows_got = p.embed(&ids).unwrap().to_vec2::<f32>().unwrap();
        for (got, id) in rows_got.iter().zip([0usize, 69, 16, 15, 33]) {
            assert_eq!(got.as_slice(), &w[id * cols..(id + 1) * cols]);
        }
        let bad = Tensor::new(&[70u32], &Device::Cpu).unwrap();
        assert!(
            p.embed(&bad).is_err(),
            "an id past the last row is an error"
        );

        // (2, 3, cols) input: leading dims are kept; a transposed view is made contiguous first.
        let x = Tensor::from_vec(test_values(6 * cols, 9), (2, 3, cols), &Device::Cpu).unwrap();
        let y = p.matmul_t(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, rows]);
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let want = x.broadcast_matmul(&wt.t().unwrap()).unwrap();
        let diff = (y - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
        let xt = Tensor::from_vec(test_values(cols * 4, 13), (cols, 4), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(p.matmul_t(&xt).unwrap().dims(), &[4, rows]);
        let wrong = Tensor::zeros((2, cols + 1), DType::F32, &Device::Cpu).unwrap();
        assert!(
            p.matmul_t(&wrong).is_err(),
            "a column-count mismatch is an error"
        );
    }

    #[test]
    fn other_dtypes_are_not_packed() {
        let w = Tensor::zeros((32, 32), DType::F16, &Device::Cpu).unwrap();
        assert!(PackedMatrix::pack(&w).unwrap().is_none());
        assert!(!packed_kernels_apply(&Device::Cpu, DType::BF16));
    }
}
