//! Storage dtypes of weights and the conversions between f32 values and their little-endian
//! bytes.
//!
//! The model computes in f32. bf16 and f16 values are exactly representable in f32, so
//! decode → encode in the same dtype is bit-exact, which makes load → save → load bit-exact.

use half::{bf16, f16};

/// Storage type of weights in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Parses `float32` / `bfloat16` / `float16` (and the safetensors names F32/BF16/F16).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "f16" | "fp16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// The name `transformers` writes in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Decodes little-endian bytes of `dtype` into f32 values. `bytes.len()` must be a multiple of
/// the element size (checked by the callers, which know the tensor's name).
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())),
    }
    out
}

/// The safetensors dtype of ours.
pub fn to_safetensors(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    }
}

/// Ours of a safetensors dtype, if we can load it.
pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_bit_exact() {
        let values = [0.0f32, -0.0, 1.5, -3.25, 65504.0, 1e-3, f32::INFINITY];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let once = decode(dtype, &encode(dtype, &values));
            let bytes = encode(dtype, &once);
            assert_eq!(encode(dtype, &decode(dtype, &bytes)), bytes, "{dtype}");
        }
        let exact = decode(DType::F32, &encode(DType::F32, &values));
        assert_eq!(
            exact.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bf16_keeps_the_high_half() {
        let bytes = encode(DType::BF16, &[1.0]);
        assert_eq!(bytes, vec![0x80, 0x3f]);
    }
}
