#!/usr/bin/env python3
"""Builds the golden fixtures the Rust parity tests compare against.

Tiny random-init diffusers UNets, run on seeded inputs with and without a PEFT LoRA, plus the
LoRA in the three file formats sd-lora reads. CPU only, deterministic.

    python3 -m venv ~/.cache/sd-lora/golden-venv
    ~/.cache/sd-lora/golden-venv/bin/pip install torch diffusers transformers peft safetensors
    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/make_golden.py

Measured with torch 2.15.0, diffusers 0.42.1, peft 0.21.2. Writes tests/golden/data/ (< 3 MB).
Tests never run this script; they read the committed files.
"""
import json
import os
import shutil

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
torch.manual_seed(0)
torch.set_num_threads(2)

ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]

MODELS = {
    # SD 1.x style: conv proj_in/out, attention_head_dim = number of heads (int), 3 levels.
    "unet_a": dict(
        config=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=24,
            attention_head_dim=2,
            use_linear_projection=False,
        ),
        layout="pipeline",  # unet/ inside a pipeline root
        variant=None,
        lora=dict(r=4, lora_alpha=6, target_modules=ALL_TARGETS,
                  rank_pattern={"attn2.to_k": 2}, alpha_pattern={"ff.net.2": 3.0}),
        inputs=[
            dict(name="square_b2", shape=(2, 4, 8, 8), timestep=torch.tensor([999, 17], dtype=torch.int64), tokens=5),
            dict(name="odd_b1", shape=(1, 4, 5, 7), timestep=torch.tensor([321.5], dtype=torch.float32), tokens=3),
        ],
    ),
    # SD 2.x style: linear projections, per-block heads and layers, two transformer layers,
    # stored as the fp16 variant.
    "unet_b": dict(
        config=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=(1, 2),
            transformer_layers_per_block=(2, 1),
            norm_num_groups=8,
            cross_attention_dim=20,
            attention_head_dim=(4, 2),
            use_linear_projection=True,
            flip_sin_to_cos=False,
            freq_shift=1,
        ),
        layout="unet",  # the unet folder itself
        variant="fp16",
        lora=dict(r=3, lora_alpha=5, target_modules=["to_q", "to_k", "to_v"]),
        inputs=[
            dict(name="wide_b2", shape=(2, 4, 6, 10), timestep=torch.tensor([500.0, 3.0]), tokens=4),
        ],
    ),
}


def randomize(model):
    """Fan-in scaled normal weights, perturbed norms, non-zero biases: no zero-init layers."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def kohya_state_dict(unet, cfg):
    """PEFT -> kohya with each module's real alpha (diffusers' converter writes alpha = rank)."""
    sd = {}
    rank_of = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().clone()
            b = module.lora_B["default"].weight.detach().clone()
            alpha = module.lora_alpha["default"]
            key = "lora_unet_" + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = a
            sd[key + ".lora_up.weight"] = b
            sd[key + ".alpha"] = torch.tensor(float(alpha))
            rank_of[name] = (a.shape[0], alpha)
    return sd, rank_of


def old_diffusers_state_dict(unet):
    """`unet.<module>.lora.down.weight` with B pre-scaled by alpha/r (that format has no alpha)."""
    sd = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().clone()
            b = module.lora_B["default"].weight.detach().clone() * module.scaling["default"]
            sd[f"unet.{name}.lora.down.weight"] = a
            sd[f"unet.{name}.lora.up.weight"] = b
    return sd


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    manifest = {}
    for mname, spec in MODELS.items():
        unet = UNet2DConditionModel(**spec["config"]).eval()
        randomize(unet)
        root = os.path.join(OUT, mname)
        unet_dir = os.path.join(root, "unet") if spec["layout"] == "pipeline" else root
        if spec["variant"] == "fp16":
            # Round weights to fp16 first: the reference runs in f32 on exactly the stored values.
            with torch.no_grad():
                for p in unet.parameters():
                    p.copy_(p.half().float())
            unet.half().save_pretrained(unet_dir, variant="fp16", safe_serialization=True)
            unet.float()
        else:
            unet.save_pretrained(unet_dir, safe_serialization=True)
        n_params = sum(p.numel() for p in unet.parameters())

        inputs = []
        for inp in spec["inputs"]:
            g = torch.Generator().manual_seed(len(inputs) + 7)
            sample = torch.randn(inp["shape"], generator=g)
            ehs = torch.randn((inp["shape"][0], inp["tokens"], spec["config"]["cross_attention_dim"]), generator=g)
            target = torch.randn(inp["shape"], generator=g)
            inputs.append((inp, sample, ehs, target))
            with torch.no_grad():
                base = unet(sample, inp["timestep"], ehs).sample
            save_file(
                {"sample": sample, "timestep": inp["timestep"], "encoder_hidden_states": ehs, "target": target},
                os.path.join(root, f"inputs_{inp['name']}.safetensors"),
            )
            save_file({"sample": base.contiguous()}, os.path.join(root, f"base_{inp['name']}.safetensors"))

        lcfg = LoraConfig(init_lora_weights=False, **spec["lora"])
        unet.add_adapter(lcfg)
        # make B clearly non-zero and of a size comparable to the base weights
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        grads = {}
        for i, (inp, sample, ehs, target) in enumerate(inputs):
            with torch.no_grad():
                full = unet(sample, inp["timestep"], ehs).sample
                half = unet(sample, inp["timestep"], ehs, cross_attention_kwargs={"scale": 0.5}).sample
            save_file({"sample": full.contiguous()}, os.path.join(root, f"lora_{inp['name']}.safetensors"))
            save_file({"sample": half.contiguous()}, os.path.join(root, f"lora_half_{inp['name']}.safetensors"))
            if i == 0:
                # gradients of an MSE loss w.r.t. every LoRA tensor (PEFT names, no prefix)
                unet.zero_grad()
                out = unet(sample, inp["timestep"], ehs).sample
                loss = torch.nn.functional.mse_loss(out, target)
                loss.backward()
                for name, p in unet.named_parameters():
                    if "lora_" in name:
                        key = name.replace(".default", "")
                        grads[key] = p.grad.detach().clone().reshape(p.shape[0], -1)
                grads["loss"] = loss.detach().reshape(1)
        save_file(grads, os.path.join(root, "lora_grads.safetensors"))

        peft_sd = get_peft_model_state_dict(unet)
        meta = unet.peft_config["default"].to_dict()
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            root, unet_lora_layers=peft_sd, unet_lora_adapter_metadata=meta,
            weight_name="lora_peft.safetensors", safe_serialization=True,
        )
        kohya_sd, _ = kohya_state_dict(unet, lcfg)
        save_file({k: v.contiguous() for k, v in kohya_sd.items()}, os.path.join(root, "lora_kohya.safetensors"))
        save_file(old_diffusers_state_dict(unet), os.path.join(root, "lora_old.safetensors"))

        # Check diffusers itself reads our kohya file to the same outputs (validates the alphas).
        fresh = UNet2DConditionModel.from_pretrained(unet_dir, variant=spec["variant"]).float().eval()
        sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(os.path.join(root, "lora_kohya.safetensors"))
        fresh.load_lora_adapter(sd, network_alphas=alphas, prefix="unet")
        inp, sample, ehs, _ = inputs[0]
        with torch.no_grad():
            ref = unet(sample, inp["timestep"], ehs).sample
            got = fresh(sample, inp["timestep"], ehs).sample
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-5, f"{mname}: diffusers reads our kohya file with rel err {err}"

        with torch.no_grad():
            base = unet(sample, inp["timestep"], ehs, cross_attention_kwargs={"scale": 0.0}).sample
        lora_effect = (ref - base).abs().max().item() / base.abs().max().item()
        manifest[mname] = dict(params=n_params, lora_effect=lora_effect, kohya_roundtrip_err=err,
                               inputs=[i[0]["name"] for i in inputs])
        print(mname, manifest[mname])

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
