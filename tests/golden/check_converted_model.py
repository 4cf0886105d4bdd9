#!/usr/bin/env python3
"""diffusers loads what `sd-lora convert-model` writes.

1. The two single-file fixtures (make_golden_single_file.py) converted with --config: diffusers'
   `from_pretrained` on the folder gives the same tensors and the same image as its
   `from_single_file` on the file. The SHA-256 of every written weights/config file goes to
   single_file/converted_manifest.json; tests/single_file.rs converts again and compares, so CI
   checks that the bytes diffusers accepted are still what we write.
2. A small model of standard SD widths (32 norm groups, 8 UNet heads, 64-dim text heads) saved
   as a single file WITHOUT configs: convert-model infers every config, and diffusers loads the
   folder with the same tensors and image as the source pipeline (not committed: a 6 MB
   vocabulary embedding; run here only).

    cargo build --release
    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/check_converted_model.py \
        ~/.cache/sd-lora/target/release/sd-lora
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden_pipeline as mgp  # noqa: E402
import make_golden_single_file as mgs  # noqa: E402

DATA = mgs.DATA
OUT = mgs.OUT
torch.set_num_threads(2)
NOT_SAFE = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def run(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print(r.stdout.strip())


def same(a, b, what):
    for part in ("unet", "vae", "text_encoder"):
        mgs.check_same(getattr(a, part), getattr(b, part), f"{what} {part}")


def kw(latents):
    return dict(prompt=mgp.PROMPTS[4], negative_prompt="blurry, low quality", num_inference_steps=6,
                guidance_scale=5.0, height=32, width=32, num_images_per_prompt=2, latents=latents.clone(),
                output_type="np")


def main(binary):
    tmp = tempfile.mkdtemp()
    mgp.write_tokenizer(os.path.join(tmp, "tokenizer"))
    lat = load_file(os.path.join(DATA, "tiny_pipeline", "reference.safetensors"))["pipe.latents"]
    manifest = {}
    cfg1 = os.path.join(tmp, "cfg1")
    shutil.copytree(os.path.join(DATA, "tiny_pipeline"), cfg1)
    shutil.copytree(os.path.join(tmp, "tokenizer"), os.path.join(cfg1, "tokenizer"))
    cfg2 = os.path.join(tmp, "cfg2")
    shutil.copytree(os.path.join(OUT, "sd2_config"), cfg2)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tmp, "tokenizer", f), os.path.join(cfg2, "tokenizer", f))
    for name, cfg in (("sd1", cfg1), ("sd2", cfg2)):
        out = os.path.join(tmp, f"{name}_out")
        run(binary, "convert-model", os.path.join(OUT, f"{name}.safetensors"), "--config", cfg, "--out", out)
        ours = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, **NOT_SAFE)
        ours.set_progress_bar_config(disable=True)
        tok = CLIPTokenizer.from_pretrained(os.path.join(cfg, "tokenizer"))
        sf = StableDiffusionPipeline.from_single_file(os.path.join(OUT, f"{name}.safetensors"), config=cfg,
                                                      tokenizer=tok, torch_dtype=torch.float32,
                                                      local_files_only=True, **NOT_SAFE)
        same(ours, sf, f"{name} converted")
        assert ours.tokenizer("a cat", padding="max_length").input_ids == \
            tok("a cat", padding="max_length", max_length=77).input_ids, f"{name}: tokenizer differs"
        with torch.no_grad():
            img = torch.from_numpy(ours(**kw(lat)).images)
        ref = load_file(os.path.join(OUT, f"{name}_reference.safetensors"))["image"]
        err = (img - ref).abs().max().item()
        assert err < 1e-5, f"{name}: image differs by {err}"
        files = {}
        for d, _, fs in os.walk(out):
            for f in fs:
                rel = os.path.relpath(os.path.join(d, f), out)
                if not rel.startswith("tokenizer"):
                    with open(os.path.join(d, f), "rb") as fh:
                        files[rel] = hashlib.sha256(fh.read()).hexdigest()
        manifest[name] = dict(sorted(files.items()))
        print(f"{name}: diffusers from_pretrained on our folder = from_single_file on the file (image {err:.1e})")
    with open(os.path.join(OUT, "converted_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)

    # standard widths, configs inferred
    tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"), model_max_length=77)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    mgp.randomize(te, 31)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32).eval()
    mgp.randomize(vae, 32)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8).eval()
    mgp.randomize(unet, 33)
    sched = DDIMScheduler.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                           set_alpha_to_one=False, prediction_type="epsilon"))
    src = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, **NOT_SAFE)
    src.set_progress_bar_config(disable=True)
    path = os.path.join(tmp, "standard.safetensors")
    save_file({k: v.contiguous() for k, v in mgs.ldm_of(src, False).items()}, path)
    out = os.path.join(tmp, "standard_out")
    run(binary, "convert-model", path, "--out", out)
    ours = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, **NOT_SAFE)
    ours.set_progress_bar_config(disable=True)
    same(ours, src, "standard widths, inferred")
    for part in ("unet", "vae"):
        a, b = getattr(ours, part).config, getattr(src, part).config
        diff = {k: (a[k], b[k]) for k in b if not k.startswith("_") and k in a and a[k] != b[k]}
        print(f"inferred {part} config differs from the source's in: {diff or 'nothing'}")
    with torch.no_grad():
        a = torch.from_numpy(ours(**kw(lat)).images)
        b = torch.from_numpy(src(**kw(lat)).images)
    err = (a - b).abs().max().item()
    assert err < 1e-5, f"inferred configs: image differs by {err}"
    print(f"standard widths: diffusers loads our inferred-config folder; image equal to the source ({err:.1e})")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/sd-lora/target/release/sd-lora"))
