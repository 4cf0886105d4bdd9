#!/usr/bin/env python3
"""`sd-lora bench train` in diffusers + PEFT: one LoRA training step (forward, MSE, backward,
AdamW lr 1e-4 wd 1e-2) on a random-weight UNet, LoRA r16/alpha 32 on to_q,to_k,to_v, 77 text
tokens, CPU fp32, 2 threads. Prints the same JSON line as `sd-lora bench train --json`.

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
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
u = UNet2DConditionModel(**CONFIGS[a.model])
u.requires_grad_(False)
u.add_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"))
params = [q for q in u.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
ctx = u.config.cross_attention_dim
x = torch.randn(a.batch, 4, a.latent, a.latent)
e = torch.randn(a.batch, 77, ctx)
n = torch.randn_like(x)
t = torch.randint(0, 1000, (a.batch,))


def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(u(x, t, e).sample, n)
    loss.backward()
    opt.step()


step()  # warm-up
ts = []
for _ in range(a.steps):
    s = time.perf_counter()
    step()
    ts.append(time.perf_counter() - s)
ts.sort()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FLOP count
# matmul/conv/attention FLOPs of one step (forward + backward), after the timing
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
with FlopCounterMode(display=False) as fc:
    step()
print(json.dumps(dict(
    kind="train", model=a.model, latent=a.latent, batch=a.batch, steps=a.steps, median_s=ts[len(ts) // 2],
    min_s=ts[0], max_s=ts[-1], peak_rss_mib=rss,
    trainable_params=sum(q.numel() for q in params), total_params=sum(q.numel() for q in u.parameters()),
    threads=torch.get_num_threads(), flops=fc.get_total_flops(), implementation="diffusers+peft")))
