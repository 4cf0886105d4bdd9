"""Execute notebooks with nbclient and fail on any error output or stderr stream.

Usage: run_notebooks.py --out DIR [--update] [NOTEBOOK ...]   (default: every notebooks/*.ipynb)

Every code cell of the executed copy is stamped with the SHA-256 of its source
(`metadata.sd_lora.source_sha256`). With --update, a notebook that passed is written back over
its source with its outputs (execution timestamps dropped), so that the committed notebooks show
their figures on a code host; `tests/notebook_api.rs` fails when a committed cell's source no
longer matches its stamp (outputs older than the code).

A notebook fails when a cell raises, prints to stderr, or produces an `error` output, or when
the kernel dies (evcxr.toml turns panics into kernel deaths). Each notebook must also show at
least one inline SVG and one inline PNG figure. Prints per-cell times of the slowest cells and
ends with "N passed, N failed"; exit status 1 if any failed.
"""
import argparse
import copy
import datetime
import glob
import hashlib
import os
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError


def seconds(cell):
    ex = cell.get("metadata", {}).get("execution", {})
    a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if not (a and b):
        return 0.0
    f = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    return (f(b) - f(a)).total_seconds()


def stamp(nb):
    """Marks each code cell with the hash of the source its outputs came from."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest = hashlib.sha256(cell.source.encode("utf-8")).hexdigest()
            cell.metadata["sd_lora"] = {"source_sha256": digest}


def for_commit(nb):
    """The executed notebook without per-run noise (timestamps, kernel session details)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def problems(nb):
    out = []
    mimes = set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            if o.output_type == "error":
                out.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
            elif o.output_type == "stream" and o.get("name") == "stderr":
                out.append(f"cell {i}: stderr: {o.get('text', '').strip()[:2000]}")
            elif o.output_type in ("display_data", "execute_result"):
                mimes.update(o.get("data", {}).keys())
    for m in ("image/svg+xml", "image/png"):
        if m not in mimes:
            out.append(f"no {m} figure in the outputs")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--update", action="store_true",
                    help="write each passing notebook back over its source, with outputs")
    ap.add_argument("notebooks", nargs="*")
    args = ap.parse_args()
    paths = args.notebooks or sorted(glob.glob("notebooks/*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    passed, failed = 0, 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="rust",
            allow_errors=True,
            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
        )
        t0 = time.time()
        fatal = None
        try:
            client.execute()
        except (CellExecutionError, DeadKernelError, RuntimeError, TimeoutError) as e:
            fatal = f"{type(e).__name__}: {str(e).strip()[:2000]}"
        wall = time.time() - t0
        found = problems(nb) + ([fatal] if fatal else [])
        stamp(nb)
        target = os.path.join(args.out, os.path.basename(path))
        nbformat.write(nb, target)
        if args.update and not found:
            nbformat.write(for_commit(nb), path)
        times = sorted(
            ((seconds(c), i) for i, c in enumerate(nb.cells) if c.cell_type == "code"),
            reverse=True,
        )
        slow = ", ".join(f"cell {i} {s:.0f} s" for s, i in times[:3])
        if found:
            failed += 1
            print(f"FAIL {path} ({wall:.0f} s; slowest: {slow}); executed copy: {target}")
            for p in found[:8]:
                print(f"    {p}")
            if len(found) > 8:
                print(f"    ... and {len(found) - 8} more")
        else:
            passed += 1
            print(f"ok   {path} ({wall:.0f} s; slowest: {slow})")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
