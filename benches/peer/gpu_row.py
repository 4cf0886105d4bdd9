#!/usr/bin/env python3
"""One row of scripts/gpu-check.sh's side-by-side table from the JSON lines of our bench, the
diffusers twin and (for training) estimate-memory; a missing or failed run prints "failed".

    gpu_row.py train BATCH DTYPE gc|- OURS_JSON THEIRS_JSON ESTIMATE_JSON
    gpu_row.py generate DTYPE OURS_JSON THEIRS_JSON
"""
import json
import sys


def parse(s):
    try:
        return json.loads(s or "{}")
    except ValueError:
        return {}


def f(r, key, fmt):
    return fmt % r[key] if r.get(key) is not None else "failed"


kind = sys.argv[1]
if kind == "train":
    b, dt, gc = sys.argv[2:5]
    o, t, e = (parse(x) for x in sys.argv[5:8])
    name = f"train, batch {b}" + (", checkpointing" if gc == "gc" else "")
    est = f(e, "peak_mib", "%.0f")
else:
    dt = sys.argv[2]
    o, t = (parse(x) for x in sys.argv[3:5])
    name, est = "generate, 20 steps CFG", ""
print(f"| {name} | {dt} | {f(o, 'median_s', '%.3f')} | {f(t, 'median_s', '%.3f')} | "
      f"{f(o, 'gpu_mem_mib', '%.0f')} | {f(t, 'gpu_mem_mib', '%.0f')} "
      f"({f(t, 'gpu_peak_allocated_mib', '%.0f')}) | {est} |")
