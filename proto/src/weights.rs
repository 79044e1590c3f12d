//! Weight updates on the wire: tensors cut into `WeightChunk`s, and the checks that put them back
//! together (byte order, sizes, one version, a final sha256).

use sha2::{Digest, Sha256};

use crate::v1::{DType, WeightChunk};

/// One named tensor's little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Bytes the shape and dtype call for.
    pub fn expected_bytes(&self) -> u64 {
        let element = match self.dtype {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::Unspecified => 0,
        };
        self.shape.iter().product::<u64>() * element
    }
}

/// Why a weight stream was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightStreamError {
    #[error("chunk {index}: {message}")]
    BadChunk { index: usize, message: String },
    #[error("the stream ended before its final chunk (after {chunks} chunks)")]
    Truncated { chunks: usize },
    #[error("checksum mismatch: the stream says {expected}, the bytes hash to {actual}")]
    Checksum { expected: String, actual: String },
}

fn hash_chunk(hasher: &mut Sha256, chunk: &WeightChunk) {
    hasher.update(chunk.name.as_bytes());
    hasher.update(chunk.offset.to_le_bytes());
    hasher.update(&chunk.data);
}

/// Cuts tensors into chunks of at most `chunk_bytes` data bytes, then a final chunk with the
/// sha256 of every name, offset and byte before it.
pub fn to_chunks(tensors: &[WireTensor], version: u64, chunk_bytes: usize) -> Vec<WeightChunk> {
    let chunk_bytes = chunk_bytes.max(1);
    let mut hasher = Sha256::new();
    let mut chunks = Vec::new();
    for t in tensors {
        let pieces: Vec<&[u8]> = if t.data.is_empty() {
            vec![&[][..]]
        } else {
            t.data.chunks(chunk_bytes).collect()
        };
        let mut offset = 0u64;
        for piece in pieces {
            let chunk = WeightChunk {
                version,
                name: t.name.clone(),
                dtype: t.dtype as i32,
                shape: t.shape.clone(),
                offset,
                data: piece.to_vec(),
                sha256: String::new(),
                last: false,
            };
            hash_chunk(&mut hasher, &chunk);
            offset += piece.len() as u64;
            chunks.push(chunk);
        }
    }
    chunks.push(WeightChunk {
        version,
        sha256: hex::encode(hasher.finalize()),
        last: true,
        ..Default::default()
    });
    chunks
}

/// Reassembles a chunk stream, checking every chunk as it arrives.
#[derive(Default)]
pub struct Assembler {
    version: Option<u64>,
    tensors: Vec<WireTensor>,
    hasher: Sha256,
    chunks: usize,
    finished: bool,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next chunk.
    pub fn push(&mut self, chunk: WeightChunk) -> Result<(), WeightStreamError> {
        let index = self.chunks;
        self.chunks += 1;
        let bad = |message: String| WeightStreamError::BadChunk { index, message };
        if self.finished {
            return Err(bad("data after the final chunk".into()));
        }
        match self.version {
            None => self.version = Some(chunk.version),
            Some(v) if v != chunk.version => {
                return Err(bad(format!(
                    "version {} in a stream of version {v}",
                    chunk.version
                )));
            }
            Some(_) => {}
        }
        if chunk.last {
            let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
            if actual != chunk.sha256 {
                return Err(WeightStreamError::Checksum {
                    expected: chunk.sha256,
                    actual,
                });
            }
            self.check_complete(index)?;
            self.finished = true;
            return Ok(());
        }
        hash_chunk(&mut self.hasher, &chunk);
        let dtype = DType::try_from(chunk.dtype).unwrap_or(DType::Unspecified);
        if dtype == DType::Unspecified {
            return Err(bad(format!(
                "tensor `{}`: unknown dtype {}",
                chunk.name, chunk.dtype
            )));
        }
        let continues = self.tensors.last().is_some_and(|t| t.name == chunk.name);
        if continues {
            let t = self.tensors.last_mut().expect("checked just above");
            if t.dtype != dtype || t.shape != chunk.shape {
                return Err(bad(format!(
                    "tensor `{}` changes dtype or shape between chunks",
                    chunk.name
                )));
            }
            if chunk.offset != t.data.len() as u64 {
                return Err(bad(format!(
                    "tensor `{}`: offset {} but {} bytes received so far",
                    chunk.name,
                    chunk.offset,
                    t.data.len()
                )));
            }
            t.data.extend_from_slice(&chunk.data);
            if t.data.len() as u64 > t.expected_bytes() {
                return Err(bad(format!(
                    "tensor `{}` has more bytes than its shape",
                    chunk.name
                )));
            }
        } else {
            self.check_complete(index)?;
            if self.tensors.iter().any(|t| t.name == chunk.name) {
                return Err(bad(format!("tensor `{}` appears twice", chunk.name)));
            }
            if chunk.offset != 0 {
                return Err(bad(format!(
                    "tensor `{}` starts at offset {}",
                    chunk.name, chunk.offset
                )));
            }
            let t = WireTensor {
                name: chunk.name,
                dtype,
                shape: chunk.shape,
                data: chunk.data,
            };
            if t.data.len() as u64 > t.expected_bytes() {
                return Err(bad(format!(
                    "tensor `{}` has more bytes than its shape",
                    t.name
                )));
            }
            self.tensors.push(t);
        }
        Ok(())
    }

    fn check_complete(&self, index: usize) -> Result<(), WeightStreamError> {
        match self.tensors.last() {
            Some(t) if t.data.len() as u64 != t.expected_bytes() => {
                Err(WeightStreamError::BadChunk {
                    index,
                    message: format!(
                        "tensor `{}` ended after {} of {} bytes",
                        t.name,
                        t.data.len(),
                        t.expected_bytes()
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// The version and tensors of a complete, verified stream.
    pub fn finish(self) -> Result<(u64, Vec<WireTensor>), WeightStreamError> {
        if !self.finished {
            return Err(WeightStreamError::Truncated {
                chunks: self.chunks,
            });
        }
        Ok((self.version.unwrap_or(0), self.tensors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<WireTensor> {
        vec![
            WireTensor {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
                data: (0..24).collect(),
            },
            WireTensor {
                name: "b".into(),
                dtype: DType::Bf16,
                shape: vec![5],
                data: (100..110).collect(),
            },
        ]
    }

    fn assemble(chunks: Vec<WeightChunk>) -> Result<(u64, Vec<WireTensor>), WeightStreamError> {
        let mut a = Assembler::new();
        for c in chunks {
            a.push(c)?;
        }
        a.finish()
    }

    #[test]
    fn round_trip() {
        let chunks = to_chunks(&tensors(), 7, 5);
        assert!(chunks.len() > 4);
        assert_eq!(assemble(chunks).unwrap(), (7, tensors()));
    }

    #[test]
    fn truncated_corrupt_and_reordered_streams_are_refused() {
        let chunks = to_chunks(&tensors(), 7, 5);
        let mut short = chunks.clone();
        short.pop();
        assert!(matches!(
            assemble(short),
            Err(WeightStreamError::Truncated { .. })
        ));

        let mut corrupt = chunks.clone();
        corrupt[1].data[0] ^= 1;
        assert!(matches!(
            assemble(corrupt),
            Err(WeightStreamError::Checksum { .. })
        ));

        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        assert!(matches!(
            assemble(swapped),
            Err(WeightStreamError::BadChunk { .. })
        ));

        let mut missing_piece = chunks.clone();
        missing_piece.remove(2);
        let err = assemble(missing_piece).unwrap_err().to_string();
        assert!(err.contains("tensor"), "{err}");

        let mut mixed = chunks;
        mixed[1].version = 8;
        assert!(
            assemble(mixed)
                .unwrap_err()
                .to_string()
                .contains("version 8")
        );
    }
}
