"""``OnnxCausalLM``: causal-LM generation with a plain onnxruntime loop and a KV cache.

Serves models exported by optimum with task ``text-generation-with-past`` (a directory holding
``model.onnx``, ``tokenizer.json`` and ``config.json``; GPT-2 and Llama families at least), and
the GroupQueryAttention graphs ``workers.fleet.fuse`` rewrites them into, which take the sequence
lengths (``seqlens_k``, ``total_sequence_length``) instead of ``attention_mask``. Only onnxruntime,
``tokenizers`` and numpy are used at run time: no torch, no transformers.

Inputs are fed by name (GPT-2 and Llama exports order them differently). On CPU each step is a
plain ``session.run`` with numpy arrays, except for GroupQueryAttention graphs: their KV cache lives in
one preallocated buffer per ``past_key_values.*`` input, bound once (``IOBinding``) as both that input
and its ``present.*`` output, so each step writes its keys and values in place instead of returning a
grown copy of the whole cache, and the last logits land in a bound array (``_SharedKv``). On CUDA each
step goes through an ``IOBinding``: the ``present.*`` outputs stay on the GPU and are bound as the
next step's ``past_key_values.*``; only the last logits come back to the host.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from workers.engine_api import Generation
from workers.errors import EngineError, EngineLoadError

__all__ = ["OnnxCausalLM"]

log = logging.getLogger(__name__)

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
_KNOWN_INPUTS = {"input_ids", "attention_mask", "position_ids", "token_type_ids", "seqlens_k", "total_sequence_length"}
_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_SHARED_KV_START = 1024  # positions a shared KV buffer starts with (it grows to the context when asked)
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True)
class _KvSpec:
    """Shape and dtype of the zero-length past fed at the first step."""

    names: tuple[str, ...]  # past_key_values.N.key/value input names, in graph order
    present_to_past: dict[str, str]  # output name -> input name it feeds at the next step
    kv_heads: int
    head_dim: int
    dtype: type[np.generic]


class _SharedKv:
    """A GroupQueryAttention graph's KV cache in place: one buffer per layer's keys and values, bound as the
    ``past_key_values.*`` input and as its ``present.*`` output (the op then writes the step's keys and values
    into it and copies nothing), with the step's token, the two lengths and the logits bound as arrays that
    each step writes or reads in place.

    The buffers hold ``capacity`` positions and grow (to the model's context at most) when a generation needs
    more; nothing in them outlives a generation, so growing copies nothing.
    """

    def __init__(self, session: ort.InferenceSession, kv: _KvSpec, logits: np.ndarray, capacity: int,
                 limit: int) -> None:
        self.limit = limit  # the model's context: the buffers never grow past it
        self.token = np.zeros((1, 1), dtype=np.int64)
        self.seqlens = np.zeros((1,), dtype=np.int32)  # total length - 1
        self.total = np.zeros((), dtype=np.int32)
        self.logits = logits  # [1, 1, vocab] in the graph's logits type
        self._session = session
        self._kv = kv
        self.binding = session.io_binding()
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self.token)  # wraps the array's memory on CPU
        self.binding.bind_ortvalue_input("input_ids", self._token_value)
        self.binding.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self.seqlens))
        self.binding.bind_ortvalue_input("total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self.total))
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self._buffers: dict[str, ort.OrtValue] = {}
        self.capacity = 0
        self.reserve(capacity)

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions (prompt + new tokens), at most the model's context."""
        if positions <= self.capacity:
            return
        capacity = min(max(positions, 2 * self.capacity), self.limit)
        kv = self._kv
        buffers = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv.kv_heads, capacity, kv.head_dim), kv.dtype))
                   for name in kv.names}
        for name, value in buffers.items():
            self.binding.bind_ortvalue_input(name, value)
        for present, past in kv.present_to_past.items():
            self.binding.bind_ortvalue_output(present, buffers[past])
        self._buffers = buffers  # the OrtValues own their arrays' references: keep them alive while bound
        self.capacity = capacity

    def step(self, input_ids: np.ndarray, position: int) -> np.ndarray:
        """Run one forward pass over ``input_ids`` at ``position``; returns the last position's logits (a view
        the next step overwrites)."""
        seq = int(input_ids.shape[1])
        total = position + seq
        self.seqlens[0] = total - 1
        self.total[()] = total
        if seq == 1:
            self.token[0, 0] = input_ids[0, 0]
            self._session.run_with_iobinding(self.binding)
        else:  # a prompt: bound for this run only, then the one-token array again
            self.binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(input_ids))
            try:
                self._session.run_with_iobinding(self.binding)
            finally:
                self.binding.bind_ortvalue_input("input_ids", self._token_value)
        return self.logits[0, 0]


def _shared_logits(session: ort.InferenceSession, inputs: frozenset[str], kv: _KvSpec) -> np.ndarray | None:
    """The array a step's logits land in when ``session`` is a GroupQueryAttention graph ``_SharedKv`` can run:
    the two length inputs and nothing else beside ``input_ids`` and the past (``inputs`` are the graph's input
    names), logits of the last position only ([batch, 1, vocab], a float type); None otherwise."""
    logits = session.get_outputs()[0]
    dtype = _ORT_DTYPES.get(logits.type)
    shape = logits.shape
    if (inputs - set(kv.names) != {"input_ids", "seqlens_k", "total_sequence_length"} or dtype is None
            or len(shape) != 3 or shape[1] != 1 or not isinstance(shape[2], int)):
        return None
    return np.zeros((1, 1, shape[2]), dtype=dtype)


class OnnxCausalLM:
    """A causal LM served by onnxruntime; implements ``workers.engine_api.Engine``.

    Not re-entrant: a lock serialises ``generate`` and ``close``, so concurrent callers wait their
    turn. Confidence is the mean probability of the chosen tokens, taken from the softmax at
    temperature 1 when decoding greedily and at the sampling temperature otherwise.
    """

    def __init__(
        self,
        *,
        name: str,
        device: str,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        kv: _KvSpec,
        eos_ids: frozenset[int],
        max_context: int | None,
        memory_bytes: int,
        load_s: float,
        gpu_index: int = 0,
        io_binding: bool = False,
        shared_kv: bool = False,
    ) -> None:
        """Wrap an already built session; use ``OnnxCausalLM.load`` instead."""
        self.name = name
        self.device = device
        self.load_s = load_s
        self.max_context = max_context  # prompt + generated tokens, None when unknown
        self.eos_ids = eos_ids
        self._session: ort.InferenceSession | None = session
        self._tokenizer = tokenizer
        self._kv = kv
        self._memory_bytes = memory_bytes
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._gpu_index = gpu_index if device == "cuda" else 0
        self._input_names = frozenset(i.name for i in session.get_inputs())
        self._output_names = [o.name for o in session.get_outputs()]
        # Where each past_key_values input's next value is among the outputs, in the inputs' order.
        self._past_from_output = tuple(self._output_names.index(present) for past in kv.names
                                       for present, fed in kv.present_to_past.items() if fed == past)
        self._feeds_mask = "attention_mask" in self._input_names
        self._feeds_positions = "position_ids" in self._input_names
        self._feeds_token_types = "token_type_ids" in self._input_names
        self._feeds_seqlens = "seqlens_k" in self._input_names
        self._feeds_total = "total_sequence_length" in self._input_names
        self._io_binding = io_binding
        self._shared: _SharedKv | None = None  # needs a known context: the buffers' bound
        if shared_kv and not io_binding and device == "cpu" and max_context is not None:
            logits = _shared_logits(session, self._input_names, kv)
            if logits is not None:
                self._shared = _SharedKv(session, kv, logits, min(max_context, _SHARED_KV_START), max_context)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        name: str,
        device: str = "cpu",
        intra_op_threads: int = 1,
        eos_token: str | None = None,
        gpu_index: int = 0,
        io_binding: bool | None = None,
        shared_kv: bool = True,
    ) -> OnnxCausalLM:
        """Load ``model_dir`` on ``device`` ("cpu", "cuda" or "auto": CUDA when available).

        ``gpu_index`` picks the CUDA device; ``io_binding`` keeps the KV cache on the device
        between steps (default: on for CUDA, off for CPU, where plain runs are faster).
        ``shared_kv`` runs a GroupQueryAttention graph on CPU with its KV cache in place (``_SharedKv``);
        other graphs, and this one with ``shared_kv=False``, return a new cache each step.

        Raises ``EngineLoadError`` naming the file when ``model.onnx``, ``tokenizer.json`` or a
        needed ``config.json`` is missing or unreadable, and ``EngineError`` when CUDA was asked
        for but onnxruntime has no CUDA execution provider.
        """
        model_dir = Path(model_dir)
        started = time.perf_counter()
        providers, used = _providers(device, gpu_index)
        model_path = model_dir / "model.onnx"
        tok_path = model_dir / "tokenizer.json"
        for path in (model_path, tok_path):
            if not path.is_file():
                raise EngineLoadError(f"{name}: missing {path}")
        config = _read_json(model_dir / "config.json", required=False)
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise EngineLoadError(f"{name}: cannot read tokenizer {tok_path}: {e}") from e

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Many engines share a process: idle intra-op threads must not spin on the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

        mem_before = _memory_used(used, gpu_index)
        try:
            session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as e:
            raise EngineLoadError(f"{name}: cannot load {model_path}: {e}") from e
        if used == "cuda" and _CUDA_EP not in session.get_providers():
            raise EngineError(f"{name}: onnxruntime did not enable {_CUDA_EP} for {model_path}")
        kv = _kv_spec(session, config, model_path)
        _check_vocab(session, config, tokenizer, tok_path, name)
        eos_ids = _eos_ids(model_dir, config, tokenizer, eos_token, name)
        engine = cls(
            name=name,
            device=used,
            session=session,
            tokenizer=tokenizer,
            kv=kv,
            eos_ids=eos_ids,
            max_context=_max_context(config),
            memory_bytes=0,
            load_s=0.0,
            gpu_index=gpu_index,
            io_binding=(used == "cuda") if io_binding is None else io_binding,
            shared_kv=shared_kv,
        )
        # One tiny step so lazy allocations (arena, CUDA kernels) happen at load, not at the
        # first query, and show up in the memory measurement.
        try:
            engine._step(np.zeros((1, 1), dtype=np.int64), None, 0)
        except EngineError as e:
            raise EngineLoadError(f"{name}: first run of {model_path} failed: {e}") from e
        weights = sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))
        engine._memory_bytes = max(_memory_used(used, gpu_index) - mem_before, weights)
        engine.load_s = time.perf_counter() - started
        log.info(
            "loaded %s on %s in %.3f s (%.1f MB, eos=%s)",
            name,
            used,
            engine.load_s,
            engine._memory_bytes / 1e6,
            sorted(eos_ids),
        )
        return engine

    # ------------------------------------------------------------------ Engine API

    @property
    def memory_bytes(self) -> int:
        """Bytes measured at load: RSS delta on CPU, device-memory delta (NVML) on CUDA.

        Never less than the size of the weight files. The delta is process- or device-wide, so a
        concurrent load elsewhere inflates it; on CUDA the first model also carries the CUDA
        context.
        """
        return self._memory_bytes

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Generation:
        """Continue ``prompt`` by at most ``max_new_tokens`` tokens.

        Greedy when ``temperature == 0``; otherwise samples from softmax(logits / temperature)
        with ``numpy.random.default_rng(seed)``. Stops at an EOS token ("eos"), at
        ``max_new_tokens`` or the model's context ("length"), or when a ``stop`` string appears
        ("stop", the text is cut before it). ``tokens_out`` counts every token sampled, a final
        EOS included; ``text`` never contains the EOS token. ``cpu_s`` is this thread's CPU time,
        so with ``intra_op_threads > 1`` the pool threads' share is not in it.
        """
        with self._lock:  # timed inside: waiting for another caller is not inference
            wall0 = time.perf_counter()
            cpu0 = time.thread_time()
            self._check_open()
            ids = self._tokenizer.encode(prompt).ids
            out, probs, reason, text = self._decode(ids, max_new_tokens, temperature, seed, stop)
            inference_ms = (time.perf_counter() - wall0) * 1000.0
            cpu_s = time.thread_time() - cpu0
        return Generation(
            text=text,
            tokens_in=len(ids),
            tokens_out=len(out),
            confidence=float(np.mean(probs)) if probs else 0.0,
            inference_ms=inference_ms,
            finish_reason=reason,
            cpu_s=cpu_s,
        )

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[int]:
        """Generate from token ids; returns the sampled ids (a final EOS included)."""
        with self._lock:
            self._check_open()
            out, _, _, _ = self._decode(list(prompt_ids), max_new_tokens, temperature, seed, ())
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as ``generate`` would see them."""
        return list(self._tokenizer.encode(text).ids)

    def close(self) -> None:
        """Drop the session (waiting for a running ``generate``); idempotent."""
        with self._lock:
            if self._session is not None:
                self._session = None
                self._shared = None
                log.info("closed %s", self.name)

    def __repr__(self) -> str:
        state = "closed" if self._session is None else "open"
        return f"OnnxCausalLM(name={self.name!r}, device={self.device!r}, {state})"

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._session is None:
            raise EngineError(f"engine {self.name!r} is closed")

    def _decode(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> tuple[list[int], list[float], str, str]:
        """The generation loop; returns (sampled ids, their probabilities, finish reason, text)."""
        if max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0.0 or math.isinf(temperature):
            raise EngineError(f"temperature must be a finite number >= 0, got {temperature}")
        if not ids:
            raise EngineError("the prompt encodes to no tokens")
        budget = max_new_tokens
        if self.max_context is not None:
            if len(ids) >= self.max_context:
                raise EngineError(
                    f"prompt of {len(ids)} tokens does not fit {self.name!r}'s context of {self.max_context} tokens"
                )
            budget = min(budget, self.max_context - len(ids))
        rng = np.random.default_rng(seed) if temperature > 0.0 else None
        stops = [s for s in stop if s]
        out: list[int] = []
        probs: list[float] = []
        reason = "length"
        cut: int | None = None
        text = ""
        past: list[Any] | None = None
        feed = np.asarray([ids], dtype=np.int64)
        position = 0
        if self._shared is not None:
            self._shared.reserve(len(ids) + budget)
        while len(out) < budget:
            logits, past = self._step(feed, past, position)
            position += feed.shape[1]
            token, prob = _choose(logits, temperature, rng)
            out.append(token)
            probs.append(prob)
            if token in self.eos_ids:
                reason = "eos"
                break
            if stops:
                prev = len(text)
                text = self._tokenizer.decode(out)
                cut = _find_stop(text, stops, prev)
                if cut is not None:
                    reason = "stop"
                    break
            feed = np.asarray([[token]], dtype=np.int64)
        body = out[:-1] if reason == "eos" else out
        text = self._tokenizer.decode(body) if cut is None else text[:cut]
        return out, probs, reason, text

    def _step(self, input_ids: np.ndarray, past: list[Any] | None, position: int) -> tuple[np.ndarray, list[Any]]:
        """Run one forward pass; returns the last position's logits and the new KV cache."""
        session = self._session
        assert session is not None
        try:
            if self._shared is not None:
                return self._shared.step(input_ids, position), []
            if self._io_binding:
                return self._step_bound(session, input_ids, past, position)
            return self._step_plain(session, input_ids, past, position)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"{self.name}: onnxruntime failed: {e}") from e

    def _small_inputs(self, seq: int, position: int) -> dict[str, np.ndarray]:
        """attention_mask, position_ids, token_type_ids, seqlens_k (int32 [1]: total length - 1) and
        total_sequence_length (int32 scalar), as far as the graph takes them."""
        feeds: dict[str, np.ndarray] = {}
        total = position + seq
        if self._feeds_mask:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if self._feeds_positions:
            feeds["position_ids"] = np.arange(position, total, dtype=np.int64)[None, :]
        if self._feeds_token_types:
            feeds["token_type_ids"] = np.zeros((1, seq), dtype=np.int64)
        if self._feeds_seqlens:
            feeds["seqlens_k"] = np.array([total - 1], dtype=np.int32)
        if self._feeds_total:
            feeds["total_sequence_length"] = np.array(total, dtype=np.int32)
        return feeds

    def _empty_past(self) -> np.ndarray:
        kv = self._kv
        return np.zeros((1, kv.kv_heads, 0, kv.head_dim), dtype=kv.dtype)

    def _step_plain(
        self,
        session: ort.InferenceSession,
        input_ids: np.ndarray,
        past: list[Any] | None,
        position: int,
    ) -> tuple[np.ndarray, list[Any]]:
        kv = self._kv
        feeds = self._small_inputs(int(input_ids.shape[1]), position)
        feeds["input_ids"] = input_ids
        if past is None:
            empty = self._empty_past()
            feeds.update((name, empty) for name in kv.names)
        else:
            feeds.update(zip(kv.names, past, strict=True))
        # The Python wrapper's run checks every input name against the graph on each call (about 10 us, 5-10 %
        # of a small model's step here); the inputs were checked once at load, so the compiled session under
        # it runs the step when this onnxruntime has one (``_sess``), and the wrapper otherwise.
        compiled = getattr(session, "_sess", None)
        if compiled is not None:
            outputs = compiled.run(self._output_names, feeds, None)
        else:
            outputs = session.run(self._output_names, feeds)
        return outputs[0][0, -1], [outputs[i] for i in self._past_from_output]

    def _step_bound(
        self,
        session: ort.InferenceSession,
        input_ids: np.ndarray,
        past: list[Any] | None,
        position: int,
    ) -> tuple[np.ndarray, list[Any]]:
        seq = int(input_ids.shape[1])
        kv = self._kv
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        for name, value in self._small_inputs(seq, position).items():
            binding.bind_cpu_input(name, value)
        if past is None:
            empty = self._empty_past()
            for name in kv.names:
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(kv.names, past, strict=True):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for out_name in kv.present_to_past:
            binding.bind_output(out_name, self._ort_device, self._gpu_index)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        # Bound in the graph's output order (logits, then the presents), so the plain step's KV order applies.
        return outputs[0].numpy()[0, -1], [outputs[i] for i in self._past_from_output]


# ---------------------------------------------------------------------- helpers


def _providers(device: str, gpu_index: int) -> tuple[list[Any], str]:
    """Execution providers for ``device`` and the device they amount to ("cpu" or "cuda")."""
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if _CUDA_EP in available else "cpu"
    if device == "cpu":
        return [_CPU_EP], "cpu"
    if device == "cuda":
        preload = getattr(ort, "preload_dlls", None)  # CUDA/cuDNN from the nvidia-* wheels, if installed
        if preload is not None and _CUDA_EP in available:
            try:
                preload()
            except Exception as e:  # a system CUDA install works without it
                log.debug("onnxruntime.preload_dlls failed: %s", e)
        if _CUDA_EP not in available:
            raise EngineError(
                f"device 'cuda' asked for but {_CUDA_EP} is not available (onnxruntime {ort.__version__} "
                f"offers {available}); install onnxruntime-gpu instead of onnxruntime, or use device 'cpu'"
            )
        return [(_CUDA_EP, {"device_id": gpu_index}), _CPU_EP], "cuda"
    raise EngineError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'auto'")


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    """A JSON object from ``path``; {} when absent and not required."""
    if not path.is_file():
        if required:
            raise EngineLoadError(f"missing {path}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise EngineLoadError(f"{path} does not hold a JSON object")
    return data


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _kv_spec(session: ort.InferenceSession, config: dict[str, Any], model_path: Path) -> _KvSpec:
    """Check the graph's inputs/outputs and work out the KV cache's layout."""
    inputs = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    past = [i for i in inputs if _PAST_RE.match(i.name)]
    unknown = [i.name for i in inputs if i.name not in _KNOWN_INPUTS and not _PAST_RE.match(i.name)]
    if "input_ids" not in {i.name for i in inputs} or unknown:
        raise EngineLoadError(
            f"{model_path}: unsupported inputs {unknown or [i.name for i in inputs]}; expected an "
            "optimum export with task text-generation-with-past"
        )
    if not past:
        raise EngineLoadError(f"{model_path}: no past_key_values inputs; export with task text-generation-with-past")
    if not outputs or outputs[0] != "logits":
        raise EngineLoadError(f"{model_path}: first output is {outputs[:1]}, expected 'logits'")
    present_to_past: dict[str, str] = {}
    for out in outputs[1:]:
        m = _PRESENT_RE.match(out)
        if m is None:
            raise EngineLoadError(f"{model_path}: unexpected output {out!r}")
        present_to_past[out] = f"past_key_values.{m.group(1)}.{m.group(2)}"
    if sorted(present_to_past.values()) != sorted(i.name for i in past):
        raise EngineLoadError(f"{model_path}: present.* outputs do not match past_key_values.* inputs")

    shape = past[0].shape  # [batch, kv_heads, past_len, head_dim]
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
    kv_heads = (
        shape[1]
        if isinstance(shape[1], int)
        else _first_int(config, "num_key_value_heads", "num_attention_heads", "n_head", "num_heads")
    )
    head_dim = shape[3] if isinstance(shape[3], int) else _first_int(config, "head_dim")
    if head_dim is None and hidden is not None and heads:
        head_dim = hidden // heads
    if kv_heads is None or head_dim is None:
        raise EngineLoadError(f"{model_path.parent / 'config.json'}: cannot work out num_key_value_heads/head_dim")
    dtype = _ORT_DTYPES.get(past[0].type)
    if dtype is None:
        raise EngineLoadError(f"{model_path}: unsupported KV cache type {past[0].type}")
    return _KvSpec(
        names=tuple(i.name for i in past),
        present_to_past=present_to_past,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dtype=dtype,
    )


def _check_vocab(session: ort.InferenceSession, config: dict[str, Any], tokenizer: Tokenizer, tok_path: Path,
                 name: str) -> None:
    """Refuse a tokenizer with ids the model has no logits (and no embeddings) for: one from another model."""
    last = session.get_outputs()[0].shape[-1]
    vocab = last if isinstance(last, int) else _first_int(config, "vocab_size")
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if vocab and top >= vocab:
        raise EngineLoadError(f"{name}: {tok_path} has token ids up to {top} but the model has {vocab}; "
                              "is it another model's tokenizer?")


def _max_context(config: dict[str, Any]) -> int | None:
    return _first_int(config, "max_position_embeddings", "n_positions", "n_ctx")


def _eos_ids(
    model_dir: Path,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    eos_token: str | None,
    name: str,
) -> frozenset[int]:
    """EOS ids: ``eos_token`` if given, else config.json, generation_config.json, tokenizer_config.json."""
    if eos_token is not None:
        token_id = tokenizer.token_to_id(eos_token)
        if token_id is None:
            raise EngineLoadError(f"{name}: eos_token {eos_token!r} is not in {model_dir / 'tokenizer.json'}")
        return frozenset({token_id})
    found: set[int] = set()
    gen_config = _read_json(model_dir / "generation_config.json", required=False)
    for source in (config, gen_config):
        value = source.get("eos_token_id")
        if isinstance(value, int) and not isinstance(value, bool):
            found.add(value)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, int))
    tok_config = _read_json(model_dir / "tokenizer_config.json", required=False)
    tok_eos = tok_config.get("eos_token")
    if isinstance(tok_eos, dict):
        tok_eos = tok_eos.get("content")
    if isinstance(tok_eos, str) and (token_id := tokenizer.token_to_id(tok_eos)) is not None:
        found.add(token_id)
    if not found:
        log.warning("%s: no EOS token found; generation stops only at max_new_tokens or stop", name)
    return frozenset(found)


def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> tuple[int, float]:
    """Pick the next token and its probability (softmax at T=1 when greedy, at T otherwise)."""
    if rng is None:  # the argmax's probability is 1 / sum(exp(logits - its logit)): no normalised vector needed
        token = int(logits.argmax())
        return token, float(1.0 / np.exp(logits - logits[token]).sum(dtype=np.float64))
    scores = logits.astype(np.float64) / temperature
    scores -= scores.max()
    p = np.exp(scores)
    p /= p.sum()
    token = int(rng.choice(p.shape[0], p=p))
    return token, float(p[token])


def _find_stop(text: str, stops: Sequence[str], searched: int) -> int | None:
    """Index of the earliest stop string in ``text`` not wholly inside ``text[:searched]``."""
    hits = []
    for s in stops:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None


def _memory_used(device: str, gpu_index: int) -> int:
    """Process RSS on CPU, device memory in use (NVML) on CUDA; 0 when it cannot be read."""
    if device == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
                return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # NVML missing or failing: memory falls back to file size
            log.debug("NVML memory read failed: %s", e)
            return 0
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
