"""Operator fusion of exported decoders: the same model in fewer, larger ONNX nodes.

A small decoder's step is mostly per-node overhead (a 0.7 M-parameter model: 326 nodes after
onnxruntime's own optimisations, ~0.5-0.8 ms a step on a 2-core machine). Two rewrites, tried in turn:

1. ``workers.fleet.gqa_graph`` rebuilds a Llama export around ``GroupQueryAttention`` (~11 nodes a
   layer): 0.63 × the CPU time per token of rewrite 2 on a 0.7 M model, 0.71 × on 1.6 M, 0.77-0.80 ×
   on the demo generalist's shape (random weights, 2026-11-30, one 2-core machine);
2. onnxruntime's transformer optimizer fuses RMSNorm with its residual add and the rotary embeddings
   into contrib ops (``SkipSimplifiedLayerNormalization``, ``RotaryEmbedding``): 0.79-0.84 × the
   export's CPU time per continuation on the demo's specialists, 0.86-0.88 on its generalist's shape.

A rewritten graph replaces the current one only when greedy continuations of the probe prompts are
token for token the current graph's; a graph fused by an older version of this module is rewritten
again from itself (the weights are read from the graph; no checkpoint is needed). The rebuild's graphs
of version 2 computed GroupQueryAttention's sequence lengths from an ``attention_mask`` input in six
nodes (a few microseconds each a step); version 3 takes them as inputs. The rebuild cannot read its own
graphs' weights back, so a version-2 graph is first converted, its six nodes replaced by the two inputs
(``gqa_graph.lengths_as_inputs``), under the same probe check.

Build-time only: needs ``onnx`` (the ``build`` extra).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.fleet.data import read_eval_set
from workers.fleet.greedy import GreedyOnnx
from workers.fleet.spec import MODEL_FILE

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

FUSED_KEY = "calm.fused"  # metadata_props entry of a graph this module fused
FUSED_VERSION = "3"  # 1: optimizer fusion only; 2: GroupQueryAttention rebuild first; 3: sequence lengths fed as inputs
LENGTHS_FROM_MASK_VERSION = "2"  # its GroupQueryAttention graphs compute the lengths from attention_mask
PROBE_TOKENS = 24  # greedy tokens compared per probe prompt
PROBES_PER_DOMAIN = 16  # held-out prompts per domain among the probes
ROTARY_CACHES = ("cos_cache", "sin_cache")


def fusion_available() -> bool:
    """Whether this environment can fuse graphs (``onnx`` and onnxruntime's transformer tools import)."""
    try:
        import onnx  # noqa: F401
        from onnxruntime.transformers import optimizer  # noqa: F401
    except ImportError:
        return False
    return True


def probe_prompts(examples: Sequence[str], eval_sets: Sequence[Path]) -> list[str]:
    """A model's probes: its card examples and the first ``PROBES_PER_DOMAIN`` prompts of each eval set."""
    probes = list(examples)
    for path in eval_sets:
        probes += [item.prompt for item in read_eval_set(path)[:PROBES_PER_DOMAIN]]
    return probes


def fused_version(onnx_path: Path) -> str | None:
    """The version of this module that fused ``onnx_path`` (None: not fused; read from its metadata)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == FUSED_KEY), None)


def is_fused(onnx_path: Path) -> bool:
    """Whether ``onnx_path`` is a graph the current version of this module fused."""
    return fused_version(onnx_path) == FUSED_VERSION


def fuse_decoder(model_dir: Path, probes: Sequence[str], eos_token: str) -> bool:
    """Rewrite ``model_dir/model.onnx`` in place; True when the directory now holds a current fused graph.

    A version-2 graph is first converted to take its sequence lengths as inputs; then the
    GroupQueryAttention rebuild is tried, then the optimizer's fusion. The first candidate that
    continues every probe exactly as the current graph does (greedy, ``PROBE_TOKENS`` tokens) replaces
    it. When none does, the graph stays and a warning says why.
    """
    import onnx

    model_dir = Path(model_dir)
    onnx_path = model_dir / MODEL_FILE
    version = fused_version(onnx_path)
    if version == FUSED_VERSION:
        return True
    if not probes:
        raise ValueError(f"{model_dir}: no probe prompts to check the fused graph against")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rewrites: list[tuple[str, Callable[[Path, dict[str, Any]], onnx.ModelProto]]] = [
        ("GroupQueryAttention", _gqa_graph), ("optimizer", _fused_graph)]
    if version == LENGTHS_FROM_MASK_VERSION:
        rewrites.insert(0, ("lengths as inputs", _lengths_graph))
    for kind, build in rewrites:
        try:
            graph = build(onnx_path, config)
        except ValueError as e:  # not a graph this rewrite reads (another architecture, rope scaling)
            log.info("%s: no %s graph: %s", model_dir, kind, e)
            continue
        with tempfile.TemporaryDirectory(prefix=".fuse-", dir=model_dir) as tmp:
            candidate = Path(tmp)
            for name in ("tokenizer.json", "config.json"):
                shutil.copy2(model_dir / name, candidate / name)
            onnx.save(graph, str(candidate / MODEL_FILE))
            mismatch = _first_mismatch(model_dir, candidate, probes, eos_token)
            if mismatch is None:
                (candidate / MODEL_FILE).replace(onnx_path)
                log.info("%s: decoder rewritten (%s, %d nodes)", model_dir, kind, len(graph.graph.node))
                return True
        log.warning("%s: the %s graph continues %r differently; not used", model_dir, kind, mismatch)
    return False


def _gqa_graph(onnx_path: Path, config: dict[str, Any]) -> onnx.ModelProto:
    """The decoder rebuilt around GroupQueryAttention from the weights in ``onnx_path``, marked as fused."""
    import onnx

    from workers.fleet.gqa_graph import gqa_decoder, llama_shape, llama_weights

    shape = llama_shape(config)
    model = gqa_decoder(llama_weights(onnx.load(str(onnx_path)), shape), shape)
    _mark(model)
    return model


def _lengths_graph(onnx_path: Path, config: dict[str, Any]) -> onnx.ModelProto:
    """A version-2 GroupQueryAttention graph taking its sequence lengths as inputs, marked as fused."""
    import onnx

    from workers.fleet.gqa_graph import lengths_as_inputs

    model = lengths_as_inputs(onnx.load(str(onnx_path)))
    _mark(model)
    return model


def _mark(model: onnx.ModelProto) -> None:
    """Stamp ``model`` with this module's version (replacing an older version's stamp)."""
    kept = [p for p in model.metadata_props if p.key != FUSED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = FUSED_KEY, FUSED_VERSION


def _fused_graph(onnx_path: Path, config: dict[str, Any]) -> onnx.ModelProto:
    """The optimizer's fused model, rotary caches cut to the model's context, marked as fused."""
    from onnx import numpy_helper
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the optimizer reports every fusion it tries on the root logger
    try:
        optimized = optimize_model(str(onnx_path), model_type="gpt2", num_heads=heads, hidden_size=hidden,
                                   opt_level=0, use_gpu=False)
    finally:
        root.setLevel(level)
    model = optimized.model
    positions = config.get("max_position_embeddings")
    for tensor in model.graph.initializer:  # the optimizer sizes them for 131,072 positions: 16 MB of zeros' worth
        if tensor.name in ROTARY_CACHES and isinstance(positions, int) and tensor.dims[0] > positions:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[:positions], tensor.name))
    _mark(model)
    return model


def _first_mismatch(original: Path, fused: Path, probes: Sequence[str], eos_token: str) -> str | None:
    """The first probe whose greedy continuation differs between the two model directories (None: none)."""
    a, b = GreedyOnnx(original, eos_token, threads=1), GreedyOnnx(fused, eos_token, threads=1)
    for prompt in probes:
        ids = a.tokenizer.encode(prompt, add_special_tokens=False).ids
        if a.generate_ids(ids, PROBE_TOKENS) != b.generate_ids(ids, PROBE_TOKENS):
            return prompt
    return None
