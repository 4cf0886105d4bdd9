#!/usr/bin/env python3
"""diffusers loads sd-lora's own LoRA files (kohya and PEFT formats, written by
`cargo run --release --example make_ours_lora`) with no missing or unexpected keys; its UNet
output with them is recorded for tests/lora.rs to compare against. Our DoRA files: the kohya one
through LyCORIS' own loader (`lycoris.kohya.create_network_from_weights`), the PEFT one through
diffusers (`use_dora`), both outputs recorded.

    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/make_golden_ours.py
"""
import os

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors.torch import load_file, save_file

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
torch.set_num_threads(2)
inp = load_file(os.path.join(DATA, "unet_a", "inputs_square_b2.safetensors"))
out = {}
for fmt in ("kohya", "peft"):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(DATA, "unet_a", "unet")).eval()
    path = os.path.join(DATA, "ours", f"lora_{fmt}.safetensors")
    sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=False) \
        if fmt == "kohya" else (None, None)
    if fmt == "kohya":
        unet.load_lora_adapter(sd, network_alphas=alphas, prefix="unet")
        n_file = len([k for k in load_file(path) if k.endswith("lora_down.weight")])
    else:
        res = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
        sd, meta = res[0], res[-1]  # (state_dict, network_alphas, metadata)
        assert meta is not None, "our lora_adapter_metadata was not picked up"
        unet.load_lora_adapter(sd, prefix="unet", metadata=meta)
        n_file = len([k for k in load_file(path) if k.endswith("lora_A.weight")])
    n_loaded = len([n for n, _ in unet.named_parameters() if "lora_A" in n])
    assert n_loaded == n_file, f"{fmt}: {n_loaded} LoRA layers loaded, {n_file} in the file"
    with torch.no_grad():
        out[f"{fmt}"] = unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"]).sample.contiguous()
err = (out["kohya"] - out["peft"]).abs().max().item()
assert err < 1e-5, f"the two formats disagree in diffusers: {err}"
save_file(out, os.path.join(DATA, "ours", "diffusers_output.safetensors"))
print("diffusers loaded both files; formats agree to", err)

# DoRA, kohya layout -> LyCORIS
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights  # noqa: E402
from lycoris.utils.preset import read_preset  # noqa: E402

# LyCORIS' `full` preset names time_embedding twice on diffusers' UNet; ours lists SD's modules
LycorisNetworkKohya.apply_preset(read_preset(os.path.join(DATA, "lycoris", "preset.toml")))

dora = {}
unet = UNet2DConditionModel.from_pretrained(os.path.join(DATA, "unet_a", "unet")).eval()
path = os.path.join(DATA, "ours", "dora_kohya.safetensors")
net, weights = create_network_from_weights(1.0, path, None, None, unet, for_inference=True)
net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
missing, unexpected = net.load_state_dict(weights, strict=False)
assert not unexpected, f"LyCORIS: unexpected keys {unexpected[:5]}"
assert not [k for k in missing if "scalar" not in k], f"LyCORIS: missing keys {missing[:5]}"
n_file = len([k for k in weights if k.endswith("dora_scale")])
n_loaded = len([m for m in net.unet_loras if getattr(m, "wd", False)])
assert n_loaded == n_file, f"LyCORIS: {n_loaded} DoRA modules, {n_file} in the file"
with torch.no_grad():
    dora["lycoris"] = unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"]).sample.contiguous()

# DoRA, PEFT layout -> diffusers
unet = UNet2DConditionModel.from_pretrained(os.path.join(DATA, "unet_a", "unet")).eval()
path = os.path.join(DATA, "ours", "dora_peft.safetensors")
res = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
unet.load_lora_adapter(res[0], prefix="unet", metadata=res[-1])
n_mag = len([n for n, _ in unet.named_parameters() if "lora_magnitude_vector" in n])
n_file = len([k for k in load_file(path) if k.endswith("lora_magnitude_vector")])
assert n_mag == n_file, f"diffusers: {n_mag} magnitudes loaded, {n_file} in the file"
with torch.no_grad():
    dora["diffusers"] = unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"]).sample.contiguous()
err = (dora["lycoris"] - dora["diffusers"]).abs().max().item()
save_file(dora, os.path.join(DATA, "ours", "dora_output.safetensors"))
print(f"LyCORIS loaded our kohya DoRA file, diffusers our PEFT one; they agree to {err:.2e}")

# LoCon (linear + conv adapters): kohya layout -> LyCORIS' loader, PEFT layout -> diffusers
locon = {}
unet = UNet2DConditionModel.from_pretrained(os.path.join(DATA, "unet_a", "unet")).eval()
path = os.path.join(DATA, "ours", "locon_kohya.safetensors")
net, weights = create_network_from_weights(1.0, path, None, None, unet, for_inference=True)
net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
missing, unexpected = net.load_state_dict(weights, strict=False)
assert not unexpected, f"LyCORIS: unexpected keys {unexpected[:5]}"
assert not [k for k in missing if "scalar" not in k], f"LyCORIS: missing keys {missing[:5]}"
n_file = len([k for k in weights if k.endswith("lora_down.weight")])
n_conv = len([k for k in weights if k.endswith("lora_down.weight") and weights[k].dim() == 4
              and weights[k].shape[-1] == 3])
assert len(net.unet_loras) == n_file, f"LyCORIS: {len(net.unet_loras)} modules, {n_file} in the file"
with torch.no_grad():
    locon["lycoris"] = unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"]).sample.contiguous()
unet = UNet2DConditionModel.from_pretrained(os.path.join(DATA, "unet_a", "unet")).eval()
path = os.path.join(DATA, "ours", "locon_peft.safetensors")
res = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
unet.load_lora_adapter(res[0], prefix="unet", metadata=res[-1])
n_loaded = len([n for n, _ in unet.named_parameters() if "lora_A" in n])
n_file = len([k for k in load_file(path) if k.endswith("lora_A.weight")])
assert n_loaded == n_file, f"diffusers: {n_loaded} LoRA layers loaded, {n_file} in the file"
with torch.no_grad():
    locon["diffusers"] = unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"]).sample.contiguous()
err = (locon["lycoris"] - locon["diffusers"]).abs().max().item()
save_file(locon, os.path.join(DATA, "ours", "locon_output.safetensors"))
print(f"LoCon: LyCORIS loaded our kohya file ({n_file} modules, {n_conv} 3x3 conv), diffusers our PEFT "
      f"one; they agree to {err:.2e}")

# text encoder + UNet: diffusers' pipeline `load_lora_weights`, both layouts, the same images
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from diffusers import StableDiffusionPipeline  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden_pipeline as mgp  # noqa: E402

root = os.path.join(DATA, "tiny_pipeline")
tmp = tempfile.mkdtemp()
mgp.write_tokenizer(os.path.join(tmp, "tokenizer"))
tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"), model_max_length=77)
ref = load_file(os.path.join(root, "reference.safetensors"))
kw = dict(prompt=mgp.PROMPTS[4], negative_prompt="blurry, low quality", num_inference_steps=6, guidance_scale=5.0,
          height=32, width=32, num_images_per_prompt=2, latents=ref["pipe.latents"].clone(), output_type="np")
images = {}
for fmt, first in (("kohya", "lora_down.weight"), ("peft", "lora_A.weight")):
    pipe = StableDiffusionPipeline.from_pretrained(root, variant="fp16", torch_dtype=torch.float32, tokenizer=tok,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    path = os.path.join(DATA, "ours", f"te_unet_{fmt}.safetensors")
    pipe.load_lora_weights(path)
    keys = [k for k in load_file(path) if k.endswith(first)]
    te_file = len([k for k in keys if k.startswith(("lora_te_", "text_encoder."))])
    unet_file = len(keys) - te_file
    te_loaded = len([n for n, _ in pipe.text_encoder.named_parameters() if "lora_A" in n])
    unet_loaded = len([n for n, _ in pipe.unet.named_parameters() if "lora_A" in n])
    assert (te_loaded, unet_loaded) == (te_file, unet_file), \
        f"{fmt}: loaded TE {te_loaded} / UNet {unet_loaded}, file TE {te_file} / UNet {unet_file}"
    with torch.no_grad():
        images[fmt] = torch.from_numpy(pipe(**kw).images).contiguous()
    print(f"te+unet {fmt}: diffusers loaded {te_loaded} text-encoder and {unet_loaded} UNet layers "
          f"(all of the file's)")
shutil.rmtree(tmp)
err = (images["kohya"] - images["peft"]).abs().max().item()
assert err < 1e-4, f"the two layouts disagree in diffusers: {err}"
save_file(images, os.path.join(DATA, "ours", "te_unet_images.safetensors"))
print(f"te+unet: kohya and PEFT images agree to {err:.2e}; "
      f"LoRA effect mean {(images['kohya'] - ref['pipe.image']).abs().mean():.4f}")
