//! Loading by Hugging Face repo id from a pre-populated Hub cache (no network): the cache
//! layout `models--owner--name/{refs/main, snapshots/<rev>/...}` that hf-hub and huggingface_hub
//! share. Its own test binary because it sets HF_HUB_OFFLINE.

mod common;

use sd_lora::pipeline::{resolve_model, LoadOptions, StableDiffusion};

#[test]
fn repo_ids_resolve_from_a_populated_cache_offline() {
    // SAFETY: this binary has a single test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let src = common::tiny_pipeline();
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--tiny-sd");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(src.path())
        .arg(&snap)
        .status()
        .unwrap();
    assert!(status.success());

    let root = resolve_model("someone/tiny-sd", Some("fp16"), Some(cache.path())).unwrap();
    assert_eq!(root, snap);
    let opts = LoadOptions {
        source: "someone/tiny-sd".into(),
        variant: Some("fp16".into()),
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let sd = StableDiffusion::load_with(&opts).unwrap();
    assert_eq!(sd.root, snap);

    // a file missing from the cache while offline is named, with the cache folder
    std::fs::remove_file(snap.join("vae/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let err = resolve_model("someone/tiny-sd", Some("fp16"), Some(cache.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vae/diffusion_pytorch_model.fp16.safetensors")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let err = resolve_model("not a repo", None, Some(cache.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a repo"), "{err}");
}
