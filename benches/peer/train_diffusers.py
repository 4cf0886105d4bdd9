#!/usr/bin/env python3
"""`sd-lora bench train` in diffusers + PEFT: one LoRA training step (forward, MSE, backward,
AdamW lr 1e-4 wd 1e-2) on a random-weight UNet, LoRA r16/alpha 32 on to_q,to_k,to_v, 77 text
tokens; CPU fp32 with 2 threads by default, or `--device cuda` with `--dtype bf16|fp16|fp32`
(frozen weights in that dtype, LoRA in fp32, autocast as diffusers' training scripts do, a
GradScaler for fp16) and `--gradient-checkpointing`. Prints the same JSON line as
`sd-lora bench train --json` (on CUDA `gpu_mem_mib` = memory in use after the run, as ours,
and `gpu_peak_allocated_mib`).

    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/train_diffusers.py --model tiny --batch 4
"""
import argparse
import json
import resource
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

CONFIGS = {
    "tiny": dict(sample_size=16, block_out_channels=(32, 64, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4, use_linear_projection=True),
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)),
}

p = argparse.ArgumentParser()
p.add_argument("--model", default="tiny", choices=CONFIGS)
p.add_argument("--latent", type=int, default=32)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
p.add_argument("--gradient-checkpointing", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
wdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
u = UNet2DConditionModel(**CONFIGS[a.model])
u.requires_grad_(False)
u.add_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"))
u.to(dev, dtype=wdt)
if a.gradient_checkpointing:
    u.enable_gradient_checkpointing()
params = [q for q in u.parameters() if q.requires_grad]
for q in params:  # diffusers' cast_training_params: LoRA in fp32
    q.data = q.data.float()
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
scaler = torch.amp.GradScaler("cuda") if a.dtype == "fp16" else None
ctx = u.config.cross_attention_dim
x = torch.randn(a.batch, 4, a.latent, a.latent, device=dev, dtype=wdt)
e = torch.randn(a.batch, 77, ctx, device=dev, dtype=wdt)
n = torch.randn(a.batch, 4, a.latent, a.latent, device=dev)
t = torch.randint(0, 1000, (a.batch,), device=dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=wdt, enabled=a.dtype != "fp32"):
        pred = u(x, t, e).sample
    loss = torch.nn.functional.mse_loss(pred.float(), n)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    sync()


step()  # warm-up
ts = []
for _ in range(a.steps):
    s = time.perf_counter()
    step()
    ts.append(time.perf_counter() - s)
ts.sort()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FLOP count
gpu = {}
if dev.type == "cuda":
    free, total = torch.cuda.mem_get_info()
    gpu = dict(gpu_mem_mib=(total - free) / 2**20,
               gpu_peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20, device="cuda", dtype=a.dtype)
# matmul/conv/attention FLOPs of one step (forward + backward), after the timing
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
with FlopCounterMode(display=False) as fc:
    step()
print(json.dumps(dict(
    kind="train", model=a.model, latent=a.latent, batch=a.batch, steps=a.steps, median_s=ts[len(ts) // 2],
    min_s=ts[0], max_s=ts[-1], peak_rss_mib=rss,
    trainable_params=sum(q.numel() for q in params), total_params=sum(q.numel() for q in u.parameters()),
    threads=torch.get_num_threads(), flops=fc.get_total_flops(), implementation="diffusers+peft",
    gradient_checkpointing=a.gradient_checkpointing, **gpu)))
