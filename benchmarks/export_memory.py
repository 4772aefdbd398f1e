"""Peak memory of ``lightning-precision export`` on a checkpoint of over 1 GB, against the size of that checkpoint.

Builds a single-file Lightning checkpoint of a ~162M-parameter Llama-shaped model as CompensatedAdamW leaves it under
bf16-true (bf16 parameters, bf16 compensation, bf16 ``exp_avg``, fp32 ``exp_avg_sq``: about 1.6 GB), exports it to
bf16 safetensors in a fresh process, and prints that process's peak resident memory over its baseline (after the
imports), both in total (``VmHWM``, which counts pages of the memory-mapped checkpoint) and anonymous memory (polled
``RssAnon``: what the export itself allocates). Everything is written under a temporary directory that is deleted
afterwards. Run from the repository root::

    python benchmarks/export_memory.py [--layers 12] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, MLP, VOCAB = 768, 3072, 32000

_CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

from lightning_precision import export_weights  # imports first: they are the baseline, not the export

peak_anon = [status("RssAnon")]
done = threading.Event()

def poll():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)

base_hwm, base_anon = status("VmHWM"), status("RssAnon")
thread = threading.Thread(target=poll, daemon=True)
thread.start()
start = time.perf_counter()
result = export_weights(sys.argv[1], sys.argv[2], dtype="bf16")
seconds = time.perf_counter() - start
done.set()
thread.join()
largest = max(t.nbytes for t in result.tensors)
print(json.dumps({
    "seconds": seconds, "base_hwm": base_hwm, "peak_hwm": status("VmHWM"), "base_anon": base_anon,
    "peak_anon": peak_anon[0], "written": sum(t.nbytes for t in result.tensors), "largest_tensor": largest,
    "tensors": len(result.tensors),
}))
"""


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama-like model (untied head), in ``named_parameters`` order."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"})
        out.update({p + f"mlp.{n}_proj.weight": (MLP, HIDDEN) for n in ("gate", "up")})
        out[p + "mlp.down_proj.weight"] = (HIDDEN, MLP)
        out.update({p + n: (HIDDEN,) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")})
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def make_checkpoint(path: Path, layers: int) -> tuple[int, int]:
    """Write the checkpoint; returns (parameters, file bytes)."""
    import torch

    from lightning_precision.export_record import PARAM_NAMES_KEY

    g = torch.Generator().manual_seed(0)
    state_dict, state = {}, {}
    for i, (name, shape) in enumerate(shapes(layers).items()):
        w = torch.randn(shape, generator=g) * 0.02
        p = w.to(torch.bfloat16)
        state_dict["model." + name] = p
        state[i] = {
            "step": torch.tensor(10.0),
            "exp_avg": (w * 1e-3).to(torch.bfloat16),
            "exp_avg_sq": w * w * 1e-6,
            "compensation": (w - p.float()).to(torch.bfloat16),  # the low bits bf16 storage lost
        }
        del w
    names = list(state_dict)
    checkpoint = {
        "state_dict": state_dict,
        "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-4, "params": list(range(len(names)))}]}],
        PARAM_NAMES_KEY: [names],
    }
    torch.save(checkpoint, path)
    return sum(t.numel() for t in state_dict.values()), path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12: ~162M parameters)")
    parser.add_argument("--tmp", default=None, help="where the checkpoint and export go (deleted afterwards)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=args.tmp))
    try:
        start = time.perf_counter()
        # In a child process, so building the checkpoint leaves nothing in this one's memory.
        made = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"from export_memory import make_checkpoint; from pathlib import Path; "
             f"print(*make_checkpoint(Path({str(work / 'big.ckpt')!r}), {args.layers}))"],
            check=True, capture_output=True, text=True,
        )
        params, file_bytes = map(int, made.stdout.split()[-2:])
        print(f"checkpoint: {params / 1e6:.0f}M parameters, {file_bytes / 1e9:.2f} GB "
              f"(built in {time.perf_counter() - start:.0f}s)")
        ran = subprocess.run(
            [sys.executable, "-c", _CHILD, str(work / "big.ckpt"), str(work / "out")],
            check=True, capture_output=True, text=True,
        )
        r = json.loads(ran.stdout.strip().splitlines()[-1])
        mb = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        print(f"export to bf16: {r['tensors']} tensors, {mb(r['written'])} written in {r['seconds']:.1f}s; "
              f"largest tensor {mb(r['largest_tensor'])} (bf16), {mb(2 * r['largest_tensor'])} as fp32")
        print(f"peak RSS over baseline (VmHWM, incl. mapped checkpoint pages): {mb(r['peak_hwm'] - r['base_hwm'])}")
        print(f"peak anonymous memory over baseline (RssAnon, polled): {mb(r['peak_anon'] - r['base_anon'])}")
        print(f"checkpoint size for comparison: {mb(file_bytes)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
