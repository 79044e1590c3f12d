//! Llama-family language models in burn: Hugging Face checkpoints in and out, tokenizer and chat
//! template, batched log-probs, reward scores and values, and KV-cache generation.
//!
//! ```no_run
//! use rlhf_model::{GenerationParams, GenerationRequest, Model, Tokenizer, device};
//! # fn main() -> Result<(), rlhf_model::ModelError> {
//! let dir = std::path::Path::new("../shared/fixtures/tiny-llama");
//! let model = Model::load(dir, &device::inference_device()?)?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let prompt = tokenizer.encode("The quick brown fox", true)?;
//! let request = GenerationRequest { prompt, params: GenerationParams::default() };
//! let out = model.generate(&[request], Some(&tokenizer))?;
//! println!("{}", tokenizer.decode(&out[0].tokens, true)?);
//! # Ok(()) }
//! ```

pub mod batch;
pub mod config;
pub mod decode;
pub mod device;
pub mod dtype;
pub mod error;
pub mod generate;
pub mod hf;
pub mod host;
pub mod kv_cache;
pub mod llama;
pub mod logprobs;
pub mod losses;
pub mod optim;
pub mod rope;
pub mod sampling;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use burn;
pub use config::{Architecture, Family, HeadKind, LlamaDims, ModelConfig};
pub use decode::{DecodeBatch, Finished};
pub use dtype::DType;
pub use error::{ModelError, Result};
pub use generate::{FinishReason, Generation, GenerationParams, GenerationRequest};
pub use llama::Model;
pub use logprobs::{CompletionTensors, Pair};
pub use sampling::SamplingParams;
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::{NamedTensor, ParamSpec, SaveOptions};
