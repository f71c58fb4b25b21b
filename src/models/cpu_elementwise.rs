//! Elementwise CPU kernels in f32 with AVX-512: a vectorized `exp` (decode attention's softmax uses
//! it), the gated activation `silu(gate) * up` of an MLP whose gate and up projections came out of
//! one stacked matmul, and RMS norm.
//!
//! Why: at decode sizes candle's elementwise ops call the C library's scalar `expf` per element and
//! make one pass (and one allocation) per op over strided views; on a 32-sequence step of a 135M model
//! that was a few percent of the step, all of it on the thread that waits for the next matmul.
//!
//! `exp` is the Cephes single-precision scheme: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
//! polynomial for `e^r`, and `vscalefps` for `2^n` (which also gives 0 and infinity past the range
//! ends). Its error is within 2 ulp of the true value over the f32 range (tested against f64).

use candle_core::{CpuStorage, Result, Storage, Tensor};

use crate::models::cpu_matmul::cpu_has_avx512f;

/// Lanes of one AVX-512 vector of f32.
const LANES: usize = 16;

/// `silu(gate) * up` for `stacked` `(tokens, 2 * width)` f32 on the CPU with gate in columns
/// `0..width` and up in `width..2 * width` (the output of a fused gate/up projection).
///
/// Returns `(tokens, width)`, or `None` where this kernel does not apply (not f32 on a CPU with
/// AVX-512F, or not a contiguous 2-D tensor of that width); the caller then takes candle's ops.
pub(crate) fn silu_mul_stacked(stacked: &Tensor, width: usize) -> Result<Option<Tensor>> {
    if !stacked.device().is_cpu() || !cpu_has_avx512f() || stacked.rank() != 2 {
        return Ok(None);
    }
    let (tokens, cols) = stacked.dims2()?;
    if cols != 2 * width {
        return Ok(None);
    }
    let out = {
        let (storage, layout) = stacked.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let values = &values[start..end];
        let mut out = vec![0f32; tokens * width];
        for (row, out_row) in values.chunks_exact(cols).zip(out.chunks_exact_mut(width)) {
            let (gate, up) = row.split_at(width);
            silu_mul_row(gate, up, out_row);
        }
        out
    };
    Tensor::from_vec(out, (tokens, width), stacked.device()).map(Some)
}

/// RMS norm of each row of `xs` `(..., dim)`: `x / sqrt(mean(x^2) + eps) * weight`, `weight`
/// `(dim,)`; the same formula as candle's `rms_norm` op, one pass per row on the calling thread
/// (candle's op hands every row to the thread pool, which costs more than the row at decode sizes).
///
/// Returns `None` where this kernel does not apply (not f32 on a CPU with AVX-512F, or not
/// contiguous); the caller then takes candle's op.
pub(crate) fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    if !xs.device().is_cpu() || !cpu_has_avx512f() || xs.rank() == 0 {
        return Ok(None);
    }
    let dim = xs.dim(candle_core::D::Minus1)?;
    if weight.dims() != [dim] || dim == 0 {
        return Ok(None);
    }
    let out = {
        let (storage, layout) = xs.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(values)), Storage::Cpu(CpuStorage::F32(w_values))) =
            (&*storage, &*w_storage)
        else {
            return Ok(None);
        };
        let (Some((start, end)), Some((w_start, w_end))) =
            (layout.contiguous_offsets(), w_layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let (values, w) = (&values[start..end], &w_values[w_start..w_end]);
        let mut out = vec![0f32; values.len()];
        for (row, out_row) in values.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F checked above; `row`, `w` and `out_row` are all `dim` long.
            unsafe {
                avx512::rms_norm_row(row, w, eps, out_row)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let m = (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt();
                for ((o, x), a) in out_row.iter_mut().zip(row).zip(w) {
                    *o = x / m * a;
                }
            }
        }
        out
    };
    Tensor::from_vec(out, xs.shape(), xs.device()).map(Some)
}

/// `out[i] = silu(gate[i]) * up[i]`, all three the same length.
fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called after `cpu_has_avx512f()` (see `silu_mul_stacked`); the slices are the
        // same length, so every masked load and store stays inside them.
        unsafe { avx512::silu_mul(gate, up, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::{
        __m512, __mmask16, _mm512_add_ps, _mm512_div_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps,
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps,
        _mm512_reduce_add_ps, _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_sub_ps, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
    };

    use super::LANES;

    /// `e^x` lane-wise. Inputs below about -104 give 0, above about 88.7 infinity; NaN stays NaN.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn exp(x: __m512) -> __m512 {
        // Clamp so `n` stays a small integer; `scalef` then underflows to 0 or overflows to infinity.
        // The bound comes first: `vmaxps`/`vminps` return their second operand when either is NaN.
        let x = _mm512_min_ps(
            _mm512_set1_ps(89.0),
            _mm512_max_ps(_mm512_set1_ps(-110.0), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n ln2, with ln2 split in two so the product is exact enough (Cephes constants).
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // e^r = 1 + r + r^2 p(r)
        let r2 = _mm512_mul_ps(r, r);
        let er = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(er, n)
    }

    /// A mask of the first `lanes` (at most 16) lanes.
    #[inline(always)]
    pub(crate) fn first_lanes(lanes: usize) -> __mmask16 {
        if lanes >= LANES {
            u16::MAX
        } else {
            (1u16 << lanes) - 1
        }
    }

    /// One row of [`super::rms_norm`]: squares summed in 16 lanes, the lanes added in a fixed
    /// order, then `x / m * weight` with `m = sqrt(sum / len + eps)`.
    ///
    /// # Safety
    /// AVX-512F; `row`, `weight` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rms_norm_row(row: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let len = row.len().min(weight.len()).min(out.len());
        let mut squares = _mm512_setzero_ps();
        let mut i = 0;
        while i < len {
            let x = _mm512_maskz_loadu_ps(first_lanes(len - i), row.as_ptr().add(i));
            squares = _mm512_fmadd_ps(x, x, squares);
            i += LANES;
        }
        let m = _mm512_set1_ps((_mm512_reduce_add_ps(squares) / len as f32 + eps).sqrt());
        let mut i = 0;
        while i < len {
            let mask = first_lanes(len - i);
            let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(i));
            let w = _mm512_maskz_loadu_ps(mask, weight.as_ptr().add(i));
            let y = _mm512_mul_ps(_mm512_div_ps(x, m), w);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, y);
            i += LANES;
        }
    }

    /// `silu(g) * u` lane-wise, `silu(g) = g / (1 + e^-g)` (the one place this arithmetic lives:
    /// the fused gate/up matmul and [`silu_mul`] both call it, so they agree to the bit).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn silu_times(g: __m512, u: __m512) -> __m512 {
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_mul_ps(silu, u)
    }

    /// `out[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + e^-g)`.
    ///
    /// # Safety
    /// AVX-512F; `gate`, `up` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let len = out.len().min(gate.len()).min(up.len());
        let mut i = 0;
        while i < len {
            let mask = first_lanes(len - i);
            let g = _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(mask, up.as_ptr().add(i));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, silu_times(g, u));
            i += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use candle_core::Device;

    /// Units in the last place between `got` and the f64 value `want` rounded to f32.
    fn ulps(got: f32, want: f64) -> u32 {
        let want = want as f32;
        if got == want {
            return 0;
        }
        (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_is_within_two_ulp_of_f64_over_the_range_and_saturates_at_the_ends() {
        use std::arch::x86_64::{_mm512_loadu_ps, _mm512_storeu_ps};
        if !cpu_has_avx512f() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut inputs: Vec<f32> = (0..200_000)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        inputs.extend([0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3, 0.5, -0.5]);
        while !inputs.len().is_multiple_of(16) {
            inputs.push(0.25);
        }
        for block in inputs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above; 16 values in and out.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    avx512::exp(_mm512_loadu_ps(block.as_ptr())),
                )
            };
            for (x, g) in block.iter().zip(got) {
                let want = f64::from(*x).exp();
                let e = ulps(g, want);
                assert!(e <= 2, "exp({x}) = {g}, f64 says {want} ({e} ulp)");
            }
        }
        let ends = [
            -1000.0,
            -200.0,
            200.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            0.0,
        ];
        let mut block = [0f32; 16];
        block[..8].copy_from_slice(&ends);
        let mut got = [0f32; 16];
        // SAFETY: AVX-512F checked above; 16 values in and out.
        unsafe {
            _mm512_storeu_ps(
                got.as_mut_ptr(),
                avx512::exp(_mm512_loadu_ps(block.as_ptr())),
            )
        };
        assert_eq!(&got[..5], &[0.0, 0.0, f32::INFINITY, f32::INFINITY, 0.0]);
        assert!(got[5].is_nan());
        assert_eq!(got[6], 1.0);
    }

    #[test]
    fn rms_norm_matches_candles_op() {
        for dim in [8, 37, 576] {
            let rows = 6;
            let xs: Vec<f32> = (0..rows * dim)
                .map(|i| ((i * 7919) % 2001) as f32 / 500.0 - 2.0)
                .collect();
            let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
            let xs = Tensor::from_vec(xs, (2, rows / 2, dim), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(w, dim, &Device::Cpu).unwrap();
            let Some(got) = rms_norm(&xs, &w, 1e-5).unwrap() else {
                assert!(!cpu_has_avx512f(), "the kernel applies on an AVX-512 CPU");
                eprintln!("skipped: this CPU has no AVX-512F");
                return;
            };
            assert_eq!(got.dims(), xs.dims());
            let want = candle_nn::ops::rms_norm(&xs, &w, 1e-5).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 8.0 * f32::EPSILON * w.abs().max(1e-3),
                    "dim {dim}: {g} vs candle's {w}"
                );
            }
        }
        // A weight of the wrong width: not this kernel's case.
        let xs = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(7, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(&xs, &w, 1e-5).unwrap().is_none());
    }

    #[test]
    fn silu_mul_matches_candles_ops_on_a_stacked_output() {
        let (tokens, width) = (5, 37); // a width that is not a multiple of 16 exercises the tails
        let values: Vec<f32> = (0..tokens * 2 * width)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let stacked = Tensor::from_vec(values, (tokens, 2 * width), &Device::Cpu).unwrap();
        let Some(got) = silu_mul_stacked(&stacked, width).unwrap() else {
            assert!(!cpu_has_avx512f(), "the kernel applies on an AVX-512 CPU");
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        };
        let gate = stacked.narrow(1, 0, width).unwrap();
        let up = stacked.narrow(1, width, width).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        let (got, want) = (
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap(),
        );
        for (g_row, w_row) in got.iter().zip(&want) {
            for (g, w) in g_row.iter().zip(w_row) {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * w.abs().max(1e-6),
                    "{g} vs candle's {w}"
                );
            }
        }
        // Not the stacked shape: the caller keeps candle's ops.
        assert!(silu_mul_stacked(&stacked, width + 1).unwrap().is_none());
    }
}
