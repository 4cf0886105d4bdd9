#!/usr/bin/env bash
# Puts OpenAI's CLIP BPE merge list (bpe_simple_vocab_16e6.txt.gz, MIT licence) in
# ~/.cache/sd-lora/clip-bpe/, taken from the open_clip_torch wheel on PyPI. Skipped when present.
# Tests build the CLIP tokenizer (vocab.json + merges.txt) from it.
set -euo pipefail
dir="${SD_LORA_CACHE:-$HOME/.cache/sd-lora}/clip-bpe"
out="$dir/bpe_simple_vocab_16e6.txt.gz"
[ -s "$out" ] && exit 0
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: open_clip_torch==3.3.0 -d "$dir"
python3 - "$dir" <<'PY'
import glob, sys, zipfile
d = sys.argv[1]
whl = glob.glob(f"{d}/open_clip_torch-3.3.0-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
with open(f"{d}/bpe_simple_vocab_16e6.txt.gz.tmp", "wb") as f:
    f.write(data)
PY
mv "$out.tmp" "$out"
rm -f "$dir"/open_clip_torch-*.whl
