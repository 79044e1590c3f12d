//! Weights: HF safetensors checkpoints (single file or sharded) in and out, fresh
//! initialisation, and named access to a model's tensors.
//!
//! Names are Hugging Face's (`model.layers.0.mlp.up_proj.weight`). A checkpoint must hold
//! exactly the tensors the architecture needs: a missing tensor or an unknown one is an error
//! that lists them, except the RoPE buffers old checkpoints carry (`rotary_emb.inv_freq`) and,
//! when a causal LM is loaded as a reward or value model, its `lm_head`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::config::{HeadKind, ModelConfig};
use crate::dtype::{self, DType};
use crate::error::{ModelError, Result};
use crate::llama::{Attention, Decoder, DecoderLayer, Embedding, Linear, Mlp, Model, RmsNorm};

/// Name and HF shape of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// A tensor by name, as f32 values (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// How to write a checkpoint.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Storage dtype of every tensor.
    pub dtype: DType,
    /// Shards are cut when a file would grow past this many bytes; one file when everything fits.
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: 5 << 30,
        }
    }
}

/// The sizes and biases that decide a Llama-family decoder's tensors.
#[derive(Debug, Clone, Copy)]
pub struct DecoderShape {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
}

/// The decoder's tensors as transformers names them (embedding, every layer, final norm), with
/// their shapes, in a stable order; the head is the caller's.
pub fn decoder_tensors(d: &DecoderShape) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (d.hidden, d.intermediate);
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![d.vocab, h])];
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        let projections = [
            ("self_attn.q_proj", q, h, d.qkv_bias),
            ("self_attn.k_proj", kv, h, d.qkv_bias),
            ("self_attn.v_proj", kv, h, d.qkv_bias),
            ("self_attn.o_proj", h, q, d.o_bias),
            ("mlp.gate_proj", i, h, d.mlp_bias),
            ("mlp.up_proj", i, h, d.mlp_bias),
            ("mlp.down_proj", h, i, d.mlp_bias),
        ];
        for (name, rows, cols, bias) in projections {
            out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![rows]));
            }
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    out
}

/// Every parameter of `config`'s model, in a stable order.
pub fn param_specs(config: &ModelConfig) -> Vec<ParamSpec> {
    let h = config.hidden_size;
    let decoder = DecoderShape {
        vocab: config.vocab_size,
        hidden: h,
        intermediate: config.intermediate_size,
        layers: config.num_layers,
        heads: config.num_heads,
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        qkv_bias: config.qkv_bias,
        o_bias: config.o_bias,
        mlp_bias: config.mlp_bias,
    };
    let mut specs: Vec<ParamSpec> = decoder_tensors(&decoder)
        .into_iter()
        .map(|(name, shape)| ParamSpec { name, shape })
        .collect();
    let mut add = |name: String, shape: Vec<usize>| specs.push(ParamSpec { name, shape });
    match config.architecture.head {
        HeadKind::CausalLm if !config.tie_word_embeddings => {
            add("lm_head.weight".into(), vec![config.vocab_size, h])
        }
        HeadKind::CausalLm => {}
        HeadKind::Score => add("score.weight".into(), vec![config.num_labels, h]),
        HeadKind::Value => {
            add("score.weight".into(), vec![1, h]);
            add("score.bias".into(), vec![1]);
        }
    }
    specs
}

impl ModelConfig {
    /// Parameters of the model, counted from the shapes of [`param_specs`] (tied embeddings
    /// counted once).
    pub fn num_parameters(&self) -> usize {
        param_specs(self)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }
}

/// Fresh values for one parameter, as `transformers` initialises Llama: normal(0, std) for
/// matrices, ones for norms, zeros for biases.
fn init_values(spec: &ParamSpec, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    if spec.name.ends_with("norm.weight") {
        vec![1.0; n]
    } else if spec.name.ends_with(".bias") {
        vec![0.0; n]
    } else {
        (0..n).map(|_| (normal(rng) * std) as f32).collect()
    }
}

/// One standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn initializer_range(config: &ModelConfig) -> f64 {
    config
        .raw
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02)
}

/// Tensors read from a checkpoint, by name.
struct Checkpoint {
    dir: PathBuf,
    tensors: HashMap<String, NamedTensor>,
    /// The dtype most of the tensors are stored in.
    dtype: DType,
}

/// Safetensors files of a model folder: the shards of `model.safetensors.index.json`, or
/// `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let Some(map) = json.get("weight_map").and_then(Value::as_object) else {
            return Err(ModelError::config(
                &index,
                "weight_map",
                "missing or not an object",
            ));
        };
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let Some(file) = file.as_str() else {
                return Err(ModelError::config(
                    &index,
                    format!("weight_map.{name}"),
                    "not a file name",
                ));
            };
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(ModelError::Weights {
            path: dir.to_path_buf(),
            message: "no model.safetensors or model.safetensors.index.json in this folder".into(),
        })
    }
}

fn read_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let mut tensors = HashMap::new();
    let mut dtype_counts: BTreeMap<&'static str, (usize, DType)> = BTreeMap::new();
    for path in weight_files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let file =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
                path: path.clone(),
                message: format!("not a valid safetensors file: {e}"),
            })?;
        for (name, view) in file.tensors() {
            let Some(dt) = dtype::from_safetensors(view.dtype()) else {
                return Err(ModelError::Weights {
                    path: path.clone(),
                    message: format!(
                        "tensor `{name}` has dtype {:?}; supported: F32, BF16, F16",
                        view.dtype()
                    ),
                });
            };
            dtype_counts.entry(dt.torch_name()).or_insert((0, dt)).0 += 1;
            let tensor = NamedTensor {
                name: name.clone(),
                shape: view.shape().to_vec(),
                values: dtype::decode(dt, view.data()),
            };
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(ModelError::Weights {
                    path: path.clone(),
                    message: format!("tensor `{name}` appears in more than one shard"),
                });
            }
        }
    }
    let dtype = dtype_counts
        .values()
        .max_by_key(|(count, _)| *count)
        .map_or(DType::F32, |(_, dt)| *dt);
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        tensors,
        dtype,
    })
}

/// Hands out a checkpoint's tensors as parameters, remembering what was missing or misshapen.
struct TensorSource<'a> {
    tensors: HashMap<String, NamedTensor>,
    device: &'a Device,
    missing: Vec<String>,
    shape_error: Option<ModelError>,
}

impl TensorSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Vec<f32> {
        let n = shape.iter().product();
        match self.tensors.remove(name) {
            None => {
                self.missing.push(name.to_string());
                vec![0.0; n]
            }
            Some(t) if t.shape != shape => {
                self.shape_error.get_or_insert(ModelError::Shape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.shape,
                });
                vec![0.0; n]
            }
            Some(t) => t.values,
        }
    }

    fn p1(&mut self, name: &str, len: usize) -> Param<Tensor<1>> {
        let values = self.take(name, &[len]);
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, [len]),
            self.device,
        ))
    }

    fn p2(&mut self, name: &str, rows: usize, cols: usize) -> Param<Tensor<2>> {
        let values = self.take(name, &[rows, cols]);
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, [rows, cols]),
            self.device,
        ))
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Linear {
        Linear {
            weight: self.p2(&format!("{prefix}.weight"), out, inp),
            bias: bias.then(|| self.p1(&format!("{prefix}.bias"), out)),
        }
    }

    fn norm(&mut self, name: &str, len: usize, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: self.p1(name, len),
            eps,
        }
    }
}

/// Builds the module tree of `config` from named tensors.
fn assemble(
    config: &ModelConfig,
    tensors: HashMap<String, NamedTensor>,
    device: &Device,
    dir: &Path,
) -> Result<Model> {
    let mut src = TensorSource {
        tensors,
        device,
        missing: Vec::new(),
        shape_error: None,
    };
    let c = config;
    let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let embed_tokens = Embedding {
        weight: src.p2("model.embed_tokens.weight", c.vocab_size, h),
    };
    let layers = (0..c.num_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            DecoderLayer {
                self_attn: Attention {
                    q_proj: src.linear(&format!("{p}.self_attn.q_proj"), q, h, c.qkv_bias),
                    k_proj: src.linear(&format!("{p}.self_attn.k_proj"), kv, h, c.qkv_bias),
                    v_proj: src.linear(&format!("{p}.self_attn.v_proj"), kv, h, c.qkv_bias),
                    o_proj: src.linear(&format!("{p}.self_attn.o_proj"), h, q, c.o_bias),
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: src.linear(&format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias),
                    up_proj: src.linear(&format!("{p}.mlp.up_proj"), i, h, c.mlp_bias),
                    down_proj: src.linear(&format!("{p}.mlp.down_proj"), h, i, c.mlp_bias),
                },
                input_layernorm: src.norm(&format!("{p}.input_layernorm.weight"), h, eps),
                post_attention_layernorm: src.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                ),
            }
        })
        .collect();
    let norm = src.norm("model.norm.weight", h, eps);
    let (lm_head, score) = match c.architecture.head {
        HeadKind::CausalLm if c.tie_word_embeddings => (None, None),
        HeadKind::CausalLm => (Some(src.linear("lm_head", c.vocab_size, h, false)), None),
        HeadKind::Score => (None, Some(src.linear("score", c.num_labels, h, false))),
        HeadKind::Value => (None, Some(src.linear("score", 1, h, true))),
    };
    if let Some(err) = src.shape_error {
        return Err(err);
    }
    if !src.missing.is_empty() {
        return Err(ModelError::MissingTensors {
            dir: dir.to_path_buf(),
            names: src.missing,
        });
    }
    let mut unexpected: Vec<String> = src.tensors.into_keys().collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(ModelError::UnexpectedTensors {
            dir: dir.to_path_buf(),
            names: unexpected,
        });
    }
    let model = Decoder {
        embed_tokens,
        layers,
        norm,
    };
    Ok(Model::from_parts(config.clone(), model, lm_head, score))
}

impl Model {
    /// A freshly initialised model (for training from scratch, tests and benchmarks).
    pub fn init(config: &ModelConfig, device: &Device, seed: u64) -> Model {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = initializer_range(config);
        let tensors = param_specs(config)
            .into_iter()
            .map(|spec| {
                let values = init_values(&spec, std, &mut rng);
                let t = NamedTensor {
                    name: spec.name.clone(),
                    shape: spec.shape,
                    values,
                };
                (spec.name, t)
            })
            .collect();
        assemble(config, tensors, device, Path::new("<init>"))
            .expect("param_specs and assemble agree on every name and shape")
    }

    /// Loads a Hugging Face model folder (config.json + safetensors) with the head its config
    /// declares.
    pub fn load(dir: &Path, device: &Device) -> Result<Model> {
        let config = ModelConfig::from_path(dir)?;
        let checkpoint = read_checkpoint(dir)?;
        let mut config = config;
        config.dtype = checkpoint.dtype;
        let mut tensors = checkpoint.tensors;
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        assemble(&config, tensors, device, &checkpoint.dir)
    }

    /// Loads a model folder with another head: a causal LM as the base of a reward model
    /// (`Score`) or critic (`Value`). The new head is initialised from `seed` (normal with the
    /// config's `initializer_range`, zero bias) unless the checkpoint already has one of the
    /// right shape; a dropped `lm_head` is not an error.
    pub fn load_with_head(dir: &Path, head: HeadKind, device: &Device, seed: u64) -> Result<Model> {
        let source = ModelConfig::from_path(dir)?;
        if source.architecture.head == head {
            return Model::load(dir, device);
        }
        let mut config = source.with_head(head);
        let checkpoint = read_checkpoint(dir)?;
        config.dtype = checkpoint.dtype;
        let mut tensors = checkpoint.tensors;
        tensors.retain(|name, _| {
            !name.ends_with("rotary_emb.inv_freq")
                && !name.starts_with("lm_head.")
                && !name.starts_with("score.")
        });
        if head == HeadKind::CausalLm {
            return Err(ModelError::InvalidInput(format!(
                "{}: a {} checkpoint has no language-model head to load as a causal LM",
                dir.display(),
                source.architecture
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = initializer_range(&config);
        for spec in param_specs(&config)
            .into_iter()
            .filter(|s| s.name.starts_with("score."))
        {
            let values = init_values(&spec, std, &mut rng);
            tensors.insert(
                spec.name.clone(),
                NamedTensor {
                    name: spec.name,
                    shape: spec.shape,
                    values,
                },
            );
        }
        assemble(&config, tensors, device, &checkpoint.dir)
    }

    /// Every parameter with its HF name, in [`param_specs`] order.
    pub fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut visitor = Collect {
            path: Vec::new(),
            out: HashMap::new(),
        };
        self.visit(&mut visitor);
        let mut by_name = visitor.out;
        param_specs(&self.config)
            .into_iter()
            .filter_map(|spec| by_name.remove(&spec.name))
            .collect()
    }

    /// Replaces the named parameters' values (shapes must match); names not given keep their
    /// values. Used for weight updates and checkpoint restores.
    pub fn with_tensors(self, tensors: Vec<NamedTensor>) -> Result<Model> {
        let specs = param_specs(&self.config);
        let mut replace = HashMap::new();
        for t in tensors {
            let Some(spec) = specs.iter().find(|s| s.name == t.name) else {
                return Err(ModelError::UnexpectedTensors {
                    dir: PathBuf::from("<update>"),
                    names: vec![t.name],
                });
            };
            if spec.shape != t.shape || t.values.len() != t.shape.iter().product::<usize>() {
                return Err(ModelError::Shape {
                    name: t.name,
                    expected: spec.shape.clone(),
                    found: t.shape,
                });
            }
            replace.insert(t.name.clone(), t);
        }
        let device = self.device();
        let mut mapper = Replace {
            path: Vec::new(),
            tensors: replace,
            device,
        };
        Ok(self.map(&mut mapper))
    }

    /// Writes an HF model folder: `config.json` and the weights (sharded when large).
    pub fn save(&self, dir: &Path, options: &SaveOptions) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors = self.named_tensors();
        write_safetensors(dir, &tensors, options)?;
        let config = serde_json::to_string_pretty(&self.config.to_hf_json(options.dtype))
            .expect("a JSON value serialises");
        let path = dir.join("config.json");
        std::fs::write(&path, config).map_err(|e| ModelError::io(&path, e))
    }

    /// [`Model::save`] plus the tokenizer files of the folder `tokenizer_from` and a
    /// `generation_config.json`: a model folder that loads on its own, here and in
    /// `transformers`.
    ///
    /// `tokenizer_from` must hold a `tokenizer.json`. Its `generation_config.json` is copied when
    /// it has one; otherwise one is written from this model's token ids, as `transformers` does
    /// when it saves a model without one. The written folder is then checked with
    /// [`crate::hf::check_folder`], and each problem found is logged as a warning.
    pub fn save_with_tokenizer(
        &self,
        dir: &Path,
        options: &SaveOptions,
        tokenizer_from: &Path,
    ) -> Result<()> {
        let tokenizer = tokenizer_from.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(ModelError::Tokenizer(format!(
                "{}: file not found; a saved model needs the tokenizer it was trained with",
                tokenizer.display()
            )));
        }
        self.save(dir, options)?;
        crate::tokenizer::copy_tokenizer_files(tokenizer_from, dir)?;
        if !tokenizer_from.join("generation_config.json").is_file() {
            let path = dir.join("generation_config.json");
            let text = serde_json::to_string_pretty(&self.config.generation_config_json())
                .expect("a JSON value serialises");
            std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
        }
        if let Err(problems) = crate::hf::check_folder(dir) {
            for problem in problems {
                tracing::warn!(dir = %dir.display(), "saved model folder: {problem}");
            }
        }
        Ok(())
    }
}

/// Writes named tensors to one safetensors file (optimizer state, value heads, anything keyed by
/// name), in `dtype`.
pub fn save_tensors(path: &Path, tensors: &[NamedTensor], dtype: DType) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let encoded: Vec<(String, Encoded)> = tensors
        .iter()
        .map(|t| (t.name.clone(), encode_tensor(t, dtype)))
        .collect();
    let views = encoded.iter().map(|(name, e)| (name.as_str(), e));
    safetensors::serialize_to_file(views, None, path).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: format!("cannot write: {e}"),
    })
}

/// Reads every tensor of one safetensors file as f32, in file order.
pub fn load_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    let mut out = Vec::new();
    for (name, view) in file.iter() {
        let dt = dtype::from_safetensors(view.dtype()).ok_or_else(|| ModelError::Weights {
            path: path.to_path_buf(),
            message: format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
        })?;
        out.push(NamedTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            values: dtype::decode(dt, view.data()),
        });
    }
    Ok(out)
}

fn encode_tensor(t: &NamedTensor, dtype: DType) -> Encoded {
    Encoded {
        dtype: dtype::to_safetensors(dtype),
        shape: t.shape.clone(),
        bytes: dtype::encode(dtype, &t.values),
    }
}

/// An owned tensor for the safetensors writer.
struct Encoded {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Encoded {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn write_safetensors(dir: &Path, tensors: &[NamedTensor], options: &SaveOptions) -> Result<()> {
    let encoded: Vec<(String, Encoded)> = tensors
        .iter()
        .map(|t| (t.name.clone(), encode_tensor(t, options.dtype)))
        .collect();
    // Cut shards in order, each at most `max_shard_bytes` (a single larger tensor gets its own).
    let mut shards: Vec<Vec<&(String, Encoded)>> = vec![Vec::new()];
    let mut size = 0usize;
    for item in &encoded {
        let n = item.1.bytes.len();
        let current = shards.last_mut().expect("shards starts non-empty");
        if !current.is_empty() && size + n > options.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("just pushed").push(item);
        size += n;
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let write = |file: &Path, items: &[&(String, Encoded)]| {
        let views = items.iter().map(|(name, e)| (name.as_str(), e));
        safetensors::serialize_to_file(views, metadata.clone(), file).map_err(|e| {
            ModelError::Weights {
                path: file.to_path_buf(),
                message: format!("cannot write: {e}"),
            }
        })
    };
    // Remove files of a previous save in the other layout, so the folder is unambiguous.
    let index_path = dir.join("model.safetensors.index.json");
    if shards.len() == 1 {
        let _ = std::fs::remove_file(&index_path);
        return write(&dir.join("model.safetensors"), &shards[0]);
    }
    let _ = std::fs::remove_file(dir.join("model.safetensors"));
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        write(&dir.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    let total: usize = encoded.iter().map(|(_, e)| e.bytes.len()).sum();
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).expect("a JSON value serialises");
    std::fs::write(&index_path, text).map_err(|e| ModelError::io(&index_path, e))
}

/// Collects every float parameter with its path (= HF name).
struct Collect {
    path: Vec<String>,
    out: HashMap<String, NamedTensor>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let values = crate::host::to_vec(tensor);
        self.out.insert(
            name.clone(),
            NamedTensor {
                name,
                shape,
                values,
            },
        );
    }
}

/// Swaps the values of named parameters, keeping their ids (and so optimizer bindings).
struct Replace {
    path: Vec<String>,
    tensors: HashMap<String, NamedTensor>,
    device: Device,
}

impl ModuleMapper for Replace {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let Some(t) = self.tensors.remove(&name) else {
            return param;
        };
        let require_grad = param.is_require_grad();
        let (id, old, mapper) = param.consume();
        let device = if old.device() == self.device {
            old.device()
        } else {
            self.device.clone()
        };
        let tensor = Tensor::<D>::from_data(TensorData::new(t.values, t.shape), &device);
        let tensor = if require_grad {
            tensor.require_grad()
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}
