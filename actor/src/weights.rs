//! Weight updates as they arrive: chunks assembled into tensors (checksums and order checked by
//! `rlhf_proto::weights::Assembler`), then checked against the model's parameters and decoded to
//! f32, ready to stage in the engine.

use rlhf_model::weights::{NamedTensor, param_specs};
use rlhf_model::{DType, ModelConfig};
use rlhf_proto::v1;
use rlhf_proto::weights::{Assembler, WireTensor};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// A weight update, checked and ready to stage.
pub struct Update {
    pub version: u64,
    pub tensors: Vec<NamedTensor>,
    /// Tensor bytes received.
    pub bytes: u64,
}

/// The status of an update the actor will not apply.
pub fn refused(reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("weight update refused: {reason}"))
}

/// Reads a whole update from `chunks` and checks it against `config`. A broken stream fails
/// with its own status; a truncated, corrupt or mismatched update is refused.
pub async fn receive(
    config: &ModelConfig,
    mut chunks: impl Stream<Item = Result<v1::WeightChunk, Status>> + Unpin,
) -> Result<Update, Status> {
    let mut assembler = Assembler::new();
    let mut bytes = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        bytes += chunk.data.len() as u64;
        assembler.push(chunk).map_err(refused)?;
    }
    let (version, tensors) = assembler.finish().map_err(refused)?;
    let tensors = check_update(config, tensors).map_err(refused)?;
    Ok(Update {
        version,
        tensors,
        bytes,
    })
}

/// Checks a weight update against the model's parameters and converts it to f32 tensors: every
/// parameter exactly once, with its shape; unknown names refused.
pub fn check_update(
    config: &ModelConfig,
    tensors: Vec<WireTensor>,
) -> Result<Vec<NamedTensor>, String> {
    let specs = param_specs(config);
    if tensors.len() != specs.len() {
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let missing: Vec<&str> = specs
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !names.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing tensors: {}", missing.join(", ")));
        }
    }
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let spec = specs
            .iter()
            .find(|s| s.name == t.name)
            .ok_or_else(|| format!("unknown tensor `{}`", t.name))?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        if shape != spec.shape {
            return Err(format!(
                "tensor `{}`: shape {:?}, the model has {:?}",
                t.name, shape, spec.shape
            ));
        }
        let dtype = match t.dtype {
            v1::DType::F32 => DType::F32,
            v1::DType::Bf16 => DType::BF16,
            v1::DType::F16 => DType::F16,
            v1::DType::Unspecified => {
                return Err(format!("tensor `{}`: dtype unspecified", t.name));
            }
        };
        out.push(NamedTensor {
            name: t.name,
            shape,
            values: rlhf_model::dtype::decode(dtype, &t.data),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rlhf_model::LlamaDims;
    use rlhf_proto::weights::to_chunks;

    use super::*;

    fn config() -> ModelConfig {
        ModelConfig::llama(LlamaDims {
            vocab_size: 8,
            hidden_size: 4,
            intermediate_size: 4,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            bos_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 2,
        })
    }

    /// Every parameter of `config`, filled with `value`.
    fn tensors(config: &ModelConfig, value: f32) -> Vec<WireTensor> {
        param_specs(config)
            .into_iter()
            .map(|s| WireTensor {
                name: s.name,
                dtype: v1::DType::F32,
                shape: s.shape.iter().map(|&d| d as u64).collect(),
                data: rlhf_model::dtype::encode(
                    DType::F32,
                    &vec![value; s.shape.iter().product::<usize>()],
                ),
            })
            .collect()
    }

    #[test]
    fn a_complete_update_decodes_and_mismatches_are_named() {
        let config = config();
        let ok = check_update(&config, tensors(&config, 0.5)).unwrap();
        assert_eq!(ok.len(), param_specs(&config).len());
        assert!(ok.iter().all(|t| t.values.iter().all(|&v| v == 0.5)));

        let mut missing = tensors(&config, 0.5);
        missing.retain(|t| t.name != "model.norm.weight");
        let err = check_update(&config, missing).unwrap_err();
        assert!(err.contains("missing tensors: model.norm.weight"), "{err}");

        let mut renamed = tensors(&config, 0.5);
        let t = renamed
            .iter_mut()
            .find(|t| t.name == "model.norm.weight")
            .unwrap();
        t.name = "model.norm.bias".into();
        let err = check_update(&config, renamed).unwrap_err();
        assert!(err.contains("model.norm.bias"), "{err}");

        let mut reshaped = tensors(&config, 0.5);
        let t = reshaped
            .iter_mut()
            .find(|t| t.name == "model.norm.weight")
            .unwrap();
        t.shape = vec![2, 2];
        let err = check_update(&config, reshaped).unwrap_err();
        assert!(err.contains("shape [2, 2]"), "{err}");

        let mut untyped = tensors(&config, 0.5);
        untyped[0].dtype = v1::DType::Unspecified;
        assert!(
            check_update(&config, untyped)
                .unwrap_err()
                .contains("dtype")
        );
    }

    #[tokio::test]
    async fn receive_assembles_checks_and_refuses() {
        let config = config();
        let chunks = to_chunks(&tensors(&config, 1.0), 3, 64);
        let bytes: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
        let update = receive(
            &config,
            tokio_stream::iter(chunks.clone().into_iter().map(Ok)),
        )
        .await
        .unwrap();
        assert_eq!((update.version, update.bytes), (3, bytes));

        let mut truncated = chunks;
        truncated.pop();
        let err = receive(&config, tokio_stream::iter(truncated.into_iter().map(Ok)))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("weight update refused: "),
            "{err:?}"
        );
    }
}
