#!/usr/bin/env python3
"""The workload of benches/unet.rs in diffusers + PEFT (CPU, fp32, 2 threads, same shapes).

    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/unet_diffusers.py [tiny|sd15]
"""
import time, torch, sys
from diffusers import UNet2DConditionModel
from peft import LoraConfig
torch.set_num_threads(2)
torch.manual_seed(0)
cases = {
 "tiny b4 32x32": (dict(sample_size=16, block_out_channels=(32,64,64), down_block_types=("CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"), up_block_types=("UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4, use_linear_projection=True), 4, 64, 5),
 "sd15 b1 32x32": (dict(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320,640,1280,1280)), 1, 768, 3),
}
for name,(cfg,b,ctx,iters) in cases.items():
    if len(sys.argv)>1 and sys.argv[1] not in name: continue
    u = UNet2DConditionModel(**cfg)
    u.requires_grad_(False)
    u.add_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=["to_q","to_k","to_v"], init_lora_weights="gaussian"))
    x = torch.randn(b,4,32,32); t = torch.full((b,),500.); e = torch.randn(b,77,ctx); n = torch.randn_like(x)
    def fwd():
        with torch.no_grad(): u(x,t,e)
    def step():
        loss = torch.nn.functional.mse_loss(u(x,t,e).sample, n); loss.backward()
    res=[]
    for f in (fwd, step):
        f(); ts=[]
        for _ in range(iters):
            s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
        ts.sort(); res.append(f"{ts[len(ts)//2]:.3f} ({ts[0]:.3f}-{ts[-1]:.3f})")
    print(f"| {name} | diffusers+PEFT | {res[0]} | {res[1]} |", flush=True)
