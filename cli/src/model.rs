//! `rlhf model info | init | generate | logprobs | score`.
//!
//! With `--json`, stdout holds exactly one JSON object; everything else goes to stderr.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rlhf_model::logprobs::rows_to_host;
use rlhf_model::{
    ChatMessage, GenerationParams, GenerationRequest, HeadKind, Model, ModelConfig, SamplingParams,
    Tokenizer, device,
};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Architecture, parameter count, dtype, vocabulary and context length.
    Info {
        #[command(flatten)]
        model: ModelArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A new model folder with random weights: the architecture from a Hugging Face
    /// `config.json`, the tokenizer files copied from another folder (for benchmarks and tests
    /// at a real model's shape without downloading it).
    Init {
        /// A `config.json` (or a folder holding one).
        #[arg(long)]
        config: PathBuf,
        /// A model folder whose tokenizer files are copied.
        #[arg(long)]
        tokenizer_from: PathBuf,
        /// The new folder.
        #[arg(long)]
        out: PathBuf,
        /// Seeds the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Continue a prompt.
    Generate(GenerateArgs),
    /// Log-probs of a completion's tokens given a prompt.
    Logprobs {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        prompt: String,
        /// Tokenised on its own, without special tokens.
        #[arg(long)]
        completion: String,
        /// Divide the logits by this before the softmax.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long)]
        json: bool,
    },
    /// A reward model's score of prompt + completion (concatenated, tokenised once).
    Score {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        completion: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ModelArg {
    /// Model folder: config.json, safetensors weights, tokenizer.json.
    #[arg(long = "model", value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the completion contains this text (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Info { model, json } => info(&model.dir, json),
        ModelCommand::Init {
            config,
            tokenizer_from,
            out,
            seed,
        } => init(&config, &tokenizer_from, &out, seed),
        ModelCommand::Generate(args) => generate(args),
        ModelCommand::Logprobs {
            model,
            prompt,
            completion,
            temperature,
            json,
        } => logprobs(&model.dir, &prompt, &completion, temperature, json),
        ModelCommand::Score {
            model,
            prompt,
            completion,
            json,
        } => score(&model.dir, &prompt, &completion, json),
    }
}

fn load(dir: &Path) -> Result<(Model, Tokenizer)> {
    let device = device::inference_device()?;
    let model =
        Model::load(dir, &device).with_context(|| format!("loading model {}", dir.display()))?;
    let tokenizer =
        Tokenizer::from_dir(dir).with_context(|| format!("loading tokenizer {}", dir.display()))?;
    Ok((model, tokenizer))
}

fn init(config: &Path, tokenizer_from: &Path, out: &Path, seed: u64) -> Result<()> {
    if out.join("config.json").exists() {
        bail!("{} already holds a model", out.display());
    }
    let config = ModelConfig::from_path(config)?;
    let options = rlhf_model::SaveOptions {
        dtype: rlhf_model::DType::F32,
        ..Default::default()
    };
    Model::init(&config, &device::inference_device()?, seed).save_with_tokenizer(
        out,
        &options,
        tokenizer_from,
    )?;
    eprintln!(
        "{}: {:.1}M parameters, random weights (seed {seed})",
        out.display(),
        config.num_parameters() as f64 / 1e6
    );
    Ok(())
}

fn info(dir: &Path, as_json: bool) -> Result<()> {
    let config = ModelConfig::from_path(dir)?;
    // The weights decide the dtype; reading them also checks they match the config.
    let model = Model::load(dir, &device::inference_device()?)?;
    let c = &model.config;
    let value = json!({
        "architecture": c.architecture.name(),
        "parameters": config.num_parameters(),
        "dtype": c.dtype.torch_name(),
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "hidden_size": c.hidden_size,
        "layers": c.num_layers,
        "attention_heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "tied_embeddings": c.tie_word_embeddings,
    });
    if as_json {
        println!("{value}");
    } else {
        println!("architecture    {}", c.architecture);
        println!(
            "parameters      {} ({:.2}M)",
            config.num_parameters(),
            config.num_parameters() as f64 / 1e6
        );
        println!("dtype           {}", c.dtype);
        println!("vocab size      {}", c.vocab_size);
        println!("context length  {}", c.max_position_embeddings);
        println!(
            "shape           {} layers, hidden {}, {} heads ({} kv), mlp {}",
            c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size
        );
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (model, tokenizer) = load(&args.model.dir)?;
    let prompt_ids = if args.chat {
        tokenizer.encode_chat(&[ChatMessage::new("user", &args.prompt)], true)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        stop_strings: args.stop,
        ..Default::default()
    };
    let request = GenerationRequest {
        prompt: prompt_ids.clone(),
        params,
    };
    let out = model
        .generate(std::slice::from_ref(&request), Some(&tokenizer))?
        .remove(0);
    let text = tokenizer.decode(&out.tokens, true)?;
    if args.json {
        let value = json!({
            "prompt_ids": prompt_ids,
            "completion_ids": out.tokens,
            "text": text,
            "finish_reason": out.finish_reason.as_str(),
        });
        println!("{value}");
    } else {
        println!("{text}");
        eprintln!(
            "[{} tokens, finish: {}]",
            out.tokens.len(),
            out.finish_reason.as_str()
        );
    }
    Ok(())
}

fn logprobs(
    dir: &Path,
    prompt: &str,
    completion: &str,
    temperature: f64,
    as_json: bool,
) -> Result<()> {
    let (model, tokenizer) = load(dir)?;
    if model.head() != HeadKind::CausalLm {
        bail!(
            "{}: log-probs need a causal LM, this is a {}",
            dir.display(),
            model.config.architecture
        );
    }
    let prompt_ids = tokenizer.encode(prompt, true)?;
    let completion_ids = tokenizer.encode(completion, false)?;
    let out = model.completion_logprobs(&[(&prompt_ids, &completion_ids)], temperature)?;
    let values = rows_to_host(out.logprobs, &[completion_ids.len()]).remove(0);
    if as_json {
        let value = json!({
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": values,
        });
        println!("{value}");
    } else {
        for (id, lp) in completion_ids.iter().zip(&values) {
            let piece = tokenizer.decode(&[*id], false)?;
            println!("{id:>8} {lp:>12.6} {piece:?}");
        }
        println!("sum {:.6}", values.iter().sum::<f32>());
    }
    Ok(())
}

fn score(dir: &Path, prompt: &str, completion: &str, as_json: bool) -> Result<()> {
    let (model, tokenizer) = load(dir)?;
    if model.head() != HeadKind::Score {
        bail!(
            "{}: scoring needs a *ForSequenceClassification model, this is a {}",
            dir.display(),
            model.config.architecture
        );
    }
    let ids = tokenizer.encode(&format!("{prompt}{completion}"), true)?;
    let scores = rlhf_model::host::to_vec(model.sequence_scores(&[&ids])?);
    if as_json {
        println!("{}", json!({"ids": ids, "score": scores[0]}));
    } else {
        println!("{}", scores[0]);
    }
    Ok(())
}
