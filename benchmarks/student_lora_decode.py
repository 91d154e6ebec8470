"""Greedy decoding speed of the lora-lm student's architecture, by decoding path.

    python benchmarks/student_lora_decode.py [--device cuda] [--new-tokens 64]

Times ``generate`` on a model of SmolLM2-135M's shape (30 layers, hidden 576; random
weights: speed depends on shapes, not values, and no model file is needed) at batch 1 and
8, each answer forced to ``--new-tokens`` tokens, along three paths: transformers' default
(dynamic KV cache, eager), a static KV cache run eagerly, and a static KV cache with the
forward compiled (``torch.compile``, CUDA graphs on a GPU) — what the student would gain
from a compiled decode (transformers compiles only on an accelerator, so on a CPU the
third path is skipped). Prints one JSON object; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

# SmolLM2-135M-Instruct's config (the bundled GGUF's, as transformers reads it).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True)
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", default=["dynamic", "static", "compiled"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY if args.tiny else SMOLLM2_135M)))
    model = model.to(device=device, dtype=dtype).eval()
    vocab = model.config.vocab_size

    def run(batch: int, path: str) -> float:
        ids = torch.randint(3, vocab, (batch, args.prompt_tokens), device=device)
        extra: dict[str, Any] = {}
        if path != "dynamic":
            extra["cache_implementation"] = "static"
            extra["disable_compile"] = path == "static"
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=0, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt_tokens + args.new_tokens
        return time.perf_counter() - started

    result: dict[str, Any] = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                              "model": "tiny" if args.tiny else "SmolLM2-135M shape",
                              "torch": torch.__version__, "new_tokens": args.new_tokens,
                              "prompt_tokens": args.prompt_tokens, "paths": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for path in args.paths:
        figures: dict[str, Any] = {}
        if path == "compiled" and device.type == "cpu":
            # transformers compiles the decode step on accelerators only: here it would
            # time the static path again.
            result["paths"][path] = {"skipped": "transformers compiles on accelerators only"}
            continue
        for batch in (1, 8):
            try:
                first = run(batch, path)  # warm-up: allocation, and compilation if any
                times = [run(batch, path) for _ in range(args.repeats)]
            except Exception as error:  # a path this torch/transformers cannot run
                figures[f"batch{batch}_error"] = f"{type(error).__name__}: {error}"[:300]
                continue
            median = statistics.median(times)
            figures[f"batch{batch}_first_s"] = round(first, 3)
            figures[f"batch{batch}_s"] = round(median, 4)
            figures[f"batch{batch}_ms_per_token"] = round(1000 * median / args.new_tokens, 2)
        result["paths"][path] = figures
        print(path, json.dumps(figures), flush=True)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
