#!/usr/bin/env python3
"""`sd-lora bench generate` in diffusers: CFG 7.5, DDIM, 20 steps, `--batch` images per prompt,
random weights, CPU f32, 2 threads (or `--device cuda --dtype bf16|fp16|fp32`), text encoding
and VAE decoding included. Prints the same
JSON line as `sd-lora bench generate --json`. Needs the CLIP BPE list (scripts/fetch-clip-bpe.sh).

    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/generate_diffusers.py --model tiny --latent 16
"""
import argparse
import json
import resource
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
CONFIGS = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT)}

p = argparse.ArgumentParser()
p.add_argument("--model", default="tiny", choices=CONFIGS)
p.add_argument("--latent", type=int, default=16)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--steps", type=int, default=3, help="timed runs after a 1-step warm-up")
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
a = p.parse_args()
dev = torch.device(a.device)
wdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
u, v, t = CONFIGS[a.model]
torch.manual_seed(0)
te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **t))
vae = AutoencoderKL(**v)
px = a.latent * 2 ** (len(vae.config.block_out_channels) - 1)
unet = UNet2DConditionModel(**u)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                               scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                       steps_offset=1, clip_sample=False, set_alpha_to_one=False),
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
pipe.to(dev, wdt)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()

kw = dict(prompt="a photo of a cat", num_inference_steps=20, guidance_scale=7.5, height=px, width=px,
          num_images_per_prompt=a.batch)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
with torch.no_grad():
    pipe(**dict(kw, num_inference_steps=1))
    ts = []
    for _ in range(a.steps):
        s = time.perf_counter()
        pipe(**kw)
        sync()
        ts.append(time.perf_counter() - s)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FLOP count
    gpu = {}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        gpu = dict(gpu_mem_mib=(total - free) / 2**20, device="cuda", dtype=a.dtype,
                   gpu_peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20)
    with FlopCounterMode(display=False) as fc:  # matmul/conv/attention FLOPs, after the timing
        pipe(**kw)
ts.sort()
print(json.dumps(dict(
    kind="generate", model=a.model, latent=a.latent, batch=a.batch, steps=a.steps, median_s=ts[len(ts) // 2],
    min_s=ts[0], max_s=ts[-1], peak_rss_mib=rss,
    total_params=sum(q.numel() for m in (unet, vae, te) for q in m.parameters()),
    threads=torch.get_num_threads(), flops=fc.get_total_flops(), implementation="diffusers", **gpu)))
