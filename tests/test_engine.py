"""OnnxCausalLM against transformers, on tiny random Llama and GPT-2 models exported by optimum."""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from workers.engine import OnnxCausalLM
from workers.engine_api import Engine, Generation
from workers.errors import EngineError, EngineLoadError

pytestmark = pytest.mark.slow  # builds and exports two models (a few seconds)

MAX_NEW = 12
EOS = "<|endoftext|>"
PROMPTS = ["line 3: the quick", "brown fox jumps over", "lazy dogs 7", "x", "Q: 12+30= A:"]


@dataclass(frozen=True)
class Tiny:
    """One built model: the HF checkpoint (reference) and its ONNX export (under test)."""

    kind: str
    hf_dir: Path
    onnx_dir: Path


def _corpus() -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "and", "cats", "Q:", "A:"]
    return [
        f"line {i}: {' '.join(words[(i * k) % len(words)] for k in range(1, 9))} {i % 13}+{i % 5}={i % 13 + i % 5}"
        for i in range(300)
    ]


def _build(root: Path) -> dict[str, Tiny]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    onnx_export = pytest.importorskip("optimum.exporters.onnx")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.set_num_threads(1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    vocab = tok.get_vocab_size()
    configs: dict[str, Any] = {
        "llama": transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention: past has 2 heads, not 4
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        ),
    }
    classes = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}
    built = {}
    for kind, config in configs.items():
        torch.manual_seed(0)
        hf_dir, onnx_dir = root / f"{kind}-hf", root / f"{kind}-onnx"
        classes[kind](config).eval().save_pretrained(hf_dir)
        wrapped = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS
        )
        wrapped.save_pretrained(hf_dir)
        onnx_export.main_export(str(hf_dir), output=onnx_dir, task="text-generation-with-past", do_validation=False)
        built[kind] = Tiny(kind, hf_dir, onnx_dir)
    return built


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Tiny]]:
    root = tmp_path_factory.mktemp("tiny-lm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))  # onnxruntime writes under it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer/deprecation noise from the export
            built = _build(root)
        yield built


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest, tiny_models: dict[str, Tiny]) -> Tiny:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def engine(tiny: Tiny) -> Iterator[OnnxCausalLM]:
    eng = OnnxCausalLM.load(tiny.onnx_dir, name=tiny.kind)
    yield eng
    eng.close()


def _hf_greedy(model: Any, prompt_ids: list[int], max_new: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=0,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


@pytest.mark.parametrize("io_binding", [False, True])
def test_greedy_matches_transformers(tiny: Tiny, engine: OnnxCausalLM, io_binding: bool) -> None:
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny.hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny.hf_dir).eval()
    bound = OnnxCausalLM.load(tiny.onnx_dir, name=tiny.kind, io_binding=io_binding)
    try:
        for prompt in PROMPTS:
            ids = hf_tok(prompt)["input_ids"]
            assert engine.encode(prompt) == ids
            expected = _hf_greedy(hf_model, ids, MAX_NEW)
            assert bound.generate_ids(ids, max_new_tokens=MAX_NEW) == expected, prompt
            gen = bound.generate(prompt, max_new_tokens=MAX_NEW)
            assert gen.text == hf_tok.decode([t for t in expected if t != 0], skip_special_tokens=True)
            assert gen.tokens_out == len(expected)
    finally:
        bound.close()


@pytest.fixture(scope="session")
def fused_llama(tiny_models: dict[str, Tiny], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama export rewritten by ``workers.fleet.fuse`` into a GroupQueryAttention graph."""
    pytest.importorskip("onnx")
    from workers.fleet.fuse import fuse_decoder

    fused = shutil.copytree(tiny_models["llama"].onnx_dir, tmp_path_factory.mktemp("gqa") / "fused")
    assert fuse_decoder(fused, PROMPTS, EOS)
    return fused


@pytest.mark.parametrize("mode", ["shared_kv", "copied_kv", "io_binding"])
def test_a_group_query_attention_graph_is_fed_its_sequence_lengths(tiny_models: dict[str, Tiny], fused_llama: Path,
                                                                   mode: str) -> None:
    """The Llama export rewritten by ``workers.fleet.fuse`` takes seqlens_k and total_sequence_length, not a
    mask: the engine feeds them and generates what the export does, with its KV cache in place (the
    default on CPU), returned anew each step, or bound step by step."""
    llama = tiny_models["llama"]
    engine = OnnxCausalLM.load(fused_llama, name="gqa", io_binding=mode == "io_binding",
                               shared_kv=mode == "shared_kv")
    export = OnnxCausalLM.load(llama.onnx_dir, name="export", io_binding=mode == "io_binding")
    try:
        assert (engine._shared is not None) == (mode == "shared_kv")
        assert export._shared is None  # an optimum export's cache grows by concatenation: nothing to share
        assert {"seqlens_k", "total_sequence_length"} <= engine._input_names
        assert "attention_mask" not in engine._input_names
        lengths = engine._small_inputs(3, 5)
        assert set(lengths) == {"seqlens_k", "total_sequence_length"}
        assert lengths["seqlens_k"].dtype == np.int32 and lengths["seqlens_k"].tolist() == [7]
        assert lengths["total_sequence_length"].dtype == np.int32 and lengths["total_sequence_length"].shape == ()
        assert int(lengths["total_sequence_length"]) == 8
        assert set(export._small_inputs(3, 5)) == {"attention_mask", "position_ids"}
        for prompt in PROMPTS:
            ids = engine.encode(prompt)
            assert engine.generate_ids(ids, max_new_tokens=MAX_NEW) == export.generate_ids(ids, max_new_tokens=MAX_NEW)
    finally:
        engine.close()
        export.close()


def test_the_shared_kv_cache_grows_and_carries_nothing_between_generations(
        fused_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers that start too small for a generation grow to fit it (at most the context); a short prompt after
    a long one, sampling, stop strings and EOS give what a cache returned anew each step gives."""
    monkeypatch.setattr("workers.engine._SHARED_KV_START", 4)
    shared = OnnxCausalLM.load(fused_llama, name="shared", shared_kv=True)
    copied = OnnxCausalLM.load(fused_llama, name="copied", shared_kv=False)
    try:
        assert shared._shared is not None and shared._shared.capacity == 4
        long_prompt = " ".join(PROMPTS * 2)
        for prompt in [long_prompt, "x", *PROMPTS, long_prompt]:
            a = shared.generate(prompt, max_new_tokens=MAX_NEW)
            b = copied.generate(prompt, max_new_tokens=MAX_NEW)
            assert (a.text, a.tokens_out, a.finish_reason) == (b.text, b.tokens_out, b.finish_reason), prompt
            assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
        assert shared._shared.capacity >= len(shared.encode(long_prompt)) + MAX_NEW
        assert shared.max_context is not None and shared._shared.capacity <= shared.max_context
        for seed in (1, 2):
            kwargs: dict[str, Any] = {"max_new_tokens": MAX_NEW, "temperature": 1.3, "seed": seed, "stop": ["7"]}
            assert shared.generate(PROMPTS[0], **kwargs).text == copied.generate(PROMPTS[0], **kwargs).text
        whole = shared.generate_ids([5], max_new_tokens=shared.max_context)  # up to the context: the largest buffer
        assert whole == copied.generate_ids([5], max_new_tokens=shared.max_context)
        assert shared._shared.capacity == shared.max_context
    finally:
        shared.close()
        copied.close()


def test_generation_fields(engine: OnnxCausalLM) -> None:
    assert isinstance(engine, Engine)
    assert engine.device == "cpu"
    assert engine.memory_bytes > 0 and engine.load_s > 0
    for prompt in PROMPTS:
        gen = engine.generate(prompt, max_new_tokens=MAX_NEW)
        assert isinstance(gen, Generation)
        assert gen.tokens_in == len(engine.encode(prompt))
        assert 1 <= gen.tokens_out <= MAX_NEW
        assert gen.finish_reason in ("eos", "length")
        assert (gen.finish_reason == "length") == (gen.tokens_out == MAX_NEW)
        assert 0.0 < gen.confidence <= 1.0
        assert gen.inference_ms > 0 and gen.cpu_s >= 0


@pytest.mark.parametrize("max_new", [0, 1, 5])
def test_max_new_tokens_respected(engine: OnnxCausalLM, max_new: int) -> None:
    gen = engine.generate(PROMPTS[0], max_new_tokens=max_new)
    assert gen.tokens_out <= max_new
    if max_new == 0:
        assert (gen.text, gen.confidence, gen.finish_reason) == ("", 0.0, "length")


def test_sampling_reproducible_with_seed(engine: OnnxCausalLM) -> None:
    differs = False
    for prompt in PROMPTS:
        a = engine.generate(prompt, max_new_tokens=MAX_NEW, temperature=1.0, seed=7)
        b = engine.generate(prompt, max_new_tokens=MAX_NEW, temperature=1.0, seed=7)
        c = engine.generate(prompt, max_new_tokens=MAX_NEW, temperature=1.0, seed=8)
        assert (a.text, a.tokens_out, a.confidence) == (b.text, b.tokens_out, b.confidence)
        assert 0.0 < a.confidence <= 1.0
        differs = differs or a.text != c.text
    assert differs


def test_stop_strings(engine: OnnxCausalLM) -> None:
    full = engine.generate(PROMPTS[1], max_new_tokens=MAX_NEW).text
    # An ASCII character first seen after the start: the output must end just before it.
    cut = next(i for i, ch in enumerate(full) if i > 0 and ch.isascii() and ch.isprintable() and ch not in full[:i])
    gen = engine.generate(PROMPTS[1], max_new_tokens=MAX_NEW, stop=[full[cut], "never-there"])
    assert (gen.text, gen.finish_reason) == (full[:cut], "stop")
    first = engine.generate(PROMPTS[1], max_new_tokens=MAX_NEW, stop=[full[: cut + 1]])
    assert (first.text, first.finish_reason) == ("", "stop")
    assert engine.generate(PROMPTS[1], max_new_tokens=MAX_NEW, stop=["", "never-there"]).text == full


def test_eos_token_override(tiny: Tiny, engine: OnnxCausalLM) -> None:
    first = engine.generate_ids(engine.encode(PROMPTS[0]), max_new_tokens=1)[0]
    token = engine._tokenizer.id_to_token(first)
    eng = OnnxCausalLM.load(tiny.onnx_dir, name="eos", eos_token=token)
    gen = eng.generate(PROMPTS[0], max_new_tokens=MAX_NEW)
    assert (gen.text, gen.tokens_out, gen.finish_reason) == ("", 1, "eos")
    with pytest.raises(EngineLoadError, match="not-a-token"):
        OnnxCausalLM.load(tiny.onnx_dir, name="bad", eos_token="not-a-token")


def test_prompt_longer_than_context(engine: OnnxCausalLM) -> None:
    assert engine.max_context == 128
    with pytest.raises(EngineError, match="context"):
        engine.generate("fox " * 200, max_new_tokens=4)


def test_concurrent_callers_are_serialised(engine: OnnxCausalLM) -> None:
    expected = [engine.generate(p, max_new_tokens=MAX_NEW).text for p in PROMPTS]
    got: dict[int, str] = {}

    def run(i: int) -> None:
        got[i] = engine.generate(PROMPTS[i], max_new_tokens=MAX_NEW).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(PROMPTS))] == expected


def test_missing_or_corrupt_files(tiny: Tiny, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny.onnx_dir, broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(EngineLoadError, match=str(broken / "model.onnx")):
        OnnxCausalLM.load(broken, name="broken")
    (broken / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(EngineLoadError, match=str(broken / "model.onnx")):
        OnnxCausalLM.load(broken, name="broken")
    shutil.copy(tiny.onnx_dir / "model.onnx", broken / "model.onnx")
    (broken / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(EngineLoadError, match=str(broken / "tokenizer.json")):
        OnnxCausalLM.load(broken, name="broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(EngineLoadError, match=str(broken / "tokenizer.json")):
        OnnxCausalLM.load(broken, name="broken")


def test_close_then_generate_raises(tiny: Tiny) -> None:
    eng = OnnxCausalLM.load(tiny.onnx_dir, name="closing")
    eng.close()
    eng.close()
    with pytest.raises(EngineError, match="closed"):
        eng.generate("x", max_new_tokens=1)


def test_devices(tiny: Tiny) -> None:
    auto = OnnxCausalLM.load(tiny.onnx_dir, name="auto", device="auto")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert auto.device == ("cuda" if has_cuda else "cpu")
    auto.close()
    with pytest.raises(EngineError, match="unknown device"):
        OnnxCausalLM.load(tiny.onnx_dir, name="tpu", device="tpu")
    if not has_cuda:
        with pytest.raises(EngineError, match="CUDA"):
            OnnxCausalLM.load(tiny.onnx_dir, name="cuda", device="cuda")


def test_no_torch_at_run_time(tiny: Tiny) -> None:
    """The engine alone must not pull torch or transformers (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from workers.engine import OnnxCausalLM; "
        f"e = OnnxCausalLM.load(Path({str(tiny.onnx_dir)!r}), name='t'); e.generate('x', max_new_tokens=2); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_greedy_choice_reports_the_softmax_probability_of_the_argmax() -> None:
    from workers.engine import _choose

    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = (rng.standard_normal(1024) * rng.uniform(0.1, 20)).astype(np.float32)
        shifted = logits.astype(np.float64) - logits.max()
        probs = np.exp(shifted) / np.exp(shifted).sum()
        token, prob = _choose(logits, 0.0, None)
        assert token == int(np.argmax(logits))
        assert prob == pytest.approx(probs[token], rel=1e-6)
