//! Checks a model folder against the conventions `transformers` relies on to load it
//! (`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`).
//!
//! The check reads `config.json` as raw JSON and derives the tensor names and shapes from it by
//! transformers' rules (`modeling_llama.py`, `modeling_qwen2.py`, `modeling_mistral.py`,
//! `GenericFor{Sequence,Token}Classification`), independently of [`crate::ModelConfig`] and
//! [`crate::weights::param_specs`], so a mistake in the crate's own reading of a config is caught
//! rather than repeated. Only safetensors headers are read, never tensor data.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value};

/// Where and how one tensor is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The safetensors dtype name (`F32`, `BF16`, `F16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The file that holds it, relative to the folder.
    pub file: String,
}

/// Checks the model folder `dir`: `config.json` (the keys and types transformers needs for the
/// architecture), the safetensors tensors (names exactly as transformers names them, shapes from
/// the config, dtypes equal to the config's dtype), the tokenizer files (`tokenizer.json`,
/// `tokenizer_config.json`, `special_tokens_map.json` when present, special tokens that exist
/// and agree with the config's ids) and, for a causal LM, `generation_config.json`. Returns
/// every problem found, each naming the file and the key or tensor at fault.
pub fn check_folder(dir: &Path) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let config = match read_json_object(&dir.join("config.json")) {
        Ok(c) => Some(c),
        Err(p) => {
            problems.push(p);
            None
        }
    };
    let resolved = config.as_ref().and_then(|c| check_config(c, &mut problems));
    match tensor_index(dir) {
        Err(mut p) => problems.append(&mut p),
        Ok(tensors) => {
            if let Some(r) = &resolved {
                check_tensors(r, &tensors, &mut problems);
            }
        }
    }
    let generation = check_generation_config(dir, resolved.as_ref(), &mut problems);
    check_tokenizer_files(dir, resolved.as_ref(), generation.as_ref(), &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Every tensor of the folder's weights, by name: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json` (whose `weight_map` must agree with the shards' contents).
pub fn tensor_index(dir: &Path) -> Result<BTreeMap<String, TensorInfo>, Vec<String>> {
    let index_path = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let mut problems = Vec::new();
    let mut tensors = BTreeMap::new();
    if index_path.is_file() {
        if single.is_file() {
            problems.push(
                "model.safetensors and model.safetensors.index.json are both present: \
                 transformers reads only one of them"
                    .to_string(),
            );
        }
        let index = read_json_object(&index_path).map_err(|p| vec![p])?;
        let Some(Value::Object(weight_map)) = index.get("weight_map") else {
            return Err(vec![
                "model.safetensors.index.json: `weight_map` is missing or not an object".into(),
            ]);
        };
        let mut files = BTreeSet::new();
        let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, file) in weight_map {
            match file.as_str() {
                Some(f) => {
                    files.insert(f.to_string());
                    listed.insert(name, f);
                }
                None => problems.push(format!(
                    "model.safetensors.index.json: `weight_map.{name}` is {file}, not a file name"
                )),
            }
        }
        for file in &files {
            match read_header(&dir.join(file), file) {
                Err(p) => problems.push(p),
                Ok(header) => {
                    for (name, info) in header {
                        match listed.get(name.as_str()) {
                            Some(f) if *f == file => {}
                            Some(f) => problems.push(format!(
                                "model.safetensors.index.json: tensor `{name}` is in {file}, \
                                 but weight_map says {f}"
                            )),
                            None => problems.push(format!(
                                "model.safetensors.index.json: tensor `{name}` of {file} is \
                                 not in weight_map"
                            )),
                        }
                        if tensors.insert(name.clone(), info).is_some() {
                            problems.push(format!("tensor `{name}` is in more than one shard"));
                        }
                    }
                }
            }
        }
        for (name, file) in &listed {
            if files.contains(*file) && dir.join(file).is_file() && !tensors.contains_key(*name) {
                problems.push(format!(
                    "model.safetensors.index.json: weight_map lists `{name}` in {file}, which \
                     does not hold it"
                ));
            }
        }
    } else if single.is_file() {
        match read_header(&single, "model.safetensors") {
            Ok(header) => tensors = header,
            Err(p) => problems.push(p),
        }
    } else {
        problems.push(
            "no model.safetensors or model.safetensors.index.json: transformers finds no weights"
                .into(),
        );
    }
    if problems.is_empty() {
        Ok(tensors)
    } else {
        Err(problems)
    }
}

/// Bytes per element of a safetensors dtype name.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// The safetensors dtype name of a config dtype (`torch_dtype` / `dtype`).
fn safetensors_dtype(config_dtype: &str) -> Option<&'static str> {
    match config_dtype {
        "float32" => Some("F32"),
        "bfloat16" => Some("BF16"),
        "float16" => Some("F16"),
        _ => None,
    }
}

/// Reads the JSON header of one safetensors file (the format: an 8-byte little-endian header
/// length, the header, then the data; <https://github.com/huggingface/safetensors#format>) and
/// checks each tensor's byte range against its dtype and shape.
fn read_header(path: &Path, file: &str) -> Result<BTreeMap<String, TensorInfo>, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{file}: cannot open: {e}"))?;
    let total = f
        .metadata()
        .map_err(|e| format!("{file}: cannot stat: {e}"))?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| format!("{file}: shorter than a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || 8 + n > total {
        return Err(format!(
            "{file}: header length {n} does not fit the file ({total} bytes)"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| format!("{file}: cannot read the header: {e}"))?;
    let header: Map<String, Value> = match serde_json::from_slice(&header) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(format!("{file}: the header is not a JSON object")),
        Err(e) => return Err(format!("{file}: the header is not valid JSON: {e}")),
    };
    let data_len = total - 8 - n;
    let mut problems = Vec::new();
    let mut out = BTreeMap::new();
    for (name, entry) in &header {
        if name == "__metadata__" {
            // transformers refuses safetensors metadata whose `format` is not a framework it
            // knows; it writes "pt".
            let format = entry.get("format").and_then(Value::as_str);
            if format != Some("pt") {
                problems.push(format!(
                    "{file}: __metadata__.format is {}, transformers expects \"pt\"",
                    format.map_or("missing".to_string(), |f| format!("{f:?}"))
                ));
            }
            continue;
        }
        let dtype = entry.get("dtype").and_then(Value::as_str);
        let shape: Option<Vec<usize>> = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let offsets: Option<Vec<u64>> = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect());
        let (Some(dtype), Some(shape), Some(offsets)) = (dtype, shape, offsets) else {
            problems.push(format!(
                "{file}: tensor `{name}` lacks a valid dtype, shape or data_offsets: {entry}"
            ));
            continue;
        };
        let Some(size) = dtype_size(dtype) else {
            problems.push(format!("{file}: tensor `{name}` has unknown dtype {dtype}"));
            continue;
        };
        let bytes = shape.iter().product::<usize>() as u64 * size as u64;
        match offsets[..] {
            [start, end] if start <= end && end <= data_len && end - start == bytes => {}
            _ => problems.push(format!(
                "{file}: tensor `{name}` ({dtype} {shape:?}, {bytes} bytes) has data_offsets \
                 {offsets:?} outside or unequal to its size (data section {data_len} bytes)"
            )),
        }
        out.insert(
            name.clone(),
            TensorInfo {
                dtype: dtype.to_string(),
                shape,
                file: file.to_string(),
            },
        );
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>, String> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!("{name}: not a JSON object")),
        Err(e) => Err(format!("{name}: invalid JSON: {e}")),
    }
}

/// The architecture and sizes read from `config.json`, by transformers' rules.
#[derive(Debug)]
struct Resolved {
    family: &'static str,
    head: &'static str,
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tie: bool,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    num_labels: usize,
    token_classification_bias: bool,
    /// The safetensors dtype every tensor must have.
    dtype: Option<(&'static str, String)>,
    bos: Option<u64>,
    eos: Vec<u64>,
    pad: Option<u64>,
}

const FAMILIES: [(&str, &str); 3] = [
    ("Llama", "llama"),
    ("Qwen2", "qwen2"),
    ("Mistral", "mistral"),
];
const HEADS: [&str; 3] = [
    "ForCausalLM",
    "ForSequenceClassification",
    "ForTokenClassification",
];

/// Reads `config.json`'s fields with their types, recording each problem.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    problems: &'a mut Vec<String>,
}

impl Keys<'_> {
    fn problem(&mut self, key: &str, message: impl std::fmt::Display) {
        self.problems
            .push(format!("config.json: `{key}`: {message}"));
    }

    /// A required positive integer.
    fn positive(&mut self, key: &str) -> Option<usize> {
        match self.map.get(key) {
            None => {
                self.problem(key, "missing (transformers would use its own default)");
                None
            }
            Some(v) => self.positive_value(key, v),
        }
    }

    fn positive_value(&mut self, key: &str, v: &Value) -> Option<usize> {
        match v.as_u64() {
            Some(n) if n > 0 => Some(n as usize),
            _ => {
                self.problem(key, format!("expected a positive integer, found {v}"));
                None
            }
        }
    }

    /// An optional positive integer (absent or null is `None`).
    fn positive_opt(&mut self, key: &str) -> Option<usize> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => self.positive_value(key, v),
        }
    }

    fn number(&mut self, key: &str, v: &Value) -> Option<f64> {
        match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Some(x),
            _ => {
                self.problem(key, format!("expected a positive number, found {v}"));
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, required: bool) -> Option<bool> {
        match self.map.get(key) {
            None if required => {
                self.problem(key, "missing (required, true or false)");
                None
            }
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                self.problem(key, format!("expected true or false, found {v}"));
                None
            }
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.problem(key, format!("expected a string, found {v}"));
                None
            }
        }
    }

    /// A token id (or, with `list_ok`, a non-empty list of ids) below `vocab`.
    fn token_ids(&mut self, key: &str, list_ok: bool, vocab: Option<usize>) -> Vec<u64> {
        let one = |v: &Value| v.as_u64();
        let ids: Vec<u64> = match self.map.get(key) {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(items)) if list_ok && !items.is_empty() => {
                match items.iter().map(one).collect::<Option<Vec<u64>>>() {
                    Some(ids) => ids,
                    None => {
                        self.problem(key, format!("expected token ids, found {}", self.map[key]));
                        return Vec::new();
                    }
                }
            }
            Some(v) => match one(v) {
                Some(id) => vec![id],
                None => {
                    self.problem(key, format!("expected a token id, found {v}"));
                    return Vec::new();
                }
            },
        };
        if let Some(vocab) = vocab {
            for &id in &ids {
                if id as usize >= vocab {
                    self.problem(
                        key,
                        format!("token id {id} is not below vocab_size {vocab}"),
                    );
                }
            }
        }
        ids
    }
}

fn check_config(map: &Map<String, Value>, problems: &mut Vec<String>) -> Option<Resolved> {
    let mut k = Keys { map, problems };
    let arch = match map.get("architectures") {
        Some(Value::Array(items)) if !items.is_empty() => match items[0].as_str() {
            Some(name) => Some(name.to_string()),
            None => {
                k.problem(
                    "architectures",
                    format!("expected strings, found {}", items[0]),
                );
                None
            }
        },
        Some(v) => {
            k.problem(
                "architectures",
                format!("expected a non-empty list, found {v}"),
            );
            None
        }
        None => {
            k.problem(
                "architectures",
                "missing (transformers picks the class from it)",
            );
            None
        }
    };
    let parsed = arch.as_deref().and_then(|name| {
        FAMILIES.iter().find_map(|&(prefix, model_type)| {
            let rest = name.strip_prefix(prefix)?;
            HEADS
                .iter()
                .find(|h| **h == rest)
                .map(|&h| (prefix, model_type, h))
        })
    });
    if let (Some(name), None) = (&arch, parsed) {
        k.problem(
            "architectures",
            format!("`{name}` is not a Llama, Qwen2 or Mistral causal LM or classifier"),
        );
    }
    match (k.string("model_type"), parsed) {
        (None, _) if !map.contains_key("model_type") => {
            k.problem("model_type", "missing (AutoConfig needs it)")
        }
        (Some(t), Some((_, expected, _))) if t != expected => k.problem(
            "model_type",
            format!("`{t}` does not match architectures (expected `{expected}`)"),
        ),
        _ => {}
    }

    let vocab = k.positive("vocab_size");
    let hidden = k.positive("hidden_size");
    let intermediate = k.positive("intermediate_size");
    let layers = k.positive("num_hidden_layers");
    let heads = k.positive("num_attention_heads");
    let kv_heads = k.positive("num_key_value_heads");
    k.positive("max_position_embeddings");
    if let (Some(h), Some(kv)) = (heads, kv_heads)
        && h % kv != 0
    {
        k.problem(
            "num_key_value_heads",
            format!("{kv} does not divide num_attention_heads = {h}"),
        );
    }
    let head_dim = match (k.positive_opt("head_dim"), hidden, heads) {
        (Some(d), _, _) => Some(d),
        (None, Some(h), Some(n)) if h % n == 0 => Some(h / n),
        (None, Some(h), Some(n)) => {
            k.problem(
                "head_dim",
                format!(
                    "missing, and hidden_size {h} is not a multiple of num_attention_heads {n}"
                ),
            );
            None
        }
        _ => None,
    };
    match map.get("rms_norm_eps") {
        None => k.problem(
            "rms_norm_eps",
            "missing (transformers would use its own default)",
        ),
        Some(v) => {
            k.number("rms_norm_eps", v);
        }
    }

    // rope_theta: top level (transformers < 5) and/or inside rope_parameters (transformers 5).
    let nested = match map.get("rope_parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => p.get("rope_theta").cloned(),
        Some(v) => {
            k.problem("rope_parameters", format!("expected an object, found {v}"));
            None
        }
    };
    let top = map.get("rope_theta").cloned();
    let theta_top = top.as_ref().and_then(|v| k.number("rope_theta", v));
    let theta_nested = nested
        .as_ref()
        .and_then(|v| k.number("rope_parameters.rope_theta", v));
    match (theta_top, theta_nested) {
        (Some(a), Some(b)) if a != b => k.problem(
            "rope_theta",
            format!("{a} differs from rope_parameters.rope_theta {b}"),
        ),
        _ if top.is_none() && nested.is_none() => k.problem(
            "rope_theta",
            "missing (neither rope_theta nor rope_parameters.rope_theta)",
        ),
        _ => {}
    }
    if let Some(v) = map.get("rope_scaling")
        && !v.is_null()
        && !v.is_object()
    {
        k.problem(
            "rope_scaling",
            format!("expected an object or null, found {v}"),
        );
    }

    let tie = k.boolean("tie_word_embeddings", true);
    if let Some(v) = map.get("hidden_act")
        && !v.is_string()
    {
        k.problem("hidden_act", format!("expected a string, found {v}"));
    }
    if let Some(v) = map.get("transformers_version")
        && !v.is_string()
    {
        k.problem(
            "transformers_version",
            format!("expected a string, found {v}"),
        );
    }

    // dtype: transformers 5 reads `dtype`, older versions `torch_dtype`; both are written.
    let dtype = k.string("dtype");
    let torch_dtype = k.string("torch_dtype");
    let declared = match (&dtype, &torch_dtype) {
        (Some(a), Some(b)) if a != b => {
            k.problem("dtype", format!("`{a}` differs from torch_dtype `{b}`"));
            None
        }
        (Some(a), _) => Some(("dtype", a.clone())),
        (None, Some(b)) => Some(("torch_dtype", b.clone())),
        (None, None) => {
            k.problem("dtype", "missing (neither dtype nor torch_dtype)");
            None
        }
    };
    let dtype = declared.and_then(|(key, name)| match safetensors_dtype(&name) {
        Some(st) => Some((st, name)),
        None => {
            k.problem(key, format!("`{name}` is not float32, bfloat16 or float16"));
            None
        }
    });

    let bos = k.token_ids("bos_token_id", false, vocab).first().copied();
    let eos = k.token_ids("eos_token_id", true, vocab);
    if eos.is_empty() && !k.problems.iter().any(|p| p.contains("`eos_token_id`")) {
        k.problem(
            "eos_token_id",
            "missing or null (generation would never stop)",
        );
    }
    let pad = k.token_ids("pad_token_id", false, vocab).first().copied();

    let (family, _, head) = parsed?;
    let attention_bias = if family == "Llama" {
        k.boolean("attention_bias", false).unwrap_or(false)
    } else {
        false
    };
    let mlp_bias = family == "Llama" && k.boolean("mlp_bias", false).unwrap_or(false);
    match family {
        "Qwen2" => {
            k.boolean("use_sliding_window", false);
        }
        "Mistral" => {
            k.positive_opt("sliding_window");
        }
        _ => {}
    }
    // transformers: num_labels = len(id2label) if present, else `num_labels`, else 2.
    let num_labels = match map.get("id2label") {
        Some(Value::Object(labels)) if !labels.is_empty() => labels.len(),
        Some(v) if !v.is_null() && !v.is_object() => {
            k.problem("id2label", format!("expected an object, found {v}"));
            1
        }
        _ => k.positive_opt("num_labels").unwrap_or(2),
    };
    let token_classification_bias = k
        .boolean("token_classification_bias", false)
        .unwrap_or(true);
    Some(Resolved {
        family,
        head,
        vocab: vocab?,
        hidden: hidden?,
        intermediate: intermediate?,
        layers: layers?,
        heads: heads?,
        kv_heads: kv_heads?,
        head_dim: head_dim?,
        tie: tie?,
        qkv_bias: family == "Qwen2" || attention_bias,
        o_bias: attention_bias,
        mlp_bias,
        num_labels,
        token_classification_bias,
        dtype,
        bos,
        eos,
        pad,
    })
}

/// The tensors transformers' model class for `r` has, with their shapes.
fn expected_tensors(r: &Resolved) -> BTreeMap<String, Vec<usize>> {
    let h = r.hidden;
    let mut out: BTreeMap<String, Vec<usize>> =
        crate::weights::decoder_tensors(&crate::weights::DecoderShape {
            vocab: r.vocab,
            hidden: h,
            intermediate: r.intermediate,
            layers: r.layers,
            heads: r.heads,
            kv_heads: r.kv_heads,
            head_dim: r.head_dim,
            qkv_bias: r.qkv_bias,
            o_bias: r.o_bias,
            mlp_bias: r.mlp_bias,
        })
        .into_iter()
        .collect();
    match r.head {
        "ForCausalLM" if !r.tie => {
            out.insert("lm_head.weight".to_string(), vec![r.vocab, h]);
        }
        "ForCausalLM" => {}
        "ForSequenceClassification" => {
            out.insert("score.weight".to_string(), vec![r.num_labels, h]);
        }
        _ => {
            out.insert("score.weight".to_string(), vec![r.num_labels, h]);
            if r.token_classification_bias {
                out.insert("score.bias".to_string(), vec![r.num_labels]);
            }
        }
    }
    out
}

fn check_tensors(r: &Resolved, tensors: &BTreeMap<String, TensorInfo>, problems: &mut Vec<String>) {
    let expected = expected_tensors(r);
    let arch = format!("{}{}", r.family, r.head);
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => problems.push(format!(
                "tensor `{name}` is missing: {arch} needs it{}",
                if name.ends_with(".bias") && r.family == "Qwen2" {
                    " (Qwen2 has biases on q/k/v)"
                } else {
                    ""
                }
            )),
            Some(t) if &t.shape != shape => problems.push(format!(
                "{}: tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                t.file, t.shape
            )),
            Some(_) => {}
        }
    }
    for (name, t) in tensors {
        if expected.contains_key(name) {
            continue;
        }
        if name == "lm_head.weight" && r.tie {
            problems.push(format!(
                "{}: tensor `lm_head.weight` is present but tie_word_embeddings is true: \
                 transformers ties lm_head to model.embed_tokens.weight and ignores it",
                t.file
            ));
        } else {
            problems.push(format!(
                "{}: tensor `{name}` is not a parameter of {arch} (transformers would drop it)",
                t.file
            ));
        }
    }
    if let Some((st, name)) = &r.dtype {
        let wrong: Vec<&String> = tensors
            .iter()
            .filter(|(_, t)| t.dtype != *st)
            .map(|(n, _)| n)
            .collect();
        if let Some(first) = wrong.first() {
            let t = &tensors[*first];
            problems.push(format!(
                "{}: {} tensor(s) are not {st} although config.json's dtype is {name}, e.g. \
                 `{first}` is {}",
                t.file,
                wrong.len(),
                t.dtype
            ));
        }
    }
}

/// Checks `generation_config.json` and returns it.
fn check_generation_config(
    dir: &Path,
    r: Option<&Resolved>,
    problems: &mut Vec<String>,
) -> Option<Map<String, Value>> {
    let path = dir.join("generation_config.json");
    let generates = r.is_none_or(|r| r.head == "ForCausalLM");
    if !path.is_file() && !generates {
        // transformers writes none for classifiers, which cannot generate.
        return None;
    }
    if !path.is_file() {
        problems.push(
            "generation_config.json is missing (transformers' generate() reads the token ids \
             from it)"
                .into(),
        );
        return None;
    }
    let map = match read_json_object(&path) {
        Ok(m) => m,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    let mut sub = Vec::new();
    let mut k = Keys {
        map: &map,
        problems: &mut sub,
    };
    let vocab = r.map(|r| r.vocab);
    k.token_ids("bos_token_id", false, vocab);
    k.token_ids("eos_token_id", true, vocab);
    k.token_ids("pad_token_id", false, vocab);
    k.boolean("do_sample", false);
    problems.extend(
        sub.into_iter()
            .map(|p| p.replacen("config.json", "generation_config.json", 1)),
    );
    Some(map)
}

/// A special token of `tokenizer_config.json` / `special_tokens_map.json`: a string or an
/// AddedToken object `{"content": ...}`.
fn special_token(
    file: &str,
    map: &Map<String, Value>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    match map.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => {
                problems.push(format!("{file}: `{key}` has no string `content`"));
                None
            }
        },
        Some(v) => {
            problems.push(format!(
                "{file}: `{key}`: expected a token string, found {v}"
            ));
            None
        }
    }
}

fn check_tokenizer_files(
    dir: &Path,
    r: Option<&Resolved>,
    generation: Option<&Map<String, Value>>,
    problems: &mut Vec<String>,
) {
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        match tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("tokenizer.json: cannot be loaded: {e}"));
                None
            }
        }
    } else {
        problems.push("tokenizer.json is missing (AutoTokenizer needs it)".into());
        None
    };
    if let (Some(t), Some(r)) = (&tokenizer, r) {
        let max_id = t.get_vocab(true).into_values().max();
        if let Some(max_id) = max_id
            && max_id as usize >= r.vocab
        {
            problems.push(format!(
                "tokenizer.json: token id {max_id} is not below config.json's vocab_size {}",
                r.vocab
            ));
        }
    }
    let config_path = dir.join("tokenizer_config.json");
    if !config_path.is_file() {
        problems.push("tokenizer_config.json is missing (AutoTokenizer needs it)".into());
        return;
    }
    let config = match read_json_object(&config_path) {
        Ok(c) => c,
        Err(p) => {
            problems.push(p);
            return;
        }
    };
    let file = "tokenizer_config.json";
    if let Some(v) = config.get("tokenizer_class")
        && !v.is_string()
    {
        problems.push(format!(
            "{file}: `tokenizer_class`: expected a string, found {v}"
        ));
    }
    match config.get("chat_template") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(items))
            if items.iter().all(|t| {
                t.get("name").is_some_and(Value::is_string)
                    && t.get("template").is_some_and(Value::is_string)
            }) => {}
        Some(v) => problems.push(format!(
            "{file}: `chat_template`: expected a string or a list of {{name, template}}, found {v}"
        )),
    }
    let specials: BTreeMap<&str, Option<String>> =
        ["bos_token", "eos_token", "pad_token", "unk_token"]
            .into_iter()
            .map(|key| (key, special_token(file, &config, key, problems)))
            .collect();
    if let Some(t) = &tokenizer {
        for (key, token) in &specials {
            if let Some(token) = token
                && t.token_to_id(token).is_none()
            {
                problems.push(format!(
                    "{file}: `{key}` {token:?} is not a token of tokenizer.json"
                ));
            }
        }
    }
    let id = |key: &str| -> Option<u64> {
        let token = specials.get(key)?.as_ref()?;
        tokenizer.as_ref()?.token_to_id(token).map(u64::from)
    };
    if let Some(r) = r {
        if let (Some(tok), Some(cfg)) = (id("bos_token"), r.bos)
            && tok != cfg
        {
            problems.push(format!(
                "{file}: bos_token is id {tok}, config.json's bos_token_id is {cfg}"
            ));
        }
        if let (Some(tok), Some(cfg)) = (id("pad_token"), r.pad)
            && tok != cfg
        {
            problems.push(format!(
                "{file}: pad_token is id {tok}, config.json's pad_token_id is {cfg}"
            ));
        }
        if let Some(tok) = id("eos_token") {
            let mut stops: BTreeSet<u64> = r.eos.iter().copied().collect();
            if let Some(g) = generation {
                match g.get("eos_token_id") {
                    Some(Value::Array(ids)) => stops.extend(ids.iter().filter_map(Value::as_u64)),
                    Some(v) => stops.extend(v.as_u64()),
                    None => {}
                }
            }
            if !stops.is_empty() && !stops.contains(&tok) {
                problems.push(format!(
                    "{file}: eos_token is id {tok}, which is not an eos_token_id of config.json \
                     or generation_config.json ({stops:?}): generation would not stop on it"
                ));
            }
        }
    }
    let map_path = dir.join("special_tokens_map.json");
    if map_path.is_file() {
        match read_json_object(&map_path) {
            Err(p) => problems.push(p),
            Ok(map) => {
                let file = "special_tokens_map.json";
                for (key, ours) in &specials {
                    let theirs = special_token(file, &map, key, problems);
                    if let (Some(a), Some(b)) = (ours, &theirs)
                        && a != b
                    {
                        problems.push(format!(
                            "{file}: `{key}` is {b:?}, tokenizer_config.json says {a:?}"
                        ));
                    }
                }
            }
        }
    }
    if let Err(e) = crate::Tokenizer::from_dir(dir) {
        problems.push(format!("tokenizer files: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_num_labels_default_is_two() {
        let map: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
            "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "dtype": "float32", "eos_token_id": 1, "pad_token_id": 0
        }))
        .unwrap();
        let mut problems = Vec::new();
        let r = check_config(&map, &mut problems).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(expected_tensors(&r)["score.weight"], vec![2, 4]);
    }
}
