#!/usr/bin/env python3
"""Scheduler fixtures: timesteps, add_noise, velocity and step-by-step trajectories of diffusers'
DDPM, DDIM and Euler-ancestral schedulers (random parts fed from recorded noise).

    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/make_golden_schedulers.py

Writes tests/golden/data/schedulers/ (a few KB). Same venv and versions as make_golden.py.
"""
import json
import os

import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "schedulers")
os.makedirs(OUT, exist_ok=True)
g = torch.Generator().manual_seed(0)

# SD 1.5's scheduler_config.json (PNDM there; the same betas feed every scheduler)
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")
CONFIGS = {
    "sd15_eps": SD15,
    "v_trailing": dict(SD15, prediction_type="v_prediction", timestep_spacing="trailing"),
    "linear_linspace": dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="linspace",
                            steps_offset=0),
}
KINDS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler}

tensors = {}
meta = {"configs": CONFIGS, "cases": []}
x0 = torch.randn((3, 4, 2, 3), generator=g)
noise = torch.randn((3, 4, 2, 3), generator=g)
t = torch.tensor([0, 499, 999])
tensors["x0"] = x0
tensors["noise"] = noise
tensors["t"] = t
for cname, cfg in CONFIGS.items():
    ddpm = DDPMScheduler.from_config(cfg)
    tensors[f"{cname}.alphas_cumprod"] = ddpm.alphas_cumprod.clone()
    tensors[f"{cname}.add_noise"] = ddpm.add_noise(x0, noise, t)
    tensors[f"{cname}.velocity"] = ddpm.get_velocity(x0, noise, t)
    for kind, cls in KINDS.items():
        for steps in (7, 20):
            s = cls.from_config(cfg)
            s.set_timesteps(steps)
            key = f"{cname}.{kind}.{steps}"
            tensors[key + ".timesteps"] = s.timesteps.clone().float()
            sample = torch.randn((1, 4, 2, 2), generator=g) * s.init_noise_sigma
            tensors[key + ".init"] = sample.clone()
            tensors[key + ".init_noise_sigma"] = torch.tensor([float(s.init_noise_sigma)])
            outs, noises, prevs, scaled = [], [], [], []
            for ts in s.timesteps:
                model_in = s.scale_model_input(sample, ts)
                model_out = torch.randn(sample.shape, generator=g)
                step_noise = torch.randn(sample.shape, generator=g)
                scaled.append(model_in)
                outs.append(model_out)
                noises.append(step_noise)
                if kind == "ddim":
                    sample = s.step(model_out, ts, sample).prev_sample
                else:
                    # feed the recorded noise through a generator-free path: monkeypatch randn_tensor
                    import diffusers.schedulers.scheduling_ddpm as m1
                    import diffusers.schedulers.scheduling_euler_ancestral_discrete as m2
                    fixed = step_noise.clone()
                    orig1, orig2 = m1.randn_tensor, m2.randn_tensor
                    m1.randn_tensor = m2.randn_tensor = lambda *a, **k: fixed
                    sample = s.step(model_out, ts, sample).prev_sample
                    m1.randn_tensor, m2.randn_tensor = orig1, orig2
                prevs.append(sample.clone())
            tensors[key + ".model_in"] = torch.stack(scaled)
            tensors[key + ".model_out"] = torch.stack(outs)
            tensors[key + ".step_noise"] = torch.stack(noises)
            tensors[key + ".prev"] = torch.stack(prevs)
            meta["cases"].append(key)

save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
          os.path.join(OUT, "schedulers.safetensors"))
with open(os.path.join(OUT, "schedulers.json"), "w") as f:
    json.dump(meta, f, indent=1)
print("cases:", len(meta["cases"]))
