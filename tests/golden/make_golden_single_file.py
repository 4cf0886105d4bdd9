#!/usr/bin/env python3
"""Single-file (A1111/CompVis LDM layout) checkpoints of two tiny SD-architecture pipelines, and
what diffusers' `from_single_file` makes of them.

* `single_file/sd1.safetensors`: tests/golden/data/tiny_pipeline (SD 1.x layout: conv
  proj_in, CLIP under `cond_stage_model.transformer.`) in fp16, plus what real files carry and
  a loader must set aside: a `model_ema.*` copy of the UNet (different weights, so using it
  shows), LDM schedule buffers, `model_ema.decay`, a float `position_ids`.
* `single_file/sd2.safetensors` + `single_file/sd2_config/` (configs only): an SD 2.x-style
  tiny pipeline (linear projections, per-block heads, OpenCLIP text tower with fused q/k/v
  under `cond_stage_model.model.`, GELU, "!" padding), bf16.

The LDM names are written by this script; diffusers' own conversion is the judge: every
tensor `from_single_file` loads equals the source pipeline's. References: the pipeline image
(fixed latents, DDIM 6 steps, guidance 5) and a UNet output, with and without EMA.

    ~/.cache/sd-lora/golden-venv/bin/python tests/golden/make_golden_single_file.py
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden_pipeline as mgp  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
OUT = os.path.join(DATA, "single_file")
torch.set_num_threads(2)

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_prefixes(cfg):
    """(diffusers prefix, LDM prefix, is resnet) for SD's block layout."""
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    p = [("conv_in", "input_blocks.0.0", False), ("time_embedding.linear_1", "time_embed.0", False),
         ("time_embedding.linear_2", "time_embed.2", False), ("conv_norm_out", "out.0", False),
         ("conv_out", "out.2", False), ("mid_block.resnets.0", "middle_block.0", True),
         ("mid_block.attentions.0", "middle_block.1", False), ("mid_block.resnets.1", "middle_block.2", True)]
    idx = 1
    for i in range(n):
        for j in range(layers):
            p += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", True),
                  (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", False)]
            idx += 1
        if i < n - 1:
            p.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", False))
            idx += 1
    idx = 0
    for i in range(n):
        attn = cfg.up_block_types[i].startswith("CrossAttn")
        for j in range(layers + 1):
            p += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", True),
                  (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", False)]
            idx += 1
        if i < n - 1:
            p.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx - 1}.{2 if attn else 1}.conv", False))
    return p


def unet_to_ldm(sd, cfg):
    out = {}
    prefixes = unet_prefixes(cfg)
    for k, v in sd.items():
        for d, l, res in prefixes:
            if k.startswith(d + "."):
                rest = k[len(d) + 1:]
                if res:
                    head, tail = rest.split(".", 1)
                    rest = RESNET[head] + "." + tail
                out["model.diffusion_model." + l + "." + rest] = v
                break
        else:
            raise KeyError(k)
    return out


def vae_to_ldm(sd, n):
    out = {}
    inner = [("conv_shortcut", "nin_shortcut"), ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
             ("to_v", "v"), ("to_out.0", "proj_out")]
    for k, v in sd.items():
        side, rest = k.split(".", 1) if k.startswith(("encoder.", "decoder.")) else ("", k)
        r = rest
        if side:
            for a, b in inner:
                r = r.replace("." + a + ".", "." + b + ".")
            if r.startswith("mid_block.resnets."):
                j, tail = r[len("mid_block.resnets."):].split(".", 1)
                r = f"mid.block_{int(j) + 1}.{tail}"
            elif r.startswith("mid_block.attentions.0."):
                r = "mid.attn_1." + r[len("mid_block.attentions.0."):]
                if r.split(".")[1] in ("q", "k", "v", "proj_out") and r.endswith("weight"):
                    v = v[:, :, None, None]  # LDM keeps them as 1x1 convolutions
            elif r.startswith(("down_blocks.", "up_blocks.")):
                kind, i, tail = r.split(".", 2)
                i = int(i)
                name, level = ("down", i) if side == "encoder" else ("up", n - 1 - i)
                tail = (tail.replace("resnets.", "block.", 1).replace("downsamplers.0.", "downsample.")
                        .replace("upsamplers.0.", "upsample."))
                r = f"{name}.{level}.{tail}"
            elif r.startswith("conv_norm_out."):
                r = "norm_out." + r[len("conv_norm_out."):]
            r = side + "." + r
        out["first_stage_model." + r] = v
    return out


def clip_to_ldm(sd, open_clip):
    # transformers 5's CLIPTextModel has no `text_model.` level; files always do
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    if not open_clip:
        return {"cond_stage_model.transformer." + k: v for k, v in sd.items() if "position_ids" not in k}
    p = "cond_stage_model.model."
    out, qkv = {}, {}
    for k, v in sd.items():
        k = k.replace("text_model.", "", 1)
        if k == "embeddings.token_embedding.weight":
            out[p + "token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out[p + "positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out[p + "ln_final." + k.split(".")[-1]] = v
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            b = f"{p}transformer.resblocks.{i}."
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((b, param), {})[module[-6]] = v
                continue
            theirs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                      "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[module]
            out[b + theirs + "." + param] = v
    for (b, param), d in qkv.items():
        out[b + "attn.in_proj_" + param] = torch.cat([d["q"], d["k"], d["v"]], 0)
    hidden = out[p + "token_embedding.weight"].shape[1]
    out[p + "text_projection"] = torch.randn(hidden, hidden)  # not used by SD; real files carry it
    return out


def ldm_of(pipe, open_clip):
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), open_clip))
    return sd


def check_same(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: keys differ: {set(sa) ^ set(sb)}"
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst == 0.0, f"{what}: from_single_file differs by {worst}"


def case(name, pipe, tok, config_dir, open_clip, dtype, extra=None):
    path = os.path.join(OUT, f"{name}.safetensors")
    sd = {k: v.to(dtype).contiguous() for k, v in ldm_of(pipe, open_clip).items()}
    sd.update(extra or {})
    save_file(sd, path)
    sf = StableDiffusionPipeline.from_single_file(path, config=config_dir, tokenizer=tok, torch_dtype=torch.float32,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, local_files_only=True)
    sf.set_progress_bar_config(disable=True)
    pipe = pipe.to(dtype).to(torch.float32)  # what the file holds
    for part in ("unet", "vae", "text_encoder"):
        check_same(getattr(sf, part), getattr(pipe, part), f"{name} {part}")
    ref = load_file(os.path.join(DATA, "tiny_pipeline", "reference.safetensors"))
    kw = dict(prompt=mgp.PROMPTS[4], negative_prompt="blurry, low quality", num_inference_steps=6, guidance_scale=5.0,
              height=32, width=32, num_images_per_prompt=2, latents=ref["pipe.latents"].clone(), output_type="np")
    g = torch.Generator().manual_seed(11)
    c = sf.unet.config
    x = torch.randn((2, c.in_channels, 8, 8), generator=g)
    t = torch.tensor([10.0, 700.0])
    e = torch.randn((2, 77, sf.text_encoder.config.hidden_size), generator=g)
    with torch.no_grad():
        out = {"image": torch.from_numpy(sf(**kw).images).contiguous(),
               "unet.sample": x, "unet.timestep": t, "unet.encoder_hidden_states": e,
               "unet.out": sf.unet(x, t, e).sample.contiguous(),
               "text.ids": torch.tensor(tok([mgp.PROMPTS[4]], padding="max_length", max_length=77).input_ids),
               }
        out["text.hidden"] = sf.text_encoder(out["text.ids"]).last_hidden_state.contiguous()
    print(f"{name}: {len(sd)} tensors, {os.path.getsize(path) / 1e6:.2f} MB; from_single_file equals the source")
    return path, out


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tmp = tempfile.mkdtemp()
    mgp.write_tokenizer(os.path.join(tmp, "tokenizer"))
    root = os.path.join(DATA, "tiny_pipeline")

    # SD 1.x: the tiny pipeline, fp16, with EMA and the buffers real files carry
    tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"), model_max_length=77)
    pipe = StableDiffusionPipeline.from_pretrained(root, variant="fp16", torch_dtype=torch.float32, tokenizer=tok,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    g = torch.Generator().manual_seed(3)
    ema_unet = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pipe.unet.state_dict().items()}
    extra = {"model_ema." + k[len("model."):].replace(".", ""): v.half().contiguous()
             for k, v in unet_to_ldm(ema_unet, pipe.unet.config).items()}
    extra["model_ema.decay"] = torch.tensor(0.9999)
    extra["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    extra["betas"] = torch.linspace(0.00085, 0.012, 1000)
    extra["alphas_cumprod"] = torch.cumprod(1 - extra["betas"], 0)
    extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 1e-3
    _, out = case("sd1", pipe, tok, root, False, torch.float16, extra)
    # the EMA UNet's output (what --use-ema must give)
    ema = UNet2DConditionModel.from_config(pipe.unet.config)
    ema.load_state_dict({k: v.half().float() for k, v in ema_unet.items()})
    with torch.no_grad():
        out["unet.out_ema"] = ema(out["unet.sample"], out["unet.timestep"], out["unet.encoder_hidden_states"]).sample
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "sd1_reference.safetensors"))

    # SD 2.x style: linear projections, per-block heads, OpenCLIP text tower, "!" padding
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"), model_max_length=77, pad_token="!")
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=16, bos_token_id=0, eos_token_id=2,
        pad_token_id=1)).eval()
    mgp.randomize(te, 21)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    mgp.randomize(vae, 22)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=16, attention_head_dim=(2, 4),
                                use_linear_projection=True).eval()
    mgp.randomize(unet, 23)
    sched = DDIMScheduler.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                           set_alpha_to_one=False, prediction_type="v_prediction"))
    pipe2 = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok2, unet=unet, scheduler=sched,
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    config_dir = os.path.join(OUT, "sd2_config")
    pipe2.save_pretrained(os.path.join(tmp, "sd2"))
    for part, f in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                    ("scheduler", "scheduler_config.json")):
        os.makedirs(os.path.join(config_dir, part), exist_ok=True)
        shutil.copy(os.path.join(tmp, "sd2", part, f), os.path.join(config_dir, part, f))
    shutil.copy(os.path.join(tmp, "sd2", "model_index.json"), config_dir)
    os.makedirs(os.path.join(config_dir, "tokenizer"))
    # vocab.json and merges.txt are rebuilt from the CLIP BPE list by the tests
    for f in ("tokenizer_config.json",):
        shutil.copy(os.path.join(tmp, "sd2", "tokenizer", f), os.path.join(config_dir, "tokenizer", f))
    full = os.path.join(tmp, "sd2_full")
    shutil.copytree(os.path.join(tmp, "sd2"), full)
    _, out = case("sd2", pipe2, tok2, full, True, torch.bfloat16)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "sd2_reference.safetensors"))
    with open(os.path.join(config_dir, "tokenizer", "tokenizer_config.json")) as f:
        print("sd2 tokenizer pad token:", json.load(f).get("pad_token"))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
