"""The router's sentence embedder: an ONNX export of all-MiniLM-L6-v2, mean-pooled and L2-normalised.

Texts are cut to their first ``max_tokens`` tokens ([CLS] and [SEP] included): the embedder's cost
grows with every token, and a prompt's opening says which domain it belongs to. ``embed_marked`` says
which texts were embedded whole, for uses that must not mistake two texts with one opening for one.
"""

from __future__ import annotations

import functools
import hashlib
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MAX_TOKENS = 256  # the default cut; MiniLM was trained on texts up to this long
MIN_TOKENS = 3  # [CLS], one token, [SEP]
RUN_BATCH = 32  # texts per model run


class EmbedderError(RuntimeError):
    """The embedder files are missing or unusable."""


def embedder_dir(fleet_dir: Path) -> Path:
    """Where a fleet keeps its embedder (``[fleet] embedder`` in fleet.toml, default ``embedder``)."""
    manifest = fleet_dir / "fleet.toml"
    try:
        with manifest.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as e:
        raise EmbedderError(f"{manifest}: no such file; build a fleet with 'calm fleet build'") from e
    except tomllib.TOMLDecodeError as e:
        raise EmbedderError(f"{manifest}: invalid TOML: {e}") from e
    rel = data.get("fleet", {}).get("embedder", "embedder")
    return fleet_dir / str(rel)


class SentenceEmbedder:
    """Embeds batches of texts into unit vectors (float32)."""

    def __init__(self, model_dir: Path, threads: int = 1, max_tokens: int = MAX_TOKENS) -> None:
        if not MIN_TOKENS <= max_tokens <= 512:
            raise EmbedderError(f"max_tokens must be {MIN_TOKENS}-512, got {max_tokens}")
        model = model_dir / "model.onnx"
        tok = model_dir / "tokenizer.json"
        for path in (model, tok):
            if not path.is_file():
                raise EmbedderError(f"embedder file missing: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EmbedderError(f"cannot load {model}: {e}") from e
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(tok))
        self._tokenizer.enable_truncation(max_tokens)
        self.max_tokens = max_tokens
        self._tokenizer.enable_padding()
        self.dim = int(self._session.get_outputs()[0].shape[-1] or 384)
        self._files = (model, tok)

    @functools.cached_property
    def identity(self) -> str:
        """A digest of what the embeddings depend on: the graph, the vocabulary (read on first use), the cut."""
        digest = _digest(*self._files)
        return digest if self.max_tokens == MAX_TOKENS else f"{digest}:{self.max_tokens}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A ``(len(texts), dim)`` float32 matrix of L2-normalised embeddings."""
        return self.embed_marked(texts)[0]

    def embed_marked(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``embed(texts)`` and a boolean vector: True where a text fit in ``max_tokens`` (embedded whole).

        Texts go through the model ``RUN_BATCH`` at a time: one run over hundreds of long texts would
        pad them all to the longest and hold gigabytes of attention activations.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros(0, dtype=bool)
        parts = [self._embed(texts[i:i + RUN_BATCH]) for i in range(0, len(texts), RUN_BATCH)]
        if len(parts) == 1:
            return parts[0]
        return np.vstack([v for v, _ in parts]), np.concatenate([w for _, w in parts])

    def _embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts))
        whole = np.array([not e.overflowing for e in encodings], dtype=bool)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32), whole


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
