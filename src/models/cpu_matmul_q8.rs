//! Q8_0 projections `y = x W^T` on x86-64 CPUs with AVX-512 VNNI: the GGUF weight (Q8_0 as stored
//! or re-quantized at load) is packed once into 16-row panels of `vpdpbusd` operands, activations are
//! quantized to Q8_0 per row on the fly (as candle and llama.cpp do), and one register-blocked kernel
//! serves every batch size.
//!
//! Why: candle 0.11's Q8_0 CPU path computes one dot product per (row, output) pair; at 32 decode rows
//! it re-reads each weight block 32 times through a scalar-ish loop and the step is compute-bound
//! (see `docs/BENCHMARKS.md`). `vpdpbusd` does 64 int8 multiply-adds per instruction and the panel
//! layout reuses every loaded weight vector for `MR` rows.
//!
//! Layout per panel `p` (rows `16p..16p+16`) and 32-column block `b`: eight 64-byte [`Quads`], quad
//! `t` holding, for each of the 16 rows, its 4 quants of columns `32b+4t..32b+4t+4` stored as `q +
//! 128` (unsigned: `vpdpbusd` multiplies unsigned bytes by signed ones), plus the 16 rows' f32 block
//! scales. With activations `x = dx * qx` (signed), a block contributes
//! `dx * dw * (sum((qw + 128) qx) - 128 sum(qx))` to each output.
//!
//! Batch invariance as in [`crate::models::cpu_matmul`]: each output is summed over blocks in order,
//! the same for every row, batch size and thread count.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use crate::models::cpu_matmul::{
    interleave_panels, matmul_t, packed_enabled, stacked_dims, Out, PanelKernel, TileOut,
};

/// Rows of `W` per panel (lanes of one vector of i32 / f32).
const LANES: usize = 16;
/// Columns per Q8_0 block.
const BLOCK: usize = 32;
/// Bytes of one stored Q8_0 block: f16 scale + 32 i8.
const BLOCK_BYTES: usize = 34;
/// Most rows of `x` per kernel call: `MR_MAX x 2` int and as many float accumulators fit the 32
/// vector registers with the weights and broadcasts.
const MR_MAX: usize = 6;

/// Whether Q8_0 weights loaded now on `device` would use the packed VNNI kernels.
pub fn packed_q8_applies(device: &candle_core::Device) -> bool {
    device.is_cpu() && packed_enabled() && cpu_has_vnni()
}

fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// 16 rows x 4 columns of unsigned quants, one 64-byte line.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct Quads([u8; 64]);

/// 16 f32 block scales, one 64-byte line.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct Scales([f32; LANES]);

/// A `(rows, cols)` Q8_0 matrix packed for [`PackedQ8::matmul_t`] (see the module docs).
pub(crate) struct PackedQ8 {
    /// `(panels, blocks, 8)` quads.
    quads: Vec<Quads>,
    /// `(panels, blocks)` scales.
    scales: Vec<Scales>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl PackedQ8 {
    /// Packs a 2-D Q8_0 `qt` (on the CPU). `None` when the kernels do not apply (see
    /// [`packed_q8_applies`]) or the tensor is not a 2-D Q8_0 matrix.
    pub(crate) fn pack(qt: &QTensor) -> Result<Option<Self>> {
        if qt.dtype() != GgmlDType::Q8_0 || !packed_q8_applies(&candle_core::Device::Cpu) {
            return Ok(None);
        }
        let (rows, cols) = match qt.shape().dims() {
            &[rows, cols] if cols % BLOCK == 0 => (rows, cols),
            _ => return Ok(None),
        };
        let data = qt.data()?;
        let blocks = cols / BLOCK;
        if data.len() != rows * blocks * BLOCK_BYTES {
            candle_core::bail!(
                "Q8_0 tensor ({rows}, {cols}) has {} bytes, expected {}",
                data.len(),
                rows * blocks * BLOCK_BYTES
            );
        }
        let panels = rows.div_ceil(LANES);
        // Rows past `rows` stay scale 0 with quants 128 (= 0): they add nothing.
        let mut quads = vec![Quads([128; 64]); panels * blocks * 8];
        let mut scales = vec![Scales([0.0; LANES]); panels * blocks];
        for (row, row_bytes) in data.chunks_exact(blocks * BLOCK_BYTES).enumerate() {
            let (panel, lane) = (row / LANES, row % LANES);
            for (b, block) in row_bytes.chunks_exact(BLOCK_BYTES).enumerate() {
                let d = half_to_f32(u16::from_le_bytes([block[0], block[1]]));
                scales[panel * blocks + b].0[lane] = d;
                for t in 0..8 {
                    let quad = &mut quads[(panel * blocks + b) * 8 + t].0;
                    for i in 0..4 {
                        let q = block[2 + 4 * t + i] as i8;
                        quad[lane * 4 + i] = (i16::from(q) + 128) as u8;
                    }
                }
            }
        }
        Ok(Some(Self {
            quads,
            scales,
            rows,
            cols,
        }))
    }

    /// The matrices stacked by rows, as [`crate::models::cpu_matmul::PackedMatrix::stack`].
    pub(crate) fn stack(parts: &[&Self]) -> Option<Self> {
        let dims: Vec<_> = parts.iter().map(|p| (p.rows, p.cols)).collect();
        let (rows, cols) = stacked_dims(&dims)?;
        Some(Self {
            quads: parts.iter().flat_map(|p| p.quads.iter().copied()).collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            rows,
            cols,
        })
    }

    /// `gate` and `up` with alternating panels, as
    /// [`crate::models::cpu_matmul::PackedMatrix::interleave_gate_up`].
    pub(crate) fn interleave_gate_up(gate: &Self, up: &Self) -> Option<Self> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) || !gate.rows.is_multiple_of(LANES) {
            return None;
        }
        let blocks = gate.cols / BLOCK;
        Some(Self {
            quads: interleave_panels(&gate.quads, &up.quads, blocks * 8),
            scales: interleave_panels(&gate.scales, &up.scales, blocks),
            rows: 2 * gate.rows,
            cols: gate.cols,
        })
    }

    /// `xs (..., cols) -> xs W^T (..., rows)`, f32 on CPU.
    pub(crate) fn matmul_t(&self, xs: &Tensor) -> Result<Tensor> {
        matmul_t(self, xs)
    }
}

impl PanelKernel for PackedQ8 {
    type Input<'a> = QuantizedRows;
    const MR_MAX: usize = MR_MAX;
    // The same threshold as f32: since the forward pass runs inside the compute pool and threads
    // take chunks from a shared counter, splitting even the 576x576 batch-1 projections of SmolLM2
    // pays (2 threads, batch 1: 264-288 tok/s against 230 with a 2^21 threshold; at 2^21 they
    // had been kept on one thread when a split cost a hand-off per matmul: 159 vs 190 tok/s then).
    const PARALLEL_MIN_MACS: usize = 1 << 18;

    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn prepare(&self, a: &[f32], m: usize) -> QuantizedRows {
        QuantizedRows::new(a, m, self.cols)
    }

    unsafe fn tile(
        &self,
        x: &QuantizedRows,
        row: usize,
        mr: usize,
        panel: usize,
        np: usize,
        out: Out,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let blocks = self.cols / BLOCK;
            let tile = Tile {
                xq: x.quants.as_ptr().add(row * self.cols),
                xd: x.scales.as_ptr().add(row * blocks),
                xcorr: x.corrections.as_ptr().add(row * blocks),
                quads: self.quads.as_ptr().add(panel * blocks * 8),
                scales: self.scales.as_ptr().add(panel * blocks),
                blocks,
                cols: self.cols,
                out: out.tile_at(row, panel, self.rows),
            };
            if np == 2 {
                vnni::dispatch::<2>(mr, &tile);
            } else {
                vnni::dispatch::<1>(mr, &tile);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, row, mr, panel, np, out);
            unreachable!("PackedQ8::pack returns None off x86-64");
        }
    }
}

/// Activations quantized to Q8_0 per row and block: `x[m, k] ~= scales[m, k / 32] * quants[m, k]`.
pub(crate) struct QuantizedRows {
    /// `(m, cols)` signed quants.
    quants: Vec<i8>,
    /// `(m, blocks)` block scales.
    scales: Vec<f32>,
    /// `(m, blocks)`: `128 * sum(quants of the block)`, what the unsigned weight offset adds.
    corrections: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `a` `(m, cols)` block by block: scale `max|x| / 127`, quants rounded to nearest
    /// (ties to even).
    fn new(a: &[f32], m: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let mut rows = Self {
            quants: vec![0i8; m * cols],
            scales: vec![0f32; m * blocks],
            corrections: vec![0i32; m * blocks],
        };
        // SAFETY: only built for matrices packed on a CPU with AVX-512F/BW/VNNI (`PackedQ8::pack`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            vnni::quantize(a, &mut rows.quants, &mut rows.scales, &mut rows.corrections);
        }
        rows
    }
}

/// One kernel call: `MR` rows of `x` against `NP` panels, all blocks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile {
    xq: *const i8,
    xd: *const f32,
    xcorr: *const i32,
    quads: *const Quads,
    scales: *const Scales,
    blocks: usize,
    cols: usize,
    out: TileOut,
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::{
        __m512, __m512i, _mm512_abs_ps, _mm512_add_epi32, _mm512_cvtepi32_ps, _mm512_cvtps_epi32,
        _mm512_cvtsepi32_epi8, _mm512_dpbusd_epi32, _mm512_fmadd_ps, _mm512_load_ps,
        _mm512_load_si512, _mm512_loadu_ps, _mm512_max_ps, _mm512_mul_ps, _mm512_reduce_add_epi32,
        _mm512_reduce_max_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_setzero_si512, _mm512_sub_epi32, _mm_storeu_si128,
    };

    use super::{Tile, BLOCK, LANES};

    /// Q8_0 quantization of `a` (blocks of 32): per block the scale `max|x| / 127`, the quants
    /// `x / scale` rounded to nearest (ties to even) and `128 * sum(quants)`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize(
        a: &[f32],
        quants: &mut [i8],
        scales: &mut [f32],
        corrections: &mut [i32],
    ) {
        for (((x, q), d), corr) in a
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
            .zip(corrections.iter_mut())
        {
            let lo = _mm512_loadu_ps(x.as_ptr());
            let hi = _mm512_loadu_ps(x.as_ptr().add(LANES));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            *d = amax / 127.0;
            let inverse = _mm512_set1_ps(if *d > 0.0 { 1.0 / *d } else { 0.0 });
            // Default MXCSR rounding: to nearest, ties to even. |x / d| <= 127, so no saturation.
            let q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
            let q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
            _mm_storeu_si128(q.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(q_lo));
            _mm_storeu_si128(
                q.as_mut_ptr().add(LANES).cast(),
                _mm512_cvtsepi32_epi8(q_hi),
            );
            *corr = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
        }
    }

    /// Runs the `(mr, NP)` kernel; `mr` in `1..=MR_MAX`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI (checked when the matrix was packed); `tile` is valid.
    pub(super) unsafe fn dispatch<const NP: usize>(mr: usize, tile: &Tile) {
        match mr {
            1 => kernel::<1, NP>(tile),
            2 => kernel::<2, NP>(tile),
            3 => kernel::<3, NP>(tile),
            4 => kernel::<4, NP>(tile),
            5 => kernel::<5, NP>(tile),
            _ => kernel::<6, NP>(tile),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn kernel<const MR: usize, const NP: usize>(tile: &Tile) {
        let blocks = tile.blocks;
        let mut acc: [[__m512; NP]; MR] = [[_mm512_setzero_ps(); NP]; MR];
        for b in 0..blocks {
            let mut isum: [[__m512i; NP]; MR] = [[_mm512_setzero_si512(); NP]; MR];
            for t in 0..8 {
                let mut weights: [__m512i; NP] = [_mm512_setzero_si512(); NP];
                for (j, w) in weights.iter_mut().enumerate() {
                    // 64-byte aligned (`Quads` is `align(64)`).
                    *w = _mm512_load_si512(tile.quads.add((j * blocks + b) * 8 + t).cast());
                }
                for (i, row_sums) in isum.iter_mut().enumerate() {
                    let at = tile.xq.add(i * tile.cols + b * BLOCK + 4 * t);
                    let x = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                    for (j, s) in row_sums.iter_mut().enumerate() {
                        *s = _mm512_dpbusd_epi32(*s, weights[j], x);
                    }
                }
            }
            let mut w_scales: [__m512; NP] = [_mm512_setzero_ps(); NP];
            for (j, s) in w_scales.iter_mut().enumerate() {
                *s = _mm512_load_ps(tile.scales.add(j * blocks + b).cast());
            }
            for (i, (row_acc, row_sums)) in acc.iter_mut().zip(&isum).enumerate() {
                let x_scale = _mm512_set1_ps(*tile.xd.add(i * blocks + b));
                let correction = _mm512_set1_epi32(*tile.xcorr.add(i * blocks + b));
                for (j, (a, s)) in row_acc.iter_mut().zip(row_sums).enumerate() {
                    let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(*s, correction));
                    *a = _mm512_fmadd_ps(dot, _mm512_mul_ps(w_scales[j], x_scale), *a);
                }
            }
        }
        crate::models::cpu_matmul::avx512::store(&acc, &tile.out);
    }
}

/// IEEE half to f32 (the Q8_0 block scale); exact for every half value.
fn half_to_f32(bits: u16) -> f32 {
    let exponent = i32::from((bits >> 10) & 0x1f);
    let mantissa = f32::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + mantissa / 1024.0) * 2f32.powi(e - 15),
    };
    if bits >> 15 == 1 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::models::cpu_matmul::{assert_epilogues_match, matmul_into, test_values};
    use candle_core::{DType, Device, Module};

    #[test]
    fn half_conversion_matches_candle() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|b| b.to_le_bytes()).collect();
        let want = Tensor::from_raw_buffer(&bytes, DType::F16, &[all.len()], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (bits, w) in all.iter().zip(want) {
            let got = half_to_f32(*bits);
            assert!(
                got.to_bits() == w.to_bits() || (got.is_nan() && w.is_nan()),
                "bits {bits:#x}: {got} vs {w}"
            );
        }
    }

    #[test]
    fn residual_and_silu_gate_epilogues_give_the_bits_of_the_separate_ops() {
        if !packed_q8_applies(&Device::Cpu) {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let pack = |rows: usize, cols: usize, seed: u64| {
            let w = Tensor::from_vec(test_values(rows * cols, seed), (rows, cols), &Device::Cpu)
                .unwrap();
            PackedQ8::pack(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap())
                .unwrap()
                .unwrap()
        };
        for (rows, cols) in [(48, 64), (160, 576)] {
            let (gate, up) = (pack(rows, cols, 5), pack(rows, cols, 6));
            let gated = PackedQ8::interleave_gate_up(&gate, &up).unwrap();
            assert_epilogues_match(&gate, &up, &gated);
        }
        assert!(PackedQ8::interleave_gate_up(&pack(40, 64, 1), &pack(40, 64, 2)).is_none());
    }

    #[test]
    fn packed_q8_matches_candle_q8_matmul_and_is_batch_invariant() {
        if !packed_q8_applies(&Device::Cpu) {
            eprintln!(
                "skipped: this CPU has no AVX-512 VNNI, the packed Q8_0 kernels are not used"
            );
            return;
        }
        for &(m, rows, cols) in &[(1, 16, 32), (3, 40, 64), (7, 50, 576), (32, 192, 576)] {
            let w = Tensor::from_vec(
                test_values(rows * cols, rows as u64),
                (rows, cols),
                &Device::Cpu,
            )
            .unwrap();
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let packed = PackedQ8::pack(&qt).unwrap().unwrap();
            let x = Tensor::from_vec(test_values(m * cols, 3 + m as u64), (m, cols), &Device::Cpu)
                .unwrap();
            // The exact product with the dequantized weights: wick's error (activations quantized
            // with f32 block scales) must not exceed candle's (f16 block scales) by more than noise.
            let exact = x
                .matmul(&qt.dequantize(&Device::Cpu).unwrap().t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let candle = candle_core::quantized::QMatMul::from_qtensor(qt)
                .unwrap()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let max_err = |rows_of: &dyn Fn(usize, usize) -> f32| {
                let mut worst = 0f32;
                for (i, exact_row) in exact.iter().enumerate() {
                    for (r, e) in exact_row.iter().enumerate() {
                        worst = worst.max((rows_of(i, r) - e).abs());
                    }
                }
                worst
            };
            let candle_err = max_err(&|i, r| candle[i][r]);
            let a = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for threads in [1, 2] {
                let mut got = vec![0f32; m * rows];
                matmul_into(&packed, &a, m, &mut got, threads);
                let wick_err = max_err(&|i, r| got[i * rows + r]);
                assert!(
                    wick_err <= candle_err * 1.25 + 1e-5,
                    "m={m} rows={rows} cols={cols} threads={threads}: error {wick_err} vs candle's {candle_err}"
                );
                for i in 0..m {
                    let mut alone = vec![0f32; rows];
                    matmul_into(&packed, &a[i * cols..(i + 1) * cols], 1, &mut alone, 1);
                    assert_eq!(
                        alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        got[i * rows..(i + 1) * rows]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        "row {i} differs alone and in a batch of {m}"
                    );
                }
            }
            let y = packed.matmul_t(&x).unwrap();
            assert_eq!(y.dims(), &[m, rows]);
        }
    }

    #[test]
    fn other_formats_and_shapes_are_not_packed() {
        let w = Tensor::from_vec(test_values(32 * 256, 1), (32, 256), &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(PackedQ8::pack(&q4).unwrap().is_none());
    }
}
