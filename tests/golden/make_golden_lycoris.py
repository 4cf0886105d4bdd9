#!/usr/bin/env python3
"""LoRA files from the wild, written by the real writers, and what the references compute with
them (issue 18).

1. On the tiny SD-architecture UNet `unet_a` (from make_golden.py): one file per LyCORIS kind,
   created by `lycoris-lora`'s own kohya entry point (`lycoris.kohya.create_network`, preset
   `full`: attention, feed-forward, resnets with their 3x3/1x1 convolutions and time_emb_proj,
   down/upsamplers, conv_in/conv_out, time embedding), random non-zero adapters, saved with its
   `save_weights`; the reference output is the UNet with the network applied (LyCORIS' forward).
2. A diffusers `save_lora_weights` file with lora_alpha != rank (and the same tensors renamed to
   diffusers' older `lora.down` keys), reference = diffusers' own `load_lora_weights`.
3. On the tiny pipeline (from make_golden_pipeline.py): a kohya LoRA with text-encoder and UNet
   parts written by LyCORIS, the reference image from diffusers' `load_lora_weights` of that
   file (LyCORIS' own forward is printed beside it as a cross-check).

    ~/.cache/sd-lora/golden-venv/bin/pip install torch diffusers transformers peft safetensors lycoris-lora
    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/make_golden_lycoris.py

Measured with torch 2.15.0, diffusers 0.42.1, peft 0.21.2, lycoris-lora 4.1.3. Writes
tests/golden/data/lycoris/ (< 3 MB). Tests never run this script.
"""
import json
import os

import sys

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from lycoris.kohya import create_network
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.join(HERE, "data")
OUT = os.path.join(DATA, "lycoris")
torch.set_num_threads(2)

# name -> (create_network kwargs, save dtype)
CASES = {
    "locon": (dict(algo="lora", network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1.5), torch.float32),
    "locon_tucker": (dict(algo="lora", network_dim=4, network_alpha=8, conv_dim=3, conv_alpha=3, use_tucker=True), torch.float32),
    "loha": (dict(algo="loha", network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), torch.float32),
    "loha_tucker": (dict(algo="loha", network_dim=3, network_alpha=3, conv_dim=2, conv_alpha=2, use_tucker=True), torch.float32),
    "lokr": (dict(algo="lokr", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, factor=4), torch.float32),
    "lokr_full": (dict(algo="lokr", network_dim=100000, network_alpha=3, conv_dim=100000, conv_alpha=3, factor=4, full_matrix=True), torch.float32),
    "lokr_tucker": (dict(algo="lokr", network_dim=2, network_alpha=1, conv_dim=2, conv_alpha=1, factor=2, use_tucker=True), torch.float32),
    "dora_out": (dict(algo="lora", network_dim=4, network_alpha=4, conv_dim=2, conv_alpha=2, dora_wd=True, wd_on_output=True), torch.float32),
    "dora_in": (dict(algo="lora", network_dim=4, network_alpha=4, conv_dim=2, conv_alpha=2, dora_wd=True, wd_on_output=False), torch.float32),
    "full": (dict(algo="full", network_dim=4, network_alpha=4), torch.float32),
    "locon_f16": (dict(algo="lora", network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1.5), torch.float16),
    "loha_bf16": (dict(algo="loha", network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), torch.bfloat16),
}


def randomize_network(net, seed, dtype):
    """Non-zero adapters; values rounded to the save dtype so the reference uses the stored ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("dora_scale"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "diff" in n or n.endswith(".weight") and ".lora_" not in n and "hada" not in n and "lokr" not in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            p.copy_(p.to(dtype).float())


PRESET = os.path.join(OUT, "preset.toml")


def write_preset():
    """LyCORIS' `full` preset limited to SD's modules (its name patterns are regexes)."""
    with open(PRESET, "w") as f:
        f.write('enable_conv = true\n'
                'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
                'unet_target_name = ["^conv_in$", "^conv_out$", "^time_embedding\\\\.linear_1$", "^time_embedding\\\\.linear_2$"]\n'
                'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\n'
                'text_encoder_target_name = []\n')


def unet_cases():
    args = unet_a_inputs()
    manifest = {}
    for i, (name, (kw, dtype)) in enumerate(CASES.items()):
        unet = UNet2DConditionModel.from_pretrained(UNET_A).eval()
        kw = dict(kw)
        dim, alpha = kw.pop("network_dim"), kw.pop("network_alpha")
        net = create_network(1.0, dim, alpha, None, None, unet, preset=PRESET, warn_on_unmatched=False, **kw)
        net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        randomize_network(net, 100 + i, dtype)
        path = os.path.join(OUT, f"{name}.safetensors")
        net.save_weights(path, dtype, {"ss_network_module": f"lycoris.kohya ({name})"})
        with torch.no_grad():
            y = unet(*args).sample
            net.set_multiplier(0.0) if hasattr(net, "set_multiplier") else None
        save_file({"sample": y.contiguous()}, os.path.join(OUT, f"{name}_out.safetensors"))
        keys = list(load_file(path).keys())
        kinds = sorted({k.rsplit(".", 1)[-1] if "lora_" not in k else k.split(".", 1)[1] for k in keys})
        manifest[name] = dict(tensors=len(keys), parts=kinds, out_abs_mean=y.abs().mean().item())
        print(f"{name}: {len(keys)} tensors, |y| {y.abs().mean():.4f}, parts {kinds}")
    return manifest


UNET_A = os.path.join(DATA, "unet_a", "unet")


def unet_a_inputs():
    inputs = load_file(os.path.join(DATA, "unet_a", "inputs_square_b2.safetensors"))
    return inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]


def diffusers_case(name, seed, config, tweak=None):
    """A PEFT adapter on unet_a saved by diffusers' `save_lora_weights`; the reference output is
    diffusers loading that file (with its `lora_adapter_metadata`) into a fresh UNet."""
    args = unet_a_inputs()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(UNET_A).eval()
    unet.add_adapter(config)
    if tweak:
        tweak(unet)
    path = os.path.join(OUT, f"{name}.safetensors")
    StableDiffusionLoraLoaderMixin.save_lora_weights(OUT, unet_lora_layers=get_peft_model_state_dict(unet),
                                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                                                     weight_name=f"{name}.safetensors")
    fresh = UNet2DConditionModel.from_pretrained(UNET_A).eval()
    got = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    fresh.load_lora_adapter(got[0], prefix="unet", metadata=got[-1])
    with torch.no_grad():
        y = fresh(*args).sample
        y_own = unet(*args).sample
    save_file({"sample": y.contiguous()}, os.path.join(OUT, f"{name}_out.safetensors"))
    print(f"{name}: |y| {y.abs().mean():.4f}, vs the training model {(y - y_own).abs().max():.2e}")
    return path


def diffusers_alpha_case():
    """lora_alpha 8 at rank 4 (diffusers scales by 2), and the same tensors under diffusers'
    older `lora.down` keys with the same metadata."""
    path = diffusers_case("diffusers_alpha8", 7, LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        init_lora_weights=False))
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        old = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): f.get_tensor(k)
               for k in f.keys()}
    save_file(old, os.path.join(OUT, "diffusers_alpha8_old_keys.safetensors"), metadata=meta)


def peft_dora_case():
    """PEFT DoRA (use_dora, `lora_magnitude_vector`), magnitudes moved off their init."""
    def tweak(unet):
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.randn(p.shape))
    path = diffusers_case("peft_dora", 8, LoraConfig(
        r=4, lora_alpha=6, use_dora=True, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]), tweak)
    keys = [k for k in load_file(path) if "magnitude" in k]
    print(f"PEFT DoRA: {len(keys)} magnitude vectors ({keys[0]})")


def pipeline_case():
    """A kohya LoRA with text-encoder and UNet parts (LyCORIS' writer); reference: diffusers."""
    import shutil, tempfile
    from transformers import CLIPTokenizer
    import make_golden_pipeline as mgp
    root = os.path.join(DATA, "tiny_pipeline")
    tmp = tempfile.mkdtemp()
    mgp.write_tokenizer(os.path.join(tmp, "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"), model_max_length=77)
    ref = load_file(os.path.join(root, "reference.safetensors"))

    def load():
        return StableDiffusionPipeline.from_pretrained(root, variant="fp16", torch_dtype=torch.float32, tokenizer=tok,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    pipe = load()
    kw = dict(prompt=mgp.PROMPTS[4], negative_prompt="blurry, low quality", num_inference_steps=6, guidance_scale=5.0,
              height=32, width=32, num_images_per_prompt=2, latents=ref["pipe.latents"].clone(), output_type="np")
    net = create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, preset=PRESET, warn_on_unmatched=False,
                         algo="lora", conv_dim=0)
    net.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    randomize_network(net, 999, torch.float16)
    path = os.path.join(OUT, "te_unet_kohya.safetensors")
    net.save_weights(path, torch.float16, {"ss_network_module": "lycoris.kohya"})
    with torch.no_grad():
        lyco = torch.from_numpy(pipe(**kw).images)
    fresh = load()
    fresh.load_lora_weights(path)
    with torch.no_grad():
        img = torch.from_numpy(fresh(**kw).images)
    base = ref["pipe.image"]
    keys = load_file(path).keys()
    print(f"te+unet kohya: {sum(k.startswith('lora_te') for k in keys)} TE tensors, "
          f"{sum(k.startswith('lora_unet') for k in keys)} UNet tensors; diffusers vs LyCORIS forward "
          f"max {(img - lyco).abs().max():.2e}; LoRA effect mean {(img - base).abs().mean():.4f}")
    save_file({"image": img.contiguous()}, os.path.join(OUT, "te_unet_kohya_image.safetensors"))
    shutil.rmtree(tmp)


def main():
    os.makedirs(OUT, exist_ok=True)
    write_preset()
    manifest = {"unet": unet_cases()}
    diffusers_alpha_case()
    peft_dora_case()
    pipeline_case()
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
