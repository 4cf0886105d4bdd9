#!/usr/bin/env python3
"""SD 1.5-shaped LyCORIS files for `sd-lora bench lora-load` (random base weights, random
non-zero adapters; the shapes are what matters): LoCon (dim 32, conv 16), LoHa (dim 16, conv 8)
and LoCon+DoRA (dim 16), each on LyCORIS' `full` preset over the UNet and the text encoder,
saved in f16 by LyCORIS' own writer.

    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/make_sd15_lycoris.py [out_dir]

Default out_dir: ~/.cache/sd-lora/bench. Not committed (tens to hundreds of MB).
"""
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from lycoris.kohya import create_network
from transformers import CLIPTextConfig, CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "golden"))
import make_golden_lycoris as mgl  # noqa: E402  (preset and randomisation of the fixtures)

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/sd-lora/bench")
CASES = {
    "sd15_locon": dict(algo="lora", network_dim=32, network_alpha=16, conv_dim=16, conv_alpha=8),
    "sd15_loha": dict(algo="loha", network_dim=16, network_alpha=8, conv_dim=8, conv_alpha=4),
    "sd15_dora": dict(algo="lora", network_dim=16, network_alpha=16, conv_dim=8, conv_alpha=8, dora_wd=True),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(mgl.OUT, exist_ok=True)
    mgl.write_preset()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768))
    for i, (name, kw) in enumerate(CASES.items()):
        kw = dict(kw)
        dim, alpha = kw.pop("network_dim"), kw.pop("network_alpha")
        net = create_network(1.0, dim, alpha, None, te, unet, preset=mgl.PRESET, warn_on_unmatched=False, **kw)
        net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
        mgl.randomize_network(net, i, torch.float16)
        path = os.path.join(OUT, f"{name}.safetensors")
        net.save_weights(path, torch.float16, {"ss_network_module": f"lycoris.kohya ({name})"})
        print(f"{path}: {os.path.getsize(path) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
