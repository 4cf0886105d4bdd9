//! The CLIP tokenizer: byte-level BPE through the `tokenizers` crate, configured exactly as
//! transformers' `CLIPTokenizer` (NFC, whitespace runs to one space, lower-case, CLIP's split
//! pattern, byte-level, `</w>` word ends), with BOS/EOS added and padding/truncation to the
//! model's length (77) done here.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use tokenizers::Tokenizer;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Tokenizes prompts into fixed-length id sequences for the CLIP text encoder.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    pub max_length: usize,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClipTokenizer(vocab {}, max_length {})",
            self.tokenizer.get_vocab_size(true),
            self.max_length
        )
    }
}

/// GPT-2's byte -> printable character table (the order defines the first 256 vocab ids).
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid code point"))
        .collect()
}

/// Builds `vocab.json` and `merges.txt` (diffusers' `tokenizer/` layout, the files of
/// `openai/clip-vit-large-patch14`) from OpenAI's BPE list `bpe_simple_vocab_16e6.txt[.gz]`.
pub fn write_clip_vocab(bpe_file: &Path, out_dir: &Path) -> Result<()> {
    let raw = std::fs::read(bpe_file)
        .with_context(|| format!("cannot read BPE list {}", bpe_file.display()))?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .with_context(|| format!("{} is not valid gzip", bpe_file.display()))?;
        s
    } else {
        String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", bpe_file.display()))?
    };
    let lines: Vec<&str> = text.split('\n').collect();
    let n_merges = 49152 - 256 - 2;
    if lines.len() < n_merges + 1 {
        bail!(
            "{} has {} lines, expected CLIP's BPE list (> {n_merges})",
            bpe_file.display(),
            lines.len()
        );
    }
    let merges = &lines[1..=n_merges];
    let bytes = bytes_to_unicode();
    let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.split(' ').collect::<String>()));
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, (i as u64).into()))
        .collect();
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    std::fs::write(out_dir.join("vocab.json"), serde_json::to_string(&map)?)?;
    std::fs::write(
        out_dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )?;
    Ok(())
}

impl ClipTokenizer {
    /// Loads `tokenizer.json`, or `vocab.json` + `merges.txt`, from a diffusers `tokenizer/`
    /// folder (or a pipeline root containing one). `tokenizer_config.json`, when present, gives
    /// the pad token and `model_max_length`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let dir = if dir.join("tokenizer").is_dir() {
            dir.join("tokenizer")
        } else {
            dir.to_path_buf()
        };
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            let p = dir.join("tokenizer.json");
            let mut t = Tokenizer::from_file(&p)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", p.display()))?;
            t.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
            t.with_padding(None);
            t.with_truncation(None)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            t
        } else {
            Self::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        let mut max_length = 77;
        let mut pad = EOS.to_string();
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)
                    .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
            if let Some(m) = v.get("model_max_length").and_then(|m| m.as_u64()) {
                if m > 0 && m < 100_000 {
                    max_length = m as usize;
                }
            }
            match v.get("pad_token") {
                Some(serde_json::Value::String(s)) => pad = s.clone(),
                Some(o) => {
                    if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                        pad = s.to_string();
                    }
                }
                None => {}
            }
        }
        let id = |t: &str| -> Result<u32> {
            tokenizer
                .token_to_id(t)
                .with_context(|| format!("tokenizer in {} has no token `{t}`", dir.display()))
        };
        Ok(Self {
            bos_id: id(BOS)?,
            eos_id: id(EOS)?,
            pad_id: id(&pad)?,
            tokenizer,
            max_length,
        })
    }

    fn from_vocab_merges(vocab: &Path, merges_path: &Path) -> Result<Tokenizer> {
        for f in [vocab, merges_path] {
            if !f.is_file() {
                bail!("tokenizer file {} is missing (expected tokenizer.json, or vocab.json + merges.txt)", f.display());
            }
        }
        let vocab_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(vocab)?)
            .with_context(|| format!("{} is not valid JSON", vocab.display()))?;
        let merges_txt = std::fs::read_to_string(merges_path)?;
        let merges: Vec<&str> = merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        // the exact pipeline of transformers' CLIPTokenizer, as a tokenizer.json document
        let doc = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": vocab_json.get(BOS), "content": BOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
                {"id": vocab_json.get(EOS), "content": EOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab_json, "merges": merges}
        });
        Tokenizer::from_bytes(serde_json::to_vec(&doc)?).map_err(|e| {
            anyhow::anyhow!(
                "cannot build the tokenizer from {} and {}: {e}",
                vocab.display(),
                merges_path.display()
            )
        })
    }

    /// Pads with `token` instead (SD 2.x's tokenizer pads with `!`).
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        self.pad_id = self
            .tokenizer
            .token_to_id(token)
            .with_context(|| format!("the tokenizer has no token `{token}` to pad with"))?;
        Ok(self)
    }

    /// Ids of one prompt: BOS, at most `max_length - 2` tokens, EOS, then padding to
    /// `max_length` (transformers' `padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {text:?}: {e}"))?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(enc.get_ids().iter().take(self.max_length.saturating_sub(2)));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Number of content tokens (without BOS/EOS) before truncation: > `max_length - 2` means
    /// the prompt is cut.
    pub fn token_count(&self, text: &str) -> Result<usize> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {text:?}: {e}"))?
            .get_ids()
            .len())
    }

    /// Ids of several prompts as a `[N, max_length]` u32 tensor.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let mut all = Vec::with_capacity(texts.len() * self.max_length);
        for t in texts {
            all.extend(self.encode(t)?);
        }
        Ok(candle_core::Tensor::from_vec(
            all,
            (texts.len(), self.max_length),
            device,
        )?)
    }
}

/// Where `scripts/fetch-clip-bpe.sh` puts OpenAI's CLIP BPE list:
/// `$SD_LORA_CACHE/clip-bpe/bpe_simple_vocab_16e6.txt.gz` (default `~/.cache/sd-lora`).
pub fn default_clip_bpe() -> std::path::PathBuf {
    let base = std::env::var("SD_LORA_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/sd-lora")
        });
    base.join("clip-bpe/bpe_simple_vocab_16e6.txt.gz")
}
