#!/usr/bin/env python3
"""Pipeline fixtures: the real CLIP BPE tokenizer's ids, and a tiny random Stable Diffusion
(CLIP text encoder, AutoencoderKL, UNet, DDIM) with text-encoder, VAE and whole-pipeline outputs,
without and with a PEFT LoRA.

    scripts/fetch-clip-bpe.sh        # puts bpe_simple_vocab_16e6.txt.gz in ~/.cache/sd-lora/clip-bpe
    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/make_golden_pipeline.py

Writes tests/golden/data/tiny_pipeline/ (weights as the fp16 variant, rounded before the
references are computed in f32) and tests/golden/data/tokenizer_ids.json. The tokenizer files
themselves are not committed: tests build them from the BPE list like this script does.
"""
import gzip
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
OUT = os.path.join(DATA, "tiny_pipeline")
BPE = os.path.expanduser("~/.cache/sd-lora/clip-bpe/bpe_simple_vocab_16e6.txt.gz")
torch.manual_seed(0)
torch.set_num_threads(2)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(folder):
    """vocab.json + merges.txt from OpenAI's BPE list, as openai/clip-vit-large-patch14 has them."""
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


PROMPTS = [
    "japanese animation, a girl, upper body, yellow dress, smiling, looking at viewer",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry",
    "",
    "A Photo of  two CATS,\tsitting   on a   mat!! (1999) naïve café — 100% über-cool's don't",
    "a red circle on a blue background",
    " ".join(["word"] * 90),
]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())  # stored as fp16: make the f32 reference use those values


def main():
    tmp = tempfile.mkdtemp()
    write_tokenizer(os.path.join(tmp, "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"), model_max_length=77)
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    with open(os.path.join(DATA, "tokenizer_ids.json"), "w", encoding="utf-8") as f:
        json.dump({"prompts": PROMPTS, "input_ids": ids}, f, ensure_ascii=False, indent=0)

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
        bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()  # SD 1.5's legacy special-token ids
    randomize(text_encoder, 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    randomize(vae, 2)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2).eval()
    randomize(unet, 3)
    sched = DDIMScheduler.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                           set_alpha_to_one=False, prediction_type="epsilon"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    pipe.to(torch.float16).save_pretrained(OUT, variant="fp16")
    pipe.to(torch.float32)
    shutil.rmtree(os.path.join(OUT, "tokenizer"))  # rebuilt from the BPE list by the tests
    ref = {}

    # text encoder
    enc = text_encoder(torch.tensor(ids[:3]))
    ref["text.input_ids"] = torch.tensor(ids[:3])
    ref["text.last_hidden_state"] = enc.last_hidden_state.detach()
    ref["text.pooler_output"] = enc.pooler_output.detach()

    # VAE
    g = torch.Generator().manual_seed(5)
    image = torch.rand((2, 3, 32, 24), generator=g) * 2 - 1
    dist = vae.encode(image).latent_dist
    z = torch.randn((2, 4, 16, 12), generator=g)
    ref["vae.image"] = image
    ref["vae.mean"] = dist.mean.detach()
    ref["vae.logvar"] = dist.logvar.detach()
    ref["vae.latents"] = z
    ref["vae.decoded"] = vae.decode(z).sample.detach()

    # whole pipeline, fixed latents, DDIM 6 steps, guidance 5, negative prompt
    latents = torch.randn((2, 4, 16, 16), generator=g)
    ref["pipe.latents"] = latents
    kw = dict(prompt=PROMPTS[4], negative_prompt="blurry, low quality", num_inference_steps=6, guidance_scale=5.0,
              height=32, width=32, num_images_per_prompt=2, latents=latents.clone(), output_type="np")
    with torch.no_grad():
        ref["pipe.image"] = torch.from_numpy(pipe(**kw).images)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    g2 = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g2) * 0.5)
    StableDiffusionLoraLoaderMixin.save_lora_weights(OUT, unet_lora_layers=get_peft_model_state_dict(unet),
                                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                                                     weight_name="lora.safetensors")
    with torch.no_grad():
        ref["pipe.image_lora"] = torch.from_numpy(pipe(**kw).images)
        kw["cross_attention_kwargs"] = {"scale": 0.5}
        ref["pipe.image_lora_half"] = torch.from_numpy(pipe(**kw).images)
    diff = (ref["pipe.image_lora"] - ref["pipe.image"]).abs().mean().item()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB; LoRA changes the image by {diff:.3f} (mean abs)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
