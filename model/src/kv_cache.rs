//! Keys and values of the positions already processed, per layer, for incremental decoding.
//!
//! Columns are stored **newest first**: column 0 holds each row's latest token and a row's real
//! tokens are a prefix of its columns, padding (masked) at the end. Rows of different lengths
//! then differ only in trailing zeros, which every attention sum adds last, so a row's attention
//! output is bit-identical whatever it shares the batch with (with time-ordered, left-padded
//! rows the leading zeros shift the sum's blocking and change the rounding).

use burn::tensor::{Int, Tensor, TensorData};

/// The KV cache of a batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, len, head_dim]`, newest column first.
    pub layers: Vec<(Tensor<4>, Tensor<4>)>,
    /// `[batch * len]`: whether each cached column holds a real token (a prefix of each row).
    pub valid: Vec<bool>,
    pub batch: usize,
    pub len: usize,
}

impl KvCache {
    /// A cache from a prefill's keys and values in time order (left-padded rows).
    pub(crate) fn from_prefill(
        layers: Vec<(Tensor<4>, Tensor<4>)>,
        valid: Vec<bool>,
        batch: usize,
        len: usize,
    ) -> Self {
        let layers = layers
            .into_iter()
            .map(|(k, v)| (k.flip([2]), v.flip([2])))
            .collect();
        let valid = (0..batch)
            .flat_map(|row| {
                valid[row * len..(row + 1) * len]
                    .iter()
                    .rev()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        KvCache {
            layers,
            valid,
            batch,
            len,
        }
    }

    /// Valid flags of the keys one decode step attends to, `[batch * (len + 1)]`: the new token
    /// (column 0) then the cached columns.
    pub(crate) fn step_valid(&self) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.batch * (self.len + 1));
        for row in 0..self.batch {
            out.push(true);
            out.extend_from_slice(&self.valid[row * self.len..(row + 1) * self.len]);
        }
        out
    }

    /// Puts one new column (the step's keys and values) in front of layer `i`'s cache.
    pub(crate) fn push_front(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let (past_k, past_v) = &mut self.layers[layer];
        *past_k = Tensor::cat(vec![k, past_k.clone()], 2);
        *past_v = Tensor::cat(vec![v, past_v.clone()], 2);
        (past_k.clone(), past_v.clone())
    }

    /// Records the column the layers just received in front.
    pub(crate) fn commit_step(&mut self) {
        self.valid = self.step_valid();
        self.len += 1;
    }

    /// Stacks another cache's rows under this one's; the shorter is padded at the end.
    pub fn merge(mut self, mut other: KvCache) -> KvCache {
        let len = self.len.max(other.len);
        self.pad_end(len - self.len);
        other.pad_end(len - other.len);
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

    /// Adds `n` masked columns after every row.
    fn pad_end(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        for (k, v) in &mut self.layers {
            let [b, h, _, d] = k.dims();
            let zeros = Tensor::<4>::zeros([b, h, n, d], &k.device());
            *k = Tensor::cat(vec![k.clone(), zeros.clone()], 2);
            *v = Tensor::cat(vec![v.clone(), zeros], 2);
        }
        let mut valid = Vec::with_capacity(self.batch * (self.len + n));
        for row in 0..self.batch {
            valid.extend_from_slice(&self.valid[row * self.len..(row + 1) * self.len]);
            valid.extend(std::iter::repeat_n(false, n));
        }
        self.valid = valid;
        self.len += n;
    }

    /// Drops the trailing columns that are padding in every row (left by sequences that left).
    pub fn trim(&mut self) {
        let keep = (0..self.batch)
            .map(|row| {
                self.valid[row * self.len..(row + 1) * self.len]
                    .iter()
                    .filter(|v| **v)
                    .count()
            })
            .max()
            .unwrap_or(0);
        if keep == 0 || keep >= self.len {
            return;
        }
        for (k, v) in &mut self.layers {
            let [b, h, _, d] = k.dims();
            *k = k.clone().slice([0..b, 0..h, 0..keep, 0..d]);
            *v = v.clone().slice([0..b, 0..h, 0..keep, 0..d]);
        }
        let mut valid = Vec::with_capacity(self.batch * keep);
        for row in 0..self.batch {
            valid.extend_from_slice(&self.valid[row * self.len..row * self.len + keep]);
        }
        self.valid = valid;
        self.len = keep;
    }

    /// Keeps the given rows in the given order (a row may repeat: samples sharing a prompt).
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
