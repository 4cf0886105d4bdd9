#!/usr/bin/env python3
"""Runs `sd-lora bench` and its diffusers + PEFT peer alternately (each in its own process, so
peak RSS is per run) and prints a Markdown table with ratios ours / diffusers (lower is better).

    cargo build --release
    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/side_by_side.py            # all cases
    ~/.cache/sd-lora/golden-venv/bin/python benches/peer/side_by_side.py tiny       # filter
"""
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
OURS = os.path.join(TARGET, "release", "sd-lora")
PY = sys.executable
PEER = {"train": os.path.join(ROOT, "benches", "peer", "train_diffusers.py"),
        "generate": os.path.join(ROOT, "benches", "peer", "generate_diffusers.py")}
# (what, model, latent, batch, steps)
CASES = [
    ("train", "tiny", 32, 4, 5),
    ("train", "tiny", 16, 4, 5),  # the demo's shape
    ("train", "sd15", 32, 1, 3),
    ("train", "sd15", 64, 1, 2),  # 512 px
    ("generate", "tiny", 16, 1, 3),
    ("generate", "sd15", 16, 1, 1),
    ("generate", "sd15", 64, 1, 1),  # 512 px, 20 DDIM steps, CFG
]


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


filt = sys.argv[1:]
# f32 peak of the 2-core CI machine: 2 cores x 2.3 GHz x 2 FMA units x 8 lanes (AVX2, what the
# gemm crate uses) x 2 FLOPs; see BENCHMARKS.md
PEAK = float(os.environ.get("PEAK_GFLOPS", "147.2")) * 1e9
print(f"{datetime.date.today()}, {os.cpu_count()} CPUs, peak {PEAK / 1e9:.1f} GFLOP/s")
print("| case | sd-lora s (min-max) | diffusers+PEFT s (min-max) | time ratio | sd-lora peak RSS MiB | diffusers peak RSS MiB | RSS ratio | GFLOP | % of peak sd-lora / diffusers |")
print("|---|---|---|---|---|---|---|---|---|")
for what, model, latent, batch, steps in CASES:
    name = f"{what} {model} {latent}x{latent} b{batch}"
    if filt and not any(f in name for f in filt):
        continue
    args = ["--model", model, "--latent", str(latent), "--batch", str(batch), "--steps", str(steps)]
    ours = run([OURS, "bench", what, *args, "--json"])
    peer = run([PY, PEER[what], *args])
    print(f"| {name} | {ours['median_s']:.3f} ({ours['min_s']:.3f}-{ours['max_s']:.3f}) "
          f"| {peer['median_s']:.3f} ({peer['min_s']:.3f}-{peer['max_s']:.3f}) "
          f"| {ours['median_s'] / peer['median_s']:.2f} | {ours['peak_rss_mib']:.0f} | {peer['peak_rss_mib']:.0f} "
          f"| {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f} | {peer['flops'] / 1e9:.1f} "
          f"| {100 * peer['flops'] / ours['median_s'] / PEAK:.0f} / {100 * peer['flops'] / peer['median_s'] / PEAK:.0f} |", flush=True)
