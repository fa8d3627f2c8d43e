"""Device check: the ONNX engine on the CUDA execution provider against the CPU one, with NVML energy.

Usage: python scripts/gpu_check.py MODEL_DIR [MODEL_DIR ...] [--out FILE]
Prints (and writes) JSON: tokens/s, joules per token and their source, load time, memory, and whether
greedy outputs agree between CPU and CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from workers.energy import make_energy_meter
from workers.engine import OnnxCausalLM

PROMPTS = ["37+48=", "sort 9 3 5 =", "def fibonacci(n):", "The import statement", "12+7="]


def bench(model_dir: Path, device: str, rounds: int, max_new_tokens: int) -> dict[str, Any]:
    engine = OnnxCausalLM.load(model_dir, name=model_dir.name, device=device)
    meter = make_energy_meter(device)
    for prompt in PROMPTS:  # warm-up: kernels, arenas
        engine.generate(prompt, max_new_tokens=8)
    greedy = [engine.generate(p, max_new_tokens=16).text for p in PROMPTS]
    tokens, cpu_s = 0, 0.0
    token = meter.start()
    started = time.perf_counter()
    for i in range(rounds):
        gen = engine.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new_tokens)
        tokens += gen.tokens_out
        cpu_s += gen.cpu_s
    wall = time.perf_counter() - started
    joules = meter.stop(token, cpu_s)
    out = {"device": engine.device, "tokens": tokens, "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall, 1), "joules": round(joules, 3),
           "j_per_token": round(joules / max(tokens, 1), 6), "energy_source": meter.source,
           "load_s": round(engine.load_s, 3), "memory_mb": round(engine.memory_bytes / 2**20, 1), "greedy": greedy}
    engine.close()
    meter.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                              "python": platform.python_version(), "models": {}}
    for model in args.models:
        runs = {}
        for device in ("cpu", "cuda"):
            try:
                runs[device] = bench(model, device, args.rounds, args.max_new_tokens)
            except Exception as e:
                runs[device] = {"error": f"{type(e).__name__}: {e}"}
        if "greedy" in runs.get("cpu", {}) and "greedy" in runs.get("cuda", {}):
            runs["greedy_equal"] = runs["cpu"]["greedy"] == runs["cuda"]["greedy"]
        report["models"][model.name] = runs
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
