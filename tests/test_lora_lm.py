"""The ``lora-lm`` trainer: a fast run on a tiny random Llama, and a slow one on SmolLM2."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.interfaces import Example, Prediction
from plugins.extract import ExtractTask
from plugins.rewrite import RewriteTask
from plugins.trainers.lora_lm import (
    CACHE_ENV,
    META_FILE,
    ConfidenceMap,
    Generated,
    LoraLMStudent,
    LoraLMTrainer,
    cache_root,
    fit_confidence,
    load_base,
    resolve_device,
    serving_dtype,
    torch_threads,
    training_dtype,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# SmolLM2's chat template, so the tiny model is prompted exactly like the real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTENTS = ["balance", "card_lost", "transfer", "pin_change", "refund"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"intents": {"type": "array", "items": {"enum": INTENTS}}},
    "required": ["intents"],
    "additionalProperties": False,
}


def extract_examples(n: int) -> list[Example]:
    phrases = {
        "balance": "how much money is in my account",
        "card_lost": "i lost my card yesterday",
        "transfer": "send fifty pounds to my sister",
        "pin_change": "i want a new pin number",
        "refund": "the shop never refunded me",
    }
    out = []
    for i in range(n):
        intent = INTENTS[i % len(INTENTS)]
        out.append(Example(input=f"{phrases[intent]} please ({i})",
                           target={"intents": [intent]}))
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer, saved like a
    Hugging Face checkpoint (no downloads, about a second to build)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    where = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [e.input for e in extract_examples(50)] + [
        json.dumps(e.target) for e in extract_examples(50)] + [CHAT_TEMPLATE]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(where)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(where)
    return where


def tiny_options(base: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "base_model": str(base), "epochs": 4, "learning_rate": 1e-2, "batch_size": 8,
        "max_new_tokens": 24, "max_input_tokens": 64, "lora_r": 4, "lora_alpha": 8,
        "calibration_fraction": 0.2, "min_calibration_examples": 6, "dtype": "float32",
        "max_train_seconds": 60, "seed": 1,
    }
    options.update(overrides)
    return LoraLMTrainer.Options.model_validate(options)


def test_time_budget_stops_training(tiny_base: Path, tmp_path: Path) -> None:
    """A spent budget ends the loop before the planned steps, and the figures say so."""
    task = ExtractTask("intents", ExtractTask.Options.model_validate({"json_schema": SCHEMA}))
    trainer = LoraLMTrainer(tiny_options(tiny_base, epochs=50, max_train_seconds=1e-6))
    figures = trainer.train(extract_examples(30), task, tmp_path / "artifact")
    assert figures["stopped_early"] is True
    assert figures["steps"] < 50 * 3
    assert (tmp_path / "artifact" / "adapter_model.safetensors").is_file()


def test_train_save_load_predict_tiny(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    task = ExtractTask("intents", ExtractTask.Options.model_validate({"json_schema": SCHEMA}))
    examples = extract_examples(30)
    trainer = LoraLMTrainer(tiny_options(tiny_base))
    out = tmp_path / "artifact"
    figures = trainer.train(examples, task, out)

    assert figures["examples"] == 30
    assert figures["held_out_examples"] == 6
    assert figures["train_examples"] == 24
    assert figures["steps"] == 4 * 3  # 24 examples / 8 per step, 4 epochs
    assert figures["train_seconds"] > 0
    assert figures["final_loss"] < figures["first_loss"]
    assert figures["calibration"]["n"] + figures["calibration"]["invalid"] == 6
    json.dumps(figures)  # the registry stores them as JSON
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["base"]["model"] == str(tiny_base)
    assert meta["options"]["lora_r"] == 4
    assert set(meta["calibration"]) == {"feature", "method", "a", "b"}

    # A fresh trainer, as the gateway builds one from the registry's stored options.
    student = LoraLMTrainer(tiny_options(tiny_base)).load(out, task)
    inputs = [e.input for e in extract_examples(11)]
    predictions = student.predict(inputs)
    assert len(predictions) == len(inputs)
    for prediction in predictions:
        assert isinstance(prediction, Prediction)
        assert 0.0 <= prediction.confidence <= 1.0
        if prediction.target is None:
            assert prediction.confidence == 0.0
        else:  # anything the student serves is a schema-valid target
            assert task.parse_target(task.render(prediction.target)) == prediction.target
    assert student.predict([]) == []
    # Greedy decoding is deterministic, and independent of how inputs are batched.
    assert student.predict(inputs[:3]) == predictions[:3]

    # Where and in which dtype it serves is the loading machine's choice, not the
    # artifact's: float32 on this CPU by default, bf16 when the loader asks for it.
    assert isinstance(student, LoraLMStudent)
    assert student.model.device.type == ("cuda" if has_gpu() else "cpu")
    if not has_gpu():
        assert next(student.model.parameters()).dtype == torch.float32
    in_bf16 = LoraLMTrainer(tiny_options(tiny_base, device="cpu",
                                         inference_dtype="bfloat16")).load(out, task)
    assert isinstance(in_bf16, LoraLMStudent)
    assert next(in_bf16.model.parameters()).dtype == torch.bfloat16
    assert len(in_bf16.predict(inputs[:2])) == 2


def test_invalid_outputs_get_zero_confidence(tiny_base: Path, tmp_path: Path) -> None:
    # Every object must carry a key the student never saw: nothing it writes can validate.
    strict = ExtractTask("strict", ExtractTask.Options.model_validate({"json_schema": {
        "type": "object", "required": ["never"]}}))
    trainer = LoraLMTrainer(tiny_options(tiny_base, epochs=1, calibration_fraction=0.0))
    figures = trainer.train(extract_examples(16), strict, tmp_path / "a")
    assert "calibration" not in figures  # nothing held out
    student = trainer.load(tmp_path / "a", strict)
    predictions = student.predict(["i lost my card", "send money", "pin"])
    assert predictions == [Prediction(target=None, confidence=0.0)] * 3

    assert isinstance(student, LoraLMStudent)
    parse = student.prediction_for
    assert parse(Generated("not json", True, -0.1, -0.2)) == Prediction(None, 0.0)
    assert parse(Generated('{"never": 1}', False, -0.1, -0.2)) == Prediction(None, 0.0)
    served = parse(Generated('{"never": 1}', True, -0.1, -0.2))
    assert served.target == {"never": 1}
    assert 0.0 < served.confidence <= 1.0


def test_confidence_map_is_monotone() -> None:
    # Right answers have high mean log-probability, wrong ones low, with some overlap.
    means = [-0.01, -0.02, -0.05, -0.1, -0.3, -0.5, -0.8, -1.0, -1.5, -2.0, -0.04, -0.9]
    mins = [m * 3 for m in means]
    agrees = [True, True, True, True, False, True, False, False, False, False, True, True]
    mapping, report = fit_confidence(means, mins, agrees, "auto")
    assert mapping.method == "platt"
    assert report["auroc_mean_logprob"] is not None
    confidences = [mapping(m, n) for m, n in zip(means, mins, strict=True)]
    assert all(0.0 <= c <= 1.0 for c in confidences)
    ranked = sorted(zip(means, confidences, strict=True))
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(ranked))
    # One outcome only: no fit, confidence = exp(statistic).
    mapping, _ = fit_confidence([-0.1, -0.2], [-0.3, -0.4], [True, True], "min_logprob")
    assert mapping == ConfidenceMap(feature="min_logprob")
    assert mapping(-0.1, -0.3) == pytest.approx(0.7408, abs=1e-4)


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)  # a user's setting would win below
    with pytest.raises(ValidationError, match="unknown bundled model"):
        LoraLMTrainer.Options.model_validate({"base_model": "bundled:gpt5"})
    with pytest.raises(ValidationError):
        LoraLMTrainer.Options.model_validate({"lora_rank": 8})
    options = LoraLMTrainer.Options.model_validate({"cache_dir": "/tmp/somewhere"})
    assert cache_root(options) == Path("/tmp/somewhere")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = "/tmp/elsewhere"
    try:
        assert cache_root(options) == Path("/tmp/elsewhere")
    finally:
        if old is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = old


def test_training_dtype_follows_the_cpu() -> None:
    assert training_dtype("float32") == "float32"
    assert training_dtype("bfloat16") == "bfloat16"
    assert LoraLMTrainer.Options().dtype == "auto"
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to check 'auto' against")
    flags = set(cpuinfo.read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert training_dtype("auto") == ("bfloat16" if native else "float32")


def missing_gpu() -> str:
    """A CUDA device index this machine does not have (cuda:0 where torch sees none)."""
    import torch

    return f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_device_option() -> None:
    import torch

    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        LoraLMTrainer.Options.model_validate({"device": "gpu"})
    assert LoraLMTrainer.Options().device == "auto"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if has_gpu() else "cpu")
    with pytest.raises(ValueError, match=f"device='{missing_gpu()}'"):
        resolve_device(missing_gpu())
    # Serving dtype: float32 decodes faster on a CPU, bf16 on a GPU; an explicit one stands.
    assert serving_dtype("auto", torch.device("cpu")) == "float32"
    assert serving_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert serving_dtype("float32", torch.device("cuda")) == "float32"
    assert serving_dtype("bfloat16", torch.device("cpu")) == "bfloat16"


def test_missing_gpu_is_named_before_training(tiny_base: Path, tmp_path: Path) -> None:
    task = ExtractTask("intents", ExtractTask.Options.model_validate({"json_schema": SCHEMA}))
    trainer = LoraLMTrainer(tiny_options(tiny_base, device=missing_gpu()))
    with pytest.raises(ValueError, match="lora-lm option device="):
        trainer.train(extract_examples(12), task, tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
def test_gpu_trained_student_serves_on_either(tiny_base: Path, tmp_path: Path) -> None:
    """Trained on the GPU in bf16; the artifact loads on the GPU (bf16) and on the CPU
    (float32), and both give the same answers for nearly every input."""
    import torch

    task = ExtractTask("intents", ExtractTask.Options.model_validate({"json_schema": SCHEMA}))
    out = tmp_path / "artifact"
    trainer = LoraLMTrainer(tiny_options(tiny_base, device="cuda", dtype="auto"))
    figures = trainer.train(extract_examples(30), task, out)
    assert figures["device"] == "cuda"
    assert figures["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert figures["final_loss"] < figures["first_loss"]

    on_gpu = trainer.load(out, task)
    on_cpu = LoraLMTrainer(tiny_options(tiny_base, device="cpu")).load(out, task)
    assert isinstance(on_gpu, LoraLMStudent) and isinstance(on_cpu, LoraLMStudent)
    assert on_gpu.model.device.type == "cuda" and on_cpu.model.device.type == "cpu"
    assert next(on_gpu.model.parameters()).dtype == torch.bfloat16
    assert next(on_cpu.model.parameters()).dtype == torch.float32
    inputs = [e.input for e in extract_examples(20)]
    gpu_answers, cpu_answers = on_gpu.predict(inputs), on_cpu.predict(inputs)
    assert all(0.0 <= p.confidence <= 1.0 for p in gpu_answers)
    same = sum(g.target == c.target for g, c in zip(gpu_answers, cpu_answers, strict=True))
    assert same >= 16


def test_register_hook() -> None:
    from plugins.trainers import lora_lm

    seen: dict[str, Any] = {}
    lora_lm.register_trainers(lambda name, cls: seen.__setitem__(name, cls))
    assert seen == {"lora-lm": LoraLMTrainer}


# --- slow: the bundled SmolLM2 on Disfl-QA ------------------------------------------------

DISFL_SYSTEM = ("Rewrite the user's question as the fluent question they meant: drop the "
                "words they corrected or abandoned. Reply with the question only.")


def disfl_rows(split: str) -> list[tuple[str, str]]:
    data = json.loads((DATA / "disfl_qa" / f"{split}.json").read_text())
    return [(row["disfluent"], row["original"]) for row in data.values()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_learns_disfl_qa(tmp_path: Path) -> None:
    task = RewriteTask("fluent", RewriteTask.Options.model_validate({"similarity": 0.9}))
    train_rows = disfl_rows("train")[:220]
    test_rows = disfl_rows("dev")[:20]
    examples = [Example(input=d, target=task.parse_target(o)) for d, o in train_rows]
    options = LoraLMTrainer.Options.model_validate({
        "cache_dir": str(tmp_path.parent / "base-models"),  # shared by the session's tests
        "system_prompt": DISFL_SYSTEM, "max_train_seconds": 120, "epochs": 3,
        # bf16 autocast is emulated on CPUs without AVX512-BF16: 60 s a step instead of 2.
        "dtype": "float32",
        "batch_size": 4,  # more updates fit the 120 s budget
        # CI machines are shared: oversubscribed spinning threads made steps 3-10x slower.
        "torch_threads": 1,
        "calibration_fraction": 0.1, "min_calibration_examples": 20,
    })
    trainer = LoraLMTrainer(options)
    inputs = [d for d, _ in test_rows]

    def agreement(predictions: list[Prediction]) -> list[bool]:
        return [p.target is not None and task.agree(p.target, task.parse_target(o))
                for p, (_, o) in zip(predictions, test_rows, strict=True)]

    # The zero-shot base with the same prompt: the floor the LoRA must clear.
    model, tokenizer = load_base(options, "float32")
    with torch_threads(1):
        zero_shot = agreement(LoraLMStudent(model, tokenizer, task, options).predict(inputs))
    del model

    figures = trainer.train(examples, task, tmp_path / "artifact")
    student = trainer.load(tmp_path / "artifact", task)
    started = time.perf_counter()
    with torch_threads(1):
        predictions = student.predict(inputs)
    predict_seconds = time.perf_counter() - started
    agrees = agreement(predictions)
    right = [p.confidence for p, ok in zip(predictions, agrees, strict=True) if ok]
    wrong = [p.confidence for p, ok in zip(predictions, agrees, strict=True) if not ok]
    print(json.dumps({"zero_shot": sum(zero_shot) / 20, "lora": sum(agrees) / 20,
                      "mean_conf_right": sum(right) / max(1, len(right)),
                      "mean_conf_wrong": sum(wrong) / max(1, len(wrong)),
                      "predict_seconds_20": round(predict_seconds, 2),
                      "figures": figures}, indent=1))
    assert figures["stopped_early"] or figures["epochs_done"] >= 3
    # No wall-clock bound here: on a shared CI core one step can take a minute; the
    # budget's stop is tested on the tiny model.
    # Measured: 0.70 after 37 steps (zero-shot 0.05); 0.35 after 5 steps on a choked CPU.
    assert sum(agrees) / 20 >= 0.3
    assert sum(agrees) >= sum(zero_shot) + 5
    if right and wrong:
        assert sum(right) / len(right) > sum(wrong) / len(wrong)

    # The same version generated by a LoRA-serving server (vLLM's API): the same answers and
    # confidences, end-of-sequence included, with only the tokenizer in this process.
    from gateway.testing.lora_server import LoraServer
    from plugins.trainers.lora_lm import resolve_base
    from plugins.trainers.lora_lm_remote import RemoteLoraLMStudent

    with LoraServer(resolve_base(options)) as server, torch_threads(1):
        # The stand-in generates one prompt at a time on the CPU: 20 take longer than the
        # default timeout, which is sized for a GPU server.
        remote = LoraLMTrainer(options.model_copy(update={
            "server_url": server.url, "server_timeout_s": 600.0})).load(tmp_path / "artifact", task)
        assert isinstance(remote, RemoteLoraLMStudent)
        served = remote.predict(inputs)
    assert [p.target for p in served] == [p.target for p in predictions]
    assert [p.confidence for p in served] == pytest.approx(
        [p.confidence for p in predictions], abs=1e-3)
