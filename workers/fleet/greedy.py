"""A minimal greedy decoder over an exported causal LM (`model.onnx` with KV cache + `tokenizer.json`).

Runtime-safe (onnxruntime, numpy, tokenizers; no torch). The builder uses it to measure held-out
quality of the exact files it ships; serving uses the production engine instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class GreedyOnnx:
    """Greedy decoding with a KV cache; inputs are fed by name, so input order does not matter."""

    def __init__(self, model_dir: Path, eos_token: str = "<|endoftext|>", threads: int = 2) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        eos = self.tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"{model_dir}/tokenizer.json has no token {eos_token!r}")
        self.eos_id = int(eos)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted(n for n in self.inputs if n.startswith("past_key_values."))
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.inputs[self.past_names[0]] if self.past_names else None
        self.kv_heads = int(first.shape[1]) if first is not None else 0
        self.head_dim = int(first.shape[3]) if first is not None else 0
        self.kv_dtype = np.float16 if first is not None and "float16" in first.type else np.float32

    def _feed(self, ids: list[int], past: dict[str, Any], total: int) -> dict[str, Any]:
        """One step's inputs: the new ids, the positions or lengths the graph takes, and the KV cache.

        An export takes ``attention_mask`` (and ``position_ids``); a GroupQueryAttention graph of
        ``workers.fleet.gqa_graph`` takes ``seqlens_k`` (total - 1) and ``total_sequence_length`` instead.
        """
        n = len(ids)
        feed: dict[str, Any] = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(total - n, total, dtype=np.int64)[None, :]
        if "seqlens_k" in self.inputs:
            feed["seqlens_k"] = np.array([total - 1], dtype=np.int32)
        if "total_sequence_length" in self.inputs:
            feed["total_sequence_length"] = np.array(total, dtype=np.int32)
        feed.update(past)
        return feed

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, stop_chars: int | None = None) -> list[int]:
        """Greedy continuation ids (EOS excluded); stop at EOS, `max_new_tokens`, or `stop_chars` decoded chars."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        past = {name: empty for name in self.past_names}
        ids = list(prompt_ids) or [self.eos_id]
        total = len(ids)
        out: list[int] = []
        step_ids = ids
        for _ in range(max_new_tokens):
            results = self.session.run(self.output_names, self._feed(step_ids, past, total))
            named = dict(zip(self.output_names, results, strict=True))
            nxt = int(np.argmax(named["logits"][0, -1]))
            if nxt == self.eos_id:
                break
            out.append(nxt)
            if stop_chars is not None and len(self.tokenizer.decode(out)) >= stop_chars:
                break
            past = {n: named[n.replace("past_key_values.", "present.")] for n in self.past_names}
            step_ids = [nxt]
            total += 1
        return out

    def generate(self, prompt: str, max_new_tokens: int = 32, stop_chars: int | None = None) -> str:
        """Greedy continuation text of `prompt` (the prompt is encoded with no added tokens)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return self.tokenizer.decode(self.generate_ids(ids, max_new_tokens, stop_chars))
