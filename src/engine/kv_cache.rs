//! The KV cache, owned by the engine and lent to the model for each forward pass.
//!
//! A slot cache: per layer one K and one V tensor of shape `(num_slots, kv_heads, max_ctx, head_dim)`
//! in the compute dtype, allocated once at start. A sequence holds one slot for its life; its tokens
//! live at positions `0..len` of that slot. Which slot is free is the engine's bookkeeping; this type
//! only stores tensors. A freed slot is not zeroed: positions at or past a sequence's length are
//! always masked out of attention.

use candle_core::{bail, CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor};

use crate::models::{ModelInfo, SeqChunk};

/// Per-layer K and V tensors for every slot.
#[derive(Debug)]
pub struct KvCache {
    /// One `(k, v)` pair per layer, each `(num_slots, kv_heads, max_ctx, head_dim)`.
    layers: Vec<(Tensor, Tensor)>,
    num_slots: usize,
    max_ctx: usize,
    bytes_per_token: usize,
}

impl KvCache {
    /// Allocates the whole cache (zeros) on `device` in `info.dtype`.
    ///
    /// # Errors
    /// Zero slots or context, or allocation failure.
    pub fn new(
        info: &ModelInfo,
        num_slots: usize,
        max_ctx: usize,
        device: &Device,
    ) -> Result<Self> {
        if num_slots == 0 || max_ctx == 0 {
            bail!("kv cache needs at least one slot and one position (got {num_slots} slots, {max_ctx} positions)")
        }
        let shape = (num_slots, info.num_kv_heads, max_ctx, info.head_dim);
        let layers = (0..info.num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, info.dtype, device)?,
                    Tensor::zeros(shape, info.dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_slots,
            max_ctx,
            bytes_per_token: Self::bytes_per_token(info),
        })
    }

    /// Bytes of K plus V for one token across all layers: `2 * layers * kv_heads * head_dim * dtype size`.
    pub fn bytes_per_token(info: &ModelInfo) -> usize {
        2 * info.num_layers * info.num_kv_heads * info.head_dim * info.dtype.size_in_bytes()
    }

    /// Bytes the whole cache occupies: `bytes_per_token * num_slots * max_ctx`.
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_token * self.num_slots * self.max_ctx
    }

    /// Number of sequences the cache can hold at once.
    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Positions per slot (the longest sequence, prompt plus output).
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Number of layers stored.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The `(k, v)` tensors of `layer`, each `(num_slots, kv_heads, max_ctx, head_dim)`.
    ///
    /// # Errors
    /// `layer` out of range.
    pub fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match self.layers.get(layer) {
            Some((k, v)) => Ok((k, v)),
            None => bail!(
                "kv cache has {} layers, asked for layer {layer}",
                self.layers.len()
            ),
        }
    }

    /// Writes new keys and values of one sequence at positions `start_pos..start_pos + len` of `slot`.
    /// `k` and `v` are `(kv_heads, len, head_dim)`, contiguous, in the cache dtype.
    ///
    /// # Errors
    /// Out-of-range layer, slot or positions, or a shape/dtype mismatch.
    pub fn write(
        &mut self,
        layer: usize,
        slot: usize,
        start_pos: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        if slot >= self.num_slots {
            bail!("kv slot {slot} out of range ({} slots)", self.num_slots)
        }
        let len = k.dim(1)?;
        if start_pos + len > self.max_ctx {
            bail!(
                "kv positions {start_pos}..{} exceed the cache context {}",
                start_pos + len,
                self.max_ctx
            )
        }
        let (k_cache, v_cache) = self.layer(layer)?;
        // A narrow on dim 0 of a contiguous tensor is a contiguous view into the same storage, so
        // slice_set writes straight into the cache.
        k_cache
            .narrow(0, slot, 1)?
            .slice_set(&k.unsqueeze(0)?, 2, start_pos)?;
        v_cache
            .narrow(0, slot, 1)?
            .slice_set(&v.unsqueeze(0)?, 2, start_pos)?;
        Ok(())
    }

    /// Writes one position for each of `targets` (every chunk one token long): rows `i` of `k` and
    /// `v`, `(targets, kv_heads, head_dim)` f32, go to `targets[i].start_pos` of slot
    /// `targets[i].slot`. One pass over an f32 CPU cache, no per-sequence tensors (decode steps);
    /// other caches take [`KvCache::write`] per sequence.
    ///
    /// # Errors
    /// A chunk that is not one token, a slot or position outside the cache, or rows of the wrong
    /// length.
    pub fn write_rows(
        &mut self,
        layer: usize,
        targets: &[SeqChunk],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let (k_cache, v_cache) = self.layer(layer)?;
        let (_, kv_heads, _, head_dim) = k_cache.dims4()?;
        let row = kv_heads * head_dim;
        if k.len() != targets.len() * row || v.len() != k.len() {
            bail!(
                "kv rows write: {} and {} values for {} rows of {row}",
                k.len(),
                v.len(),
                targets.len()
            );
        }
        for target in targets {
            if target.len != 1 || target.slot >= self.num_slots || target.start_pos >= self.max_ctx
            {
                bail!(
                    "kv rows write: {target:?} is not one position inside the cache ({} slots, {} positions)",
                    self.num_slots,
                    self.max_ctx
                );
            }
        }
        if k_cache.device().is_cpu() && k_cache.dtype() == DType::F32 {
            for (cache, rows) in [(k_cache, k), (v_cache, v)] {
                cache.inplace_op1(&WriteRows {
                    rows,
                    targets,
                    layout: SlotLayout {
                        kv_heads,
                        max_ctx: self.max_ctx,
                        head_dim,
                    },
                })?;
            }
            return Ok(());
        }
        let (device, dtype) = (k_cache.device().clone(), k_cache.dtype());
        for (i, target) in targets.iter().enumerate() {
            let part = |all: &[f32]| {
                Tensor::from_slice(
                    &all[i * row..(i + 1) * row],
                    (kv_heads, 1, head_dim),
                    &device,
                )?
                .to_dtype(dtype)
            };
            let (k_row, v_row) = (part(k)?, part(v)?);
            self.write(layer, target.slot, target.start_pos, &k_row, &v_row)?;
        }
        Ok(())
    }
}

/// Where a position lives in one layer's contiguous `(slots, kv_heads, max_ctx, head_dim)` cache
/// tensor, read as a flat slice (the cache write here, decode attention in `models::cpu_attention`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotLayout {
    pub(crate) kv_heads: usize,
    pub(crate) max_ctx: usize,
    pub(crate) head_dim: usize,
}

impl SlotLayout {
    /// Offset of `(slot, head, pos, 0)`.
    pub(crate) fn offset(&self, slot: usize, head: usize, pos: usize) -> usize {
        ((slot * self.kv_heads + head) * self.max_ctx + pos) * self.head_dim
    }
}

/// Writes `rows` `(targets, kv_heads, head_dim)` f32, row `i` at position `targets[i].start_pos` of
/// slot `targets[i].slot`, into a contiguous f32 CPU cache of `layout`.
struct WriteRows<'a> {
    rows: &'a [f32],
    targets: &'a [SeqChunk],
    layout: SlotLayout,
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "wick-kv-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(all) = storage else {
            bail!("kv rows write needs an f32 cache");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("kv rows write needs a contiguous cache");
        };
        let cache = &mut all[start..end];
        let layout = self.layout;
        let (hd, row) = (layout.head_dim, layout.kv_heads * layout.head_dim);
        for (target, values) in self.targets.iter().zip(self.rows.chunks_exact(row)) {
            for (head, head_values) in values.chunks_exact(hd).enumerate() {
                let at = layout.offset(target.slot, head, target.start_pos);
                let Some(cell) = cache.get_mut(at..at + hd) else {
                    bail!("kv rows write: {target:?} is outside the cache");
                };
                cell.copy_from_slice(head_values);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    fn info() -> ModelInfo {
        ModelInfo {
            architecture: "test".into(),
            vocab_size: 10,
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 4,
            max_position_embeddings: 64,
            eos_token_ids: vec![],
            bos_token_id: None,
            dtype: DType::F32,
        }
    }

    #[test]
    fn sizes_follow_shape() {
        let cache = KvCache::new(&info(), 3, 16, &Device::Cpu).unwrap();
        assert_eq!(KvCache::bytes_per_token(&info()), 2 * 2 * 2 * 4 * 4);
        assert_eq!(cache.total_bytes(), 2 * 2 * 2 * 4 * 4 * 3 * 16);
        assert_eq!(
            (cache.num_slots(), cache.max_ctx(), cache.num_layers()),
            (3, 16, 2)
        );
    }

    #[test]
    fn write_rows_puts_each_row_at_its_slot_and_position_and_checks_bounds() {
        let mut cache = KvCache::new(&info(), 3, 16, &Device::Cpu).unwrap();
        let targets = [
            SeqChunk {
                slot: 2,
                start_pos: 5,
                len: 1,
            },
            SeqChunk {
                slot: 0,
                start_pos: 15,
                len: 1,
            },
        ];
        // (targets, kv_heads 2, head_dim 4)
        let k: Vec<f32> = (1..=16).map(|x| x as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        cache.write_rows(1, &targets, &k, &v).unwrap();
        let (kc, vc) = cache.layer(1).unwrap();
        let at = |t: &Tensor, slot: usize, head: usize, pos: usize| {
            t.narrow(0, slot, 1)
                .unwrap()
                .narrow(1, head, 1)
                .unwrap()
                .narrow(2, pos, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(at(kc, 2, 0, 5), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(at(kc, 2, 1, 5), vec![5.0, 6.0, 7.0, 8.0]);
        assert_eq!(at(kc, 0, 1, 15), vec![13.0, 14.0, 15.0, 16.0]);
        assert_eq!(at(vc, 0, 0, 15), vec![-9.0, -10.0, -11.0, -12.0]);
        // Nothing else was touched: the sums are those of the rows.
        let total: f32 = kc.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(total, (1..=16).sum::<i32>() as f32);
        // Layer 0 untouched.
        let (k0, _) = cache.layer(0).unwrap();
        assert_eq!(k0.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // Outside the cache, more than one token, or rows of the wrong size: errors, no write.
        let mut bad = targets;
        bad[0].slot = 3;
        assert!(cache.write_rows(1, &bad, &k, &v).is_err());
        bad = targets;
        bad[1].start_pos = 16;
        assert!(cache.write_rows(1, &bad, &k, &v).is_err());
        bad = targets;
        bad[0].len = 2;
        assert!(cache.write_rows(1, &bad, &k, &v).is_err());
        assert!(cache.write_rows(1, &targets, &k[..8], &v).is_err());
    }

    #[test]
    fn write_lands_in_its_slot_and_positions_only() {
        let mut cache = KvCache::new(&info(), 3, 16, &Device::Cpu).unwrap();
        let k = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let v = (k.clone() * 2.0).unwrap();
        cache.write(1, 2, 5, &k, &v).unwrap();
        let (kc, vc) = cache.layer(1).unwrap();
        let total: f32 = kc.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(total, 24.0);
        let in_place: f32 = kc
            .narrow(0, 2, 1)
            .unwrap()
            .narrow(2, 5, 3)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(in_place, 24.0);
        let v_total: f32 = vc.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(v_total, 48.0);
        let other_layer: f32 = cache
            .layer(0)
            .unwrap()
            .0
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(other_layer, 0.0);
    }

    #[test]
    fn write_past_context_is_an_error() {
        let mut cache = KvCache::new(&info(), 1, 4, &Device::Cpu).unwrap();
        let k = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(cache.write(0, 0, 2, &k, &k).is_err());
        assert!(cache.write(0, 1, 0, &k, &k).is_err());
    }
}
