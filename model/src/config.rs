//! The Hugging Face `config.json` of a Llama-family checkpoint, resolved into a plain config.
//!
//! `config.json` is read field by field (not through a serde struct) so that every problem is
//! reported with the field's name and the value found. Fields this crate does not use are kept
//! verbatim in [`ModelConfig::raw`] and written back on save, so `transformers` still finds
//! them.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::dtype::DType;
use crate::error::{ModelError, Result};

/// Every architecture string accepted in `config.json`'s `architectures`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaForTokenClassification",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
    "Qwen2ForTokenClassification",
    "MistralForCausalLM",
    "MistralForSequenceClassification",
    "MistralForTokenClassification",
];

/// The decoder family: decides biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
}

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Qwen2 => "Qwen2",
            Family::Mistral => "Mistral",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }
}

/// What sits on top of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `lm_head`: logits over the vocabulary at every position (`*ForCausalLM`).
    CausalLm,
    /// `score` without bias, read at the last non-padding token (`*ForSequenceClassification`):
    /// a Bradley-Terry reward model.
    Score,
    /// `score` with bias at every position (`*ForTokenClassification` with one label): the
    /// per-token value head of a PPO critic.
    Value,
}

impl HeadKind {
    fn suffix(self) -> &'static str {
        match self {
            HeadKind::CausalLm => "ForCausalLM",
            HeadKind::Score => "ForSequenceClassification",
            HeadKind::Value => "ForTokenClassification",
        }
    }
}

/// A decoder family with a head, e.g. `LlamaForCausalLM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    pub family: Family,
    pub head: HeadKind,
}

impl Architecture {
    /// Parses an `architectures` entry of `config.json`.
    pub fn parse(name: &str) -> Option<Self> {
        let families = [Family::Llama, Family::Qwen2, Family::Mistral];
        let heads = [HeadKind::CausalLm, HeadKind::Score, HeadKind::Value];
        families.into_iter().find_map(|family| {
            let rest = name.strip_prefix(family.prefix())?;
            heads
                .into_iter()
                .find(|head| head.suffix() == rest)
                .map(|head| Architecture { family, head })
        })
    }

    /// The name `transformers` knows this architecture by.
    pub fn name(&self) -> String {
        format!("{}{}", self.family.prefix(), self.head.suffix())
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// How rotary position frequencies are scaled (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// A resolved model configuration: every value the model needs, defaults applied.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Keys further back than this many positions are not attended to (Mistral).
    pub sliding_window: Option<usize>,
    /// Outputs of the `score` head (1 for reward and value models).
    pub num_labels: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), f32 when absent.
    pub dtype: DType,
    /// The whole `config.json` as read, written back (updated) on save.
    pub raw: Map<String, Value>,
}

/// Reads fields of one JSON object and names the file and field in every error.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::config(self.path, field, message)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.err(field, format!("expected a positive integer, found {v}"))),
            },
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "missing (required)"))
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(field, format!("expected a number, found {v}"))),
            },
        }
    }

    fn positive_f64(&self, field: &str) -> Result<f64> {
        match self.f64_opt(field)? {
            Some(x) if x > 0.0 => Ok(x),
            Some(x) => Err(self.err(field, format!("must be > 0, found {x}"))),
            None => Err(self.err(field, "missing (required)")),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(field, format!("expected a string, found {v}"))),
        }
    }

    /// A token id, or a list of token ids (`eos_token_id` may be either).
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| one(v).ok_or_else(|| self.err(field, format!("bad token id {v}"))))
                .collect(),
            Some(v) => one(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.err(field, format!("expected a token id, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and resolves `config.json` from a model folder or file path.
    pub fn from_path(path: &Path) -> Result<Self> {
        let path: PathBuf = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        match value {
            Value::Object(map) => Self::from_json(&path, map),
            _ => Err(ModelError::config(
                &path,
                "<root>",
                "expected a JSON object",
            )),
        }
    }

    /// Resolves an already parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(path: &Path, map: Map<String, Value>) -> Result<Self> {
        let f = Fields { path, map: &map };
        let architecture = parse_architecture(&f)?;
        let family = architecture.family;

        if let Some(act) = f.str_opt("hidden_act")?
            && act != "silu"
        {
            return Err(f.err(
                "hidden_act",
                format!("only `silu` is supported, found `{act}`"),
            ));
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.err(
                    "head_dim",
                    format!("missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("must be even for RoPE, found {head_dim}"),
            ));
        }

        let attention_bias = f.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (
                attention_bias,
                attention_bias,
                f.bool_or("mlp_bias", false)?,
            ),
            Family::Qwen2 => (true, false, false),
            Family::Mistral => (false, false, false),
        };
        let sliding_window = match family {
            Family::Mistral => f.usize_opt("sliding_window")?,
            Family::Qwen2 if f.bool_or("use_sliding_window", false)? => {
                return Err(f.err(
                    "use_sliding_window",
                    "Qwen2's per-layer sliding window is not supported; set it to false",
                ));
            }
            _ => None,
        };

        // transformers 5 prefers `dtype` over the older `torch_dtype` when both are set.
        let dtype = match f.str_opt("dtype")?.or(f.str_opt("torch_dtype")?) {
            None => DType::F32,
            Some(s) => DType::parse(s).ok_or_else(|| {
                f.err(
                    "torch_dtype",
                    format!("expected float32, bfloat16 or float16, found `{s}`"),
                )
            })?,
        };

        let num_labels = match f.get("id2label") {
            Some(Value::Object(labels)) if !labels.is_empty() => labels.len(),
            _ => f.usize_opt("num_labels")?.unwrap_or(1),
        };
        if architecture.head == HeadKind::Value && num_labels != 1 {
            return Err(f.err(
                "id2label",
                format!("a value head has one label, found {num_labels}"),
            ));
        }

        let pad = f.token_ids("pad_token_id")?;
        let config = ModelConfig {
            architecture,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope: parse_rope(&f)?,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            num_labels,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            pad_token_id: pad.first().copied(),
            dtype,
            raw: map.clone(),
        };
        config.check_token_ids(path)?;
        Ok(config)
    }

    fn check_token_ids(&self, path: &Path) -> Result<()> {
        let named = [
            ("bos_token_id", self.bos_token_id),
            ("pad_token_id", self.pad_token_id),
        ];
        let all = named
            .into_iter()
            .filter_map(|(n, id)| id.map(|id| (n, id)))
            .chain(self.eos_token_ids.iter().map(|&id| ("eos_token_id", id)));
        for (field, id) in all {
            if id as usize >= self.vocab_size {
                return Err(ModelError::config(
                    path,
                    field,
                    format!(
                        "token id {id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A fresh Llama configuration (for models trained from scratch, tests and benchmarks).
    pub fn llama(dims: LlamaDims) -> Self {
        let map = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": dims.vocab_size,
            "hidden_size": dims.hidden_size,
            "intermediate_size": dims.intermediate_size,
            "num_hidden_layers": dims.num_layers,
            "num_attention_heads": dims.num_heads,
            "num_key_value_heads": dims.num_kv_heads,
            "head_dim": dims.hidden_size / dims.num_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": dims.max_position_embeddings,
            "tie_word_embeddings": dims.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": dims.bos_token_id,
            "eos_token_id": dims.eos_token_id,
            "pad_token_id": dims.pad_token_id,
            "dtype": "float32",
            "torch_dtype": "float32",
        });
        let Value::Object(map) = map else {
            unreachable!("json! of an object literal is an object")
        };
        Self::from_json(Path::new("<generated>"), map)
            .expect("LlamaDims produce a valid config; see LlamaDims docs for the constraints")
    }

    /// The same decoder with another head (e.g. a reward model from a policy).
    pub fn with_head(&self, head: HeadKind) -> Self {
        let mut config = self.clone();
        config.architecture.head = head;
        if head != HeadKind::CausalLm {
            config.num_labels = 1;
            config.tie_word_embeddings = false;
        }
        config
    }

    /// The `config.json` to write next to saved weights of the given dtype.
    ///
    /// Starts from the file as read ([`ModelConfig::raw`]) and writes every resolved value back
    /// over it, so the file always describes the weights beside it (a field changed in code is
    /// not silently lost) and carries every key `transformers` needs for the architecture
    /// (checked by [`crate::hf::check_folder`]). Keys the crate does not use are kept.
    pub fn to_hf_json(&self, dtype: DType) -> Value {
        let mut map = self.raw.clone();
        map.insert("architectures".into(), json!([self.architecture.name()]));
        map.insert(
            "model_type".into(),
            json!(self.architecture.family.model_type()),
        );
        // transformers 5 reads `dtype`, older versions `torch_dtype`: `dtype` always, and
        // `torch_dtype` updated where the file had it, so the two never disagree.
        map.insert("dtype".into(), json!(dtype.torch_name()));
        if map.contains_key("torch_dtype") {
            map.insert("torch_dtype".into(), json!(dtype.torch_name()));
        }
        map.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            map.insert(key.into(), json!(value));
        }
        if map.contains_key("head_dim") || self.head_dim * self.num_heads != self.hidden_size {
            map.insert("head_dim".into(), json!(self.head_dim));
        }
        map.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        // rope_theta at the top level (transformers < 5) and/or in rope_parameters (5).
        let top_level = map.contains_key("rope_theta");
        match map.get_mut("rope_parameters") {
            Some(Value::Object(params)) => {
                params.insert("rope_theta".into(), json!(self.rope.theta));
                if top_level {
                    map.insert("rope_theta".into(), json!(self.rope.theta));
                }
            }
            _ => {
                map.insert("rope_theta".into(), json!(self.rope.theta));
            }
        }
        let id = |id: Option<u32>| id.map_or(Value::Null, |id| json!(id));
        if self.bos_token_id.is_some() || map.contains_key("bos_token_id") {
            map.insert("bos_token_id".into(), id(self.bos_token_id));
        }
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        map.insert("eos_token_id".into(), eos);
        if self.pad_token_id.is_some() || map.contains_key("pad_token_id") {
            map.insert("pad_token_id".into(), id(self.pad_token_id));
        }
        match self.architecture.family {
            Family::Llama => {
                if self.qkv_bias || map.contains_key("attention_bias") {
                    map.insert("attention_bias".into(), json!(self.qkv_bias));
                }
                if self.mlp_bias || map.contains_key("mlp_bias") {
                    map.insert("mlp_bias".into(), json!(self.mlp_bias));
                }
            }
            Family::Mistral => {
                let window = self.sliding_window.map_or(Value::Null, |w| json!(w));
                map.insert("sliding_window".into(), window);
            }
            Family::Qwen2 => {}
        }
        match self.architecture.head {
            HeadKind::CausalLm => {
                map.remove("id2label");
                map.remove("label2id");
                map.remove("num_labels");
            }
            HeadKind::Score | HeadKind::Value => {
                let id2label: Map<String, Value> = (0..self.num_labels)
                    .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
                    .collect();
                let label2id: Map<String, Value> = (0..self.num_labels)
                    .map(|i| (format!("LABEL_{i}"), json!(i)))
                    .collect();
                map.insert("id2label".into(), Value::Object(id2label));
                map.insert("label2id".into(), Value::Object(label2id));
            }
        }
        Value::Object(map)
    }
}

impl ModelConfig {
    /// The `generation_config.json` `transformers` derives from a model config that has none
    /// (`GenerationConfig.from_model_config`): the BOS, EOS and padding ids.
    pub fn generation_config_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("_from_model_config".into(), json!(true));
        if let Some(bos) = self.bos_token_id {
            map.insert("bos_token_id".into(), json!(bos));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                map.insert("eos_token_id".into(), json!(one));
            }
            many => {
                map.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(pad) = self.pad_token_id {
            map.insert("pad_token_id".into(), json!(pad));
        }
        Value::Object(map)
    }
}

/// The sizes of a fresh Llama model, see [`ModelConfig::llama`].
///
/// `hidden_size` must be a multiple of `num_heads`, `num_heads` a multiple of `num_kv_heads`,
/// and the three token ids below `vocab_size`.
#[derive(Debug, Clone)]
pub struct LlamaDims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

fn parse_architecture(f: &Fields) -> Result<Architecture> {
    let names = match f.get("architectures") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(v) => {
            return Err(f.err(
                "architectures",
                format!("expected a non-empty list, found {v}"),
            ));
        }
        None => return Err(f.err("architectures", "missing (required)")),
    };
    let Some(name) = names[0].as_str() else {
        return Err(f.err(
            "architectures",
            format!("expected a string, found {}", names[0]),
        ));
    };
    Architecture::parse(name).ok_or_else(|| ModelError::UnsupportedArchitecture {
        path: f.path.to_path_buf(),
        architecture: name.to_string(),
        supported: SUPPORTED_ARCHITECTURES,
    })
}

/// `rope_parameters` (transformers ≥ 5) or `rope_scaling` + `rope_theta` (older files).
fn parse_rope(f: &Fields) -> Result<RopeConfig> {
    let (field, params) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
        (None, Some(Value::Object(p))) => ("rope_scaling", Some(p)),
        (Some(v), _) => {
            return Err(f.err("rope_parameters", format!("expected an object, found {v}")));
        }
        (None, Some(v)) => {
            return Err(f.err("rope_scaling", format!("expected an object, found {v}")));
        }
        (None, None) => ("rope_scaling", None),
    };
    let nested = params.map(|map| Fields { path: f.path, map });
    let theta = match nested
        .as_ref()
        .map(|n| n.f64_opt("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(theta) => theta,
        None => f.f64_opt("rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 0.0 {
        return Err(f.err("rope_theta", format!("must be > 0, found {theta}")));
    }
    let Some(n) = nested else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let kind = n
        .str_opt("rope_type")?
        .or(n.str_opt("type")?)
        .unwrap_or("default");
    let sub = |name: &str| format!("{field}.{name}");
    let named = |r: Result<f64>| r.map_err(|e| relabel(e, field));
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: named(n.positive_f64("factor"))?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: named(n.positive_f64("factor"))?,
            low_freq_factor: named(n.positive_f64("low_freq_factor"))?,
            high_freq_factor: named(n.positive_f64("high_freq_factor"))?,
            original_max_position_embeddings: named(
                n.positive_f64("original_max_position_embeddings"),
            )?,
        },
        other => {
            return Err(f.err(
                &sub("rope_type"),
                format!("`{other}` is not supported (supported: default, linear, llama3)"),
            ));
        }
    };
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = scaling
        && high_freq_factor <= low_freq_factor
    {
        return Err(f.err(
            &sub("high_freq_factor"),
            format!("must be > low_freq_factor ({low_freq_factor}), found {high_freq_factor}"),
        ));
    }
    Ok(RopeConfig { theta, scaling })
}

/// Prefixes the field of a nested-object error with the object's name.
fn relabel(err: ModelError, parent: &str) -> ModelError {
    match err {
        ModelError::Config {
            path,
            field,
            message,
        } => ModelError::Config {
            path,
            field: format!("{parent}.{field}"),
            message,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig> {
        let Value::Object(map) = v else {
            panic!("object")
        };
        ModelConfig::from_json(Path::new("config.json"), map)
    }

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "eos_token_id": 1
        })
    }

    fn with(mut v: Value, key: &str, val: Value) -> Value {
        v.as_object_mut().unwrap().insert(key.into(), val);
        v
    }

    #[test]
    fn resolves_defaults() {
        let c = parse(base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope.theta, 10000.0);
        assert_eq!(c.rope.scaling, RopeScaling::None);
        assert_eq!(c.eos_token_ids, vec![1]);
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = parse(with(base(), "architectures", json!(["GPT2LMHeadModel"]))).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("GPT2LMHeadModel") && msg.contains("LlamaForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("`hidden_size`: missing")
        );
        let err = parse(with(base(), "num_attention_heads", json!("four"))).unwrap_err();
        assert!(err.to_string().contains("`num_attention_heads`"), "{err}");
        let err = parse(with(base(), "num_key_value_heads", json!(3))).unwrap_err();
        assert!(err.to_string().contains("does not divide"), "{err}");
        let err = parse(with(base(), "eos_token_id", json!(9999))).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn reads_rope_scaling_in_both_layouts() {
        let llama3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = parse(with(base(), "rope_scaling", llama3.clone())).unwrap();
        assert!(matches!(
            c.rope.scaling,
            RopeScaling::Llama3 { factor: 8.0, .. }
        ));
        let mut params = llama3;
        params["rope_theta"] = json!(500000.0);
        let c = parse(with(base(), "rope_parameters", params)).unwrap();
        assert_eq!(c.rope.theta, 500000.0);
        let c = parse(with(
            base(),
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
        ))
        .unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let err = parse(with(
            base(),
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 2.0}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("rope_scaling.rope_type"), "{err}");
        let err = parse(with(base(), "rope_scaling", json!({"rope_type": "linear"}))).unwrap_err();
        assert!(err.to_string().contains("rope_scaling.factor"), "{err}");
    }

    #[test]
    fn family_biases() {
        let q = parse(with(base(), "architectures", json!(["Qwen2ForCausalLM"]))).unwrap();
        assert!(q.qkv_bias && !q.o_bias);
        let l = parse(with(base(), "attention_bias", json!(true))).unwrap();
        assert!(l.qkv_bias && l.o_bias);
        let rm = parse(with(
            base(),
            "architectures",
            json!(["MistralForSequenceClassification"]),
        ))
        .unwrap();
        assert_eq!(rm.architecture.head, HeadKind::Score);
    }

    #[test]
    fn writes_back_architecture_and_dtype() {
        let c = parse(base()).unwrap().with_head(HeadKind::Score);
        let out = c.to_hf_json(DType::BF16);
        assert_eq!(out["architectures"][0], "LlamaForSequenceClassification");
        // transformers 5's key always; the older `torch_dtype` only where the file had it.
        assert_eq!(out["dtype"], "bfloat16");
        assert!(out.get("torch_dtype").is_none());
        assert_eq!(out["id2label"]["0"], "LABEL_0");
        let again = parse(out).unwrap();
        assert_eq!(again.architecture.head, HeadKind::Score);
        assert_eq!(again.dtype, DType::BF16);
        let both = parse(with(base(), "torch_dtype", json!("float32"))).unwrap();
        let out = both.to_hf_json(DType::F16);
        assert_eq!(
            (&out["dtype"], &out["torch_dtype"]),
            (&json!("float16"), &json!("float16"))
        );
    }

    #[test]
    fn dtype_wins_over_torch_dtype_as_in_transformers() {
        let v = with(base(), "torch_dtype", json!("float32"));
        let c = parse(with(v, "dtype", json!("bfloat16"))).unwrap();
        assert_eq!(c.dtype, DType::BF16);
    }

    #[test]
    fn writes_the_keys_transformers_needs_for_a_minimal_config() {
        let out = parse(base()).unwrap().to_hf_json(DType::F32);
        for key in [
            "model_type",
            "max_position_embeddings",
            "rope_theta",
            "tie_word_embeddings",
            "num_key_value_heads",
            "rms_norm_eps",
            "eos_token_id",
            "dtype",
        ] {
            assert!(out.get(key).is_some_and(|v| !v.is_null()), "{key} in {out}");
        }
        assert_eq!(out["rope_theta"], 10000.0);
        assert_eq!(out["tie_word_embeddings"], false);
    }
}
