//! Heap bytes of one LoRA training step, measured with a counting allocator: the weights, the
//! activations the autograd graph keeps after the forward pass, and the peaks of the forward
//! and of the backward. The data behind `sd-lora estimate-memory`'s coefficients
//! (src/commands/estimate.rs) and its check (BENCHMARKS.md).
//!
//!     cargo run --release --example memory_probe -- MODEL LATENT BATCH [gc] [te]
//!
//! MODEL: tiny, sd15 or a UNet config.json; `gc` turns on gradient checkpointing. Prints one
//! JSON line (MiB).

use sd_lora::prelude::*;
use sd_lora::train::step::grads_of;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CUR.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CUR.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new > l.size() {
                let now = CUR.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CUR.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mib(b: usize) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map_or("tiny", |s| s.as_str());
    let latent: usize = args.get(1).map_or(Ok(16), |s| s.parse())?;
    let batch: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let gc = args.iter().any(|a| a == "gc");
    if let Some(vae) = model.strip_prefix("vae-") {
        // VAE-encode `batch` images of LATENT pixels, as the latent cache does (no graph)
        let vcfg = if vae == "tiny" {
            sd_lora::vae::VaeConfig::tiny()
        } else {
            sd_lora::vae::VaeConfig::sd_v1_5()
        };
        let ws = sd_lora::weights::WeightSource::random(1, DType::F32, &Device::Cpu);
        let v = sd_lora::vae::AutoencoderKL::new(&vcfg, &ws)?;
        let x = Tensor::randn(0f32, 1.0, (batch, 3, latent, latent), &Device::Cpu)?;
        let base = CUR.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let d = v.encode(&x)?;
        drop(d);
        println!(
            "{}",
            serde_json::json!({"model": model, "pixels": latent, "batch": batch,
                "weights_mib": mib(base), "encode_peak_mib": mib(PEAK.load(Ordering::Relaxed) - base),
                "peak_rss_mib": sd_lora::device::peak_rss_mib()})
        );
        return Ok(());
    }
    let cfg = UNetConfig::for_model(model)?;
    let dev = Device::Cpu;
    let mut unet = UNet2DConditionModel::random(&cfg, 0, DType::F32, &dev)?;
    unet.inject_lora(&LoraConfig::new(16, 32.0), &VarMap::new())?;
    unet.gradient_checkpointing = gc;
    let vars = unet.lora_vars()?;
    let ctx_dim = cfg.cross_dims()?[0];
    let x = Tensor::randn(0f32, 1.0, (batch, 4, latent, latent), &dev)?;
    let e = Tensor::randn(0f32, 1.0, (batch, 77, ctx_dim), &dev)?;
    let t = Tensor::new(vec![500u32; batch], &dev)?;
    let noise = Tensor::randn(0f32, 1.0, (batch, 4, latent, latent), &dev)?;
    let base = CUR.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let pred = unet.forward(&x, &t, &e)?;
    let loss = (pred - &noise)?.sqr()?.mean_all()?;
    let kept = CUR.load(Ordering::Relaxed) - base;
    let fwd_peak = PEAK.load(Ordering::Relaxed) - base;
    PEAK.store(CUR.load(Ordering::Relaxed), Ordering::Relaxed);
    let g = grads_of(&loss, &vars)?;
    let bwd_peak = PEAK.load(Ordering::Relaxed) - base;
    drop((g, loss));
    println!(
        "{}",
        serde_json::json!({
            "model": model, "latent": latent, "batch": batch, "gc": gc,
            "weights_mib": mib(base), "kept_mib": mib(kept),
            "forward_peak_mib": mib(fwd_peak), "backward_peak_mib": mib(bwd_peak),
            "peak_rss_mib": sd_lora::device::peak_rss_mib(),
        })
    );
    Ok(())
}
