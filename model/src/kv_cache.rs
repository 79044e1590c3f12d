//! Keys and values of the positions already processed, per layer, for incremental decoding.

use burn::tensor::{Int, Tensor, TensorData};

/// The KV cache of a batch of sequences.
///
/// Rows are sequences; columns are past positions (padding columns included, marked in
/// `valid`). Rows can be dropped between steps ([`KvCache::retain_rows`]) when their sequence
/// has finished, so finished sequences cost nothing.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, len, head_dim]`.
    pub layers: Vec<(Tensor<4>, Tensor<4>)>,
    /// `[batch * len]`: whether each cached column holds a real token.
    pub valid: Vec<bool>,
    pub batch: usize,
    pub len: usize,
}

impl KvCache {
    pub(crate) fn new(
        layers: Vec<(Tensor<4>, Tensor<4>)>,
        valid: Vec<bool>,
        batch: usize,
        len: usize,
    ) -> Self {
        KvCache {
            layers,
            valid,
            batch,
            len,
        }
    }

    /// Appends `seq` new columns per row (the layers already grew inside the forward pass).
    pub(crate) fn extend_valid(&mut self, new_valid: &[bool], seq: usize) {
        let old = std::mem::take(&mut self.valid);
        let new_len = self.len + seq;
        let mut valid = Vec::with_capacity(self.batch * new_len);
        for row in 0..self.batch {
            valid.extend_from_slice(&old[row * self.len..(row + 1) * self.len]);
            valid.extend_from_slice(&new_valid[row * seq..(row + 1) * seq]);
        }
        self.valid = valid;
        self.len = new_len;
    }

    /// Keeps only the given rows, in the given order.
    pub fn retain_rows(&mut self, rows: &[usize]) {
        if rows.len() == self.batch && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        let device = match self.layers.first() {
            Some((k, _)) => k.device(),
            None => return,
        };
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
        for (k, v) in &mut self.layers {
            *k = k.clone().select(0, idx.clone());
            *v = v.clone().select(0, idx.clone());
        }
        let mut valid = Vec::with_capacity(rows.len() * self.len);
        for &r in rows {
            valid.extend_from_slice(&self.valid[r * self.len..(r + 1) * self.len]);
        }
        self.valid = valid;
        self.batch = rows.len();
    }
}
