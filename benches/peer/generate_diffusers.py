#!/usr/bin/env python3
"""The workload of benches/generate.rs in diffusers: CFG 7.5, DDIM, 20 steps, one image, random
weights, CPU f32, 2 threads. Needs the CLIP BPE list (scripts/fetch-clip-bpe.sh).

    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/generate_diffusers.py [tiny|sd15]
"""
import os
import sys
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "golden"))
from make_golden_pipeline import write_tokenizer  # noqa: E402

torch.set_num_threads(2)
tmp = tempfile.mkdtemp()
write_tokenizer(os.path.join(tmp, "tok"))
tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tok"), model_max_length=77)
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
TINY_UNET = dict(sample_size=16, block_out_channels=(32, 64, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4, use_linear_projection=True)
SD15_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2)
TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
TINY_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
CASES = {"tiny 64px": (TINY_UNET, TINY_VAE, TINY_TEXT, 64, 3), "sd15 256px": (SD15_UNET, SD15_VAE, SD15_TEXT, 256, 1)}

for name, (u, v, t, px, runs) in CASES.items():
    if len(sys.argv) > 1 and sys.argv[1] not in name:
        continue
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **t))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**v), text_encoder=te, tokenizer=tok, unet=UNet2DConditionModel(**u),
                                   scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                           steps_offset=1, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a cat", num_inference_steps=20, guidance_scale=7.5, height=px, width=px)
    with torch.no_grad():
        pipe(**dict(kw, num_inference_steps=1))
        ts = []
        for _ in range(runs):
            s = time.perf_counter()
            pipe(**kw)
            ts.append(time.perf_counter() - s)
    ts.sort()
    print(f"| {name} | diffusers | {ts[len(ts) // 2]:.2f} ({ts[0]:.2f}-{ts[-1]:.2f}) |", flush=True)
