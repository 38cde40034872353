"""LoRA (peft) against full fine-tuning, measured side by side in one run:

(a) checkpoint size on the GPT-2 124M shape (transformers' GPT2Config(), random init, no download):
    a LoRA checkpoint (adapter tensors + their AdamW state) over a full one (every weight + AdamW
    state), both written with lmpipe's save_checkpoint. Target: <= 1%.
(b) step time and peak memory of a training step on a small GPT-2 shape, each variant in its own
    subprocess (peak resident memory: VmHWM from /proc/self/status, and its growth over the built
    model).
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMALL = dict(n_layer=4, n_head=4, n_embd=256, n_positions=128)  # vocab: GPT-2's 50257
LORA = dict(kind="gpt2", r=8, alpha=16.0, targets="c_attn")
GOAL = 0.01


def gpt2(**shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**shape))


def one_step(model, opt, batch: int = 2, seq: int = 64) -> None:
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def optimizer(model):
    from models import param_groups

    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)


def saved_bytes(model, path: Path, base_model: dict | None = None) -> int:
    """Bytes of an lmpipe checkpoint of `model` after one AdamW step (optimizer state included)."""
    from lmpipe.ckpt.payload import build_payload
    from lmpipe.ckpt.store import save_checkpoint
    from lmpipe.train.saver import model_weights

    opt = optimizer(model)
    one_step(model, opt, batch=1, seq=16)
    weights, base = model_weights(model)
    save_checkpoint(path, build_payload(
        weights=weights, optimizer=opt.state_dict(), hyperparameters={"model": {"type": "gpt2"}},
        tokenizer_json="{}", step=1, vocab_size=model.config.vocab_size if not base else 50257,
        block_size=1024, source="bench", batch_size=1, base_model=base))
    return path.stat().st_size


def sizes() -> None:
    from models import lora

    with tempfile.TemporaryDirectory() as d:
        full = saved_bytes(gpt2(), Path(d) / "full.pt")
        (Path(d) / "full.pt").unlink()
        wrapped = lora.wrap(gpt2(), base_identity={"name": "GPT2Config()", "type": "gpt2"},
                            **LORA)
        small = saved_bytes(wrapped, Path(d) / "lora.pt")
    ratio = small / full
    print(f"checkpoint size, GPT-2 124M shape, with AdamW state: full {full / 2**20:.1f} MiB, "
          f"LoRA r={LORA['r']} on {LORA['targets']} {small / 2**20:.2f} MiB")
    met = "met" if ratio <= GOAL else "MISSED"
    print(f"  LoRA / full: {ratio:.4%}  (goal <= {GOAL:.0%}: {met})")


def _hwm_kib() -> int:
    """Peak resident memory of this process (VmHWM, reset by exec, unlike getrusage's maxrss,
    which a child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(variant: str, steps: int = 5) -> dict:
    """One variant's training steps in this process: median step time, peak RSS."""
    from models import lora

    model = gpt2(**SMALL)
    if variant == "lora":
        model = lora.wrap(model, **LORA)
    model.train()
    built = _hwm_kib()
    opt = optimizer(model)
    one_step(model, opt)  # warm-up: allocates gradients and optimizer state
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step(model, opt)
        times.append(time.perf_counter() - t0)
    peak = _hwm_kib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_s": statistics.median(times), "peak_mib": peak / 1024,
            "growth_mib": (peak - built) / 1024, "trainable": trainable}


def speed_and_memory() -> None:
    res = {}
    for variant in ("full", "lora"):
        out = subprocess.run([sys.executable, "-m", "bench.lora", "--child", variant],
                             check=True, capture_output=True, text=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"training step, small GPT-2 ({SMALL}, vocab 50257), batch 2 x 64 tokens, CPU "
          f"({torch.get_num_threads()} threads), each in its own process:")
    for v, r in res.items():
        print(f"  {v:4s}: {r['trainable']:>10,} trainable params, step {r['step_s'] * 1e3:7.1f} ms"
              f", peak RSS {r['peak_mib']:7.1f} MiB (+{r['growth_mib']:.1f} MiB over the built "
              "model)")
    f, l_ = res["full"], res["lora"]
    print(f"  LoRA / full: step time {l_['step_s'] / f['step_s']:.2f}x, peak RSS "
          f"{l_['peak_mib'] / f['peak_mib']:.2f}x, growth "
          f"{l_['growth_mib'] / max(f['growth_mib'], 1e-9):.2f}x")


def main() -> None:
    speed_and_memory()  # first: its subprocesses start from a small parent
    sizes()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
    else:
        main()
