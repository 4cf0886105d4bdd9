//! CLIP tokenizer ids against transformers' CLIPTokenizer (real CLIP BPE), and the text encoder
//! against transformers' CLIPTextModel (tests/golden/make_golden_pipeline.py).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{load, rel_err, tiny_pipeline};
use sd_lora::text::{ClipTextModel, ClipTokenizer};

#[test]
fn tokenizer_ids_match_transformers() {
    let dir = tiny_pipeline();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length),
        (49406, 49407, 49407, 77)
    );
    let text = std::fs::read_to_string(common::golden("tokenizer_ids.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = v["prompts"].as_array().unwrap();
    let ids = v["input_ids"].as_array().unwrap();
    assert_eq!(prompts.len(), 6);
    for (p, want) in prompts.iter().zip(ids) {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(p.as_str().unwrap()).unwrap();
        assert_eq!(got, want, "prompt {p}");
    }
    assert!(
        tok.token_count(&"word ".repeat(90)).unwrap() > 75,
        "long prompts report their true length"
    );
}

#[test]
fn text_encoder_matches_transformers() {
    let dir = tiny_pipeline();
    let te = ClipTextModel::load(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let r = load("tiny_pipeline/reference.safetensors");
    let out = te.forward(&r["text.input_ids"]).unwrap();
    let e1 = rel_err(&out.last_hidden_state, &r["text.last_hidden_state"]);
    let e2 = rel_err(&out.pooler_output, &r["text.pooler_output"]);
    println!("text encoder rel err: hidden {e1:.2e}, pooled {e2:.2e}");
    assert!(e1 < 1e-4 && e2 < 1e-4, "{e1} {e2}");
    // the tokenizer feeds it directly
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    let ids = tok
        .encode_batch(&["a red circle on a blue background"], &Device::Cpu)
        .unwrap();
    let o = te.forward(&ids).unwrap();
    assert_eq!(o.last_hidden_state.dims(), &[1, 77, 16]);
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    let err = sd_lora::text::write_clip_vocab(&dir.path().join("none.gz"), dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("none.gz"), "{err}");
}
