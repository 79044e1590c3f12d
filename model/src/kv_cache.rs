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

    /// Stacks another cache's rows under this one's; the shorter one is left-padded with masked
    /// columns so both end in the same column.
    pub fn merge(mut self, mut other: KvCache) -> KvCache {
        let len = self.len.max(other.len);
        self.pad_left(len - self.len);
        other.pad_left(len - other.len);
        let layers = self
            .layers
            .into_iter()
            .zip(other.layers)
            .map(|((k1, v1), (k2, v2))| {
                (Tensor::cat(vec![k1, k2], 0), Tensor::cat(vec![v1, v2], 0))
            })
            .collect();
        let mut valid = self.valid;
        valid.extend(other.valid);
        KvCache {
            layers,
            valid,
            batch: self.batch + other.batch,
            len,
        }
    }

    /// Adds `n` masked columns before every row.
    fn pad_left(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        for (k, v) in &mut self.layers {
            let [b, h, _, d] = k.dims();
            let zeros = Tensor::<4>::zeros([b, h, n, d], &k.device());
            *k = Tensor::cat(vec![zeros.clone(), k.clone()], 2);
            *v = Tensor::cat(vec![zeros, v.clone()], 2);
        }
        let mut valid = Vec::with_capacity(self.batch * (self.len + n));
        for row in 0..self.batch {
            valid.extend(std::iter::repeat_n(false, n));
            valid.extend_from_slice(&self.valid[row * self.len..(row + 1) * self.len]);
        }
        self.valid = valid;
        self.len += n;
    }

    /// Drops the leading columns that are padding in every row (left by sequences that left).
    pub fn trim_left(&mut self) {
        let lead = (0..self.batch)
            .map(|row| {
                self.valid[row * self.len..(row + 1) * self.len]
                    .iter()
                    .take_while(|v| !**v)
                    .count()
            })
            .min()
            .unwrap_or(0);
        if lead == 0 || lead >= self.len {
            return;
        }
        for (k, v) in &mut self.layers {
            let [b, h, t, d] = k.dims();
            *k = k.clone().slice([0..b, 0..h, lead..t, 0..d]);
            *v = v.clone().slice([0..b, 0..h, lead..t, 0..d]);
        }
        let new_len = self.len - lead;
        let mut valid = Vec::with_capacity(self.batch * new_len);
        for row in 0..self.batch {
            valid.extend_from_slice(&self.valid[row * self.len + lead..(row + 1) * self.len]);
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
