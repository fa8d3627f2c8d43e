"""A Llama decoder's ONNX graph rebuilt around onnxruntime's ``GroupQueryAttention`` contrib op.

An optimum export spells attention out in ~50 small nodes per layer (reshapes, transposes, the KV
concatenation, the causal mask, rotary embeddings); on a small model each node's fixed cost is most of
a decoding step. This module reads the weights of such an export (or of one already fused by
``workers.fleet.fuse``'s optimizer pass) and writes the same model as ~11 nodes per layer: one QKV MatMul,
one ``GroupQueryAttention`` (rotary embedding, KV cache and causal softmax inside; CPU and CUDA kernels),
the output projection, the SwiGLU MLP and fused RMSNorm+residual nodes. The lm_head runs on the last
position only. Inputs: ``input_ids`` (int64 [batch, seq]), the op's own length inputs ``seqlens_k``
(int32 [batch]: each row's total length - 1; rows unpadded) and ``total_sequence_length`` (int32 scalar:
past + new positions), then ``past_key_values.N.key/value``; outputs keep the export's names and layout
(``logits``, ``present.N.key/value``). There is no ``attention_mask`` and no ``position_ids``: positions
follow from the lengths. The previous version computed the two lengths from an ``attention_mask`` input
in six nodes; ``lengths_as_inputs`` turns such a graph into this form (its weights cannot be read back by
``llama_weights``). Heads whose size is not a multiple of 16 (the CPU kernel's requirement) are padded
with zero dimensions. onnxruntime's CUDA kernel of the op takes float16/bfloat16 only, so on a GPU this
float32 graph runs its attention nodes on the CPU execution provider (not measured here).

Build-time only: needs ``onnx`` (the ``build`` extra).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "SEQLENS_INPUT",
    "TOTAL_LENGTH_INPUT",
    "LlamaShape",
    "LlamaWeights",
    "gqa_decoder",
    "lengths_as_inputs",
    "llama_shape",
    "llama_weights",
]

SEQLENS_INPUT = "seqlens_k"  # int32 [batch]: each row's total length - 1
TOTAL_LENGTH_INPUT = "total_sequence_length"  # int32 scalar: past + new positions
_MASK_INPUT = "attention_mask"  # the previous version's input the lengths were computed from
_MASK_TOTAL = "total_len"  # the previous version's name of the total length
_MASK_FRONT = ("ReduceSum", "Sub", "Cast", "Shape", "Squeeze", "Cast")  # its nodes computing the two lengths

_PROJ = re.compile(r"/model/layers\.(\d+)/(?:self_attn|mlp)/(q|k|v|o|gate|up|down)_proj/MatMul$")
_NORM_MUL = re.compile(r"(?:_layernorm|/model/norm)/Mul_1$")
HEAD_SIZE_MULTIPLE = 16
_PROJS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """What the graph needs from a model's ``config.json``."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    rms_eps: float
    rope_theta: float


@dataclass(frozen=True, slots=True)
class LlamaWeights:
    """A Llama decoder's weights, projections as ``[in, out]`` matrices (as MatMul takes them)."""

    embed: np.ndarray  # [vocab, hidden]
    lm_head: np.ndarray  # [hidden, vocab]
    norms: tuple[np.ndarray, ...]  # input_0, post_0, input_1, ..., post_{L-1}, final
    proj: tuple[dict[str, np.ndarray], ...]  # per layer: q, k, v, o, gate, up, down


def llama_shape(config: dict[str, Any]) -> LlamaShape:
    """The shape of a LlamaForCausalLM ``config.json`` (ValueError for other models or rope scaling)."""
    if config.get("model_type") != "llama":
        raise ValueError(f"not a Llama config (model_type {config.get('model_type')!r})")
    if config.get("rope_scaling"):
        raise ValueError("rope scaling is not supported")
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden or head_dim % 2:
        raise ValueError(f"unsupported attention shape: {heads} heads of {head_dim} for width {hidden}")
    return LlamaShape(
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_positions=int(config["max_position_embeddings"]),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
    )


def llama_weights(model: onnx.ModelProto, shape: LlamaShape) -> LlamaWeights:
    """Read the weights of an exported (optionally optimizer-fused) Llama decoder by its node names.

    Raises ValueError when a projection, norm or the lm_head cannot be found, or a weight is not float32.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def constant(name: str) -> np.ndarray | None:
        """The value behind ``name``: an initializer, through Identity and Transpose nodes."""
        node = producer.get(name)
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if node is not None and node.op_type == "Identity":
            return constant(node.input[0])
        if node is not None and node.op_type == "Transpose":
            inner = constant(node.input[0])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return None if inner is None else np.transpose(inner, perm)
        return None

    proj: list[dict[str, np.ndarray]] = [{} for _ in range(shape.layers)]
    norms: list[np.ndarray] = []
    embed = lm_head = None
    for node in graph.node:
        match = _PROJ.search(node.name)
        if match and node.op_type == "MatMul":
            weight, layer = constant(node.input[1]), int(match.group(1))
            if weight is not None and layer < shape.layers:
                proj[layer][match.group(2)] = weight
        elif node.op_type == "SimplifiedLayerNormalization":
            norms.append(_required(constant(node.input[1]), node.name))
        elif node.op_type == "SkipSimplifiedLayerNormalization":
            norms.append(_required(constant(node.input[2]), node.name))
        elif node.op_type == "Mul" and _NORM_MUL.search(node.name):
            weights = [w for w in (constant(i) for i in node.input) if w is not None]
            norms.append(_required(weights[0] if len(weights) == 1 else None, node.name))
        elif node.op_type == "Gather" and node.name.endswith("embed_tokens/Gather"):
            embed = constant(node.input[0])
        elif node.op_type == "MatMul" and "logits" in node.output:
            lm_head = constant(node.input[1])
    missing = [f"layer {i} {p}_proj" for i, d in enumerate(proj) for p in _PROJS if p not in d]
    if embed is None or lm_head is None or missing or len(norms) != 2 * shape.layers + 1:
        raise ValueError(
            f"not a Llama export this module reads: embed {'found' if embed is not None else 'missing'}, "
            f"lm_head {'found' if lm_head is not None else 'missing'}, {len(norms)} norms "
            f"(expected {2 * shape.layers + 1}), missing {missing[:3]}"
        )
    if any(w.dtype != np.float32 for w in (embed, lm_head, *norms, *(w for d in proj for w in d.values()))):
        raise ValueError("float32 exports only")
    return LlamaWeights(embed=embed, lm_head=lm_head, norms=tuple(norms), proj=tuple(proj))


def gqa_decoder(weights: LlamaWeights, shape: LlamaShape) -> onnx.ModelProto:
    """The decoder as a GroupQueryAttention graph (float32, opset 18 + com.microsoft)."""
    from onnx import TensorProto, helper, numpy_helper

    s = shape
    size = _padded_head_size(s.head_dim)
    f32 = TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outputs

    init("embed", weights.embed)
    init("lm_head", weights.lm_head)
    inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.float64) / s.head_dim))
    angles = np.zeros((s.max_positions, size // 2))  # padded dimensions hold zeros: any angle leaves them so
    angles[:, : s.head_dim // 2] = np.outer(np.arange(s.max_positions, dtype=np.float64), inv_freq)
    init("cos_cache", np.cos(angles).astype(np.float32))
    init("sin_cache", np.sin(angles).astype(np.float32))
    init("axis_seq", np.array([1], dtype=np.int64))
    init("last_start", np.array([-1], dtype=np.int64))
    init("last_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))

    node("Gather", ["embed", "input_ids"], ["h_embed"])
    residual = "h_embed"
    (hidden,) = node("SimplifiedLayerNormalization", ["h_embed", init("norm_0", weights.norms[0])], ["h_0"],
                     axis=-1, epsilon=s.rms_eps, stash_type=1)
    for i, p in enumerate(weights.proj):
        q = _pad_heads(p["q"], s.heads, s.head_dim, size, rotary=True)
        k = _pad_heads(p["k"], s.kv_heads, s.head_dim, size, rotary=True)
        v = _pad_heads(p["v"], s.kv_heads, s.head_dim, size, rotary=False)
        qkv = init(f"qkv_{i}", np.concatenate([q, k, v], axis=1))
        o = _pad_heads(p["o"].T, s.heads, s.head_dim, size, rotary=False).T
        node("MatMul", [hidden, qkv], [f"qkv_out_{i}"])
        node("GroupQueryAttention",
             [f"qkv_out_{i}", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
              SEQLENS_INPUT, TOTAL_LENGTH_INPUT, "cos_cache", "sin_cache"],
             [f"attn_{i}", f"present.{i}.key", f"present.{i}.value"],
             domain="com.microsoft", num_heads=s.heads, kv_num_heads=s.kv_heads, do_rotary=1, rotary_interleaved=0,
             scale=float(s.head_dim ** -0.5))
        node("MatMul", [f"attn_{i}", init(f"o_{i}", o)], [f"o_out_{i}"])
        (hidden, _, _, residual) = node(
            "SkipSimplifiedLayerNormalization",
            [f"o_out_{i}", residual, init(f"norm_post_{i}", weights.norms[2 * i + 1])],
            [f"h_post_{i}", "", "", f"res_attn_{i}"], domain="com.microsoft", epsilon=s.rms_eps)
        node("MatMul", [hidden, init(f"gate_{i}", p["gate"])], [f"gate_out_{i}"])
        node("Sigmoid", [f"gate_out_{i}"], [f"gate_sig_{i}"])
        node("Mul", [f"gate_out_{i}", f"gate_sig_{i}"], [f"gate_act_{i}"])
        node("MatMul", [hidden, init(f"up_{i}", p["up"])], [f"up_out_{i}"])
        node("Mul", [f"gate_act_{i}", f"up_out_{i}"], [f"mlp_mid_{i}"])
        node("MatMul", [f"mlp_mid_{i}", init(f"down_{i}", p["down"])], [f"down_out_{i}"])
        (hidden, _, _, residual) = node(
            "SkipSimplifiedLayerNormalization",
            [f"down_out_{i}", residual, init(f"norm_{i + 1}", weights.norms[2 * i + 2])],
            [f"h_{i + 1}", "", "", f"res_mlp_{i}"], domain="com.microsoft", epsilon=s.rms_eps)
    node("Slice", [hidden, "last_start", "last_end", "axis_seq"], ["h_last"])
    node("MatMul", ["h_last", "lm_head"], ["logits"])

    vocab = int(weights.embed.shape[0])
    kv_shape: list[str | int] = ["batch_size", s.kv_heads, "past_sequence_length", size]
    present_shape: list[str | int] = ["batch_size", s.kv_heads, "total_sequence_length", size]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        *_length_inputs(),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", 1, vocab])]
    for i in range(s.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present_shape))
    graph = helper.make_graph(nodes, "calm_gqa_decoder", inputs, outputs, initializer=inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
        producer_name="calm",
        ir_version=9,
    )


def lengths_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph built by the previous version of ``gqa_decoder`` in this version's form (a new model).

    That version computed ``seqlens_k`` and ``total_len`` from an ``attention_mask`` input in six front
    nodes; here the front nodes, the mask and the constants only they used are gone, the two lengths are
    inputs in the mask's place and ``total_len``'s uses read ``total_sequence_length``. Raises ValueError
    when ``model`` has no such front.
    """
    import onnx

    source = model.graph
    front = _mask_front(source)
    kept = [node for i, node in enumerate(source.node) if i not in front]
    used = {name for node in kept for name in node.input} | {o.name for o in source.output}
    dropped = {name for i in front for name in (*source.node[i].input, *source.node[i].output)} - used

    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    _replace(graph.node, kept)
    for node in graph.node:
        node.input[:] = [TOTAL_LENGTH_INPUT if name == _MASK_TOTAL else name for name in node.input]
    _replace(graph.input, [new for value in source.input
                           for new in (_length_inputs() if value.name == _MASK_INPUT else [value])])
    _replace(graph.initializer, [t for t in source.initializer if t.name not in dropped])
    gone = dropped | {SEQLENS_INPUT, _MASK_TOTAL}  # the lengths are inputs now: no value_info of their own
    _replace(graph.value_info, [v for v in source.value_info if v.name not in gone])
    return converted


def _mask_front(graph: onnx.GraphProto) -> set[int]:
    """Indices of the previous version's nodes computing ``seqlens_k`` and ``total_len`` from the mask.

    Raises ValueError unless they are exactly those nodes, read nothing but the mask and constants, and
    nothing but GroupQueryAttention nodes read what they compute.
    """
    if _MASK_INPUT not in {value.name for value in graph.input}:
        raise ValueError(f"no {_MASK_INPUT} input: not a graph whose lengths come from the mask")
    names = {name for node in graph.node for name in (*node.input, *node.output)}
    if TOTAL_LENGTH_INPUT in names | {value.name for value in graph.input}:
        raise ValueError(f"the graph already has a tensor named {TOTAL_LENGTH_INPUT!r}")
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    constants = {t.name for t in graph.initializer}
    front: set[int] = set()
    pending = [SEQLENS_INPUT, _MASK_TOTAL]
    while pending:
        name = pending.pop()
        if name in (_MASK_INPUT, "") or name in constants:
            continue
        if name not in producer:
            raise ValueError(f"{name!r} is neither computed in the graph nor {_MASK_INPUT} nor a constant")
        if producer[name] not in front:
            front.add(producer[name])
            pending.extend(graph.node[producer[name]].input)
    ops = tuple(graph.node[i].op_type for i in sorted(front))
    if ops != _MASK_FRONT:
        raise ValueError(f"the lengths are computed by {list(ops)}, not by {list(_MASK_FRONT)}")
    lengths = {SEQLENS_INPUT, _MASK_TOTAL}
    inner = ({out for i in front for out in graph.node[i].output} - lengths) | {_MASK_INPUT}
    for i, node in enumerate(graph.node):
        read = set(node.input)
        if i not in front and (read & inner or (read & lengths and node.op_type != "GroupQueryAttention")):
            raise ValueError(f"node {node.name!r} ({node.op_type}) reads the mask or its lengths")
    if {o.name for o in graph.output} & (inner | lengths):
        raise ValueError("a graph output is the mask or computed from it")
    return front


def _length_inputs() -> list[onnx.ValueInfoProto]:
    """The ``seqlens_k`` and ``total_sequence_length`` graph inputs."""
    from onnx import TensorProto, helper

    return [
        helper.make_tensor_value_info(SEQLENS_INPUT, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(TOTAL_LENGTH_INPUT, TensorProto.INT32, []),
    ]


def _replace(field: Any, entries: Sequence[Any]) -> None:
    """Make the repeated protobuf ``field`` hold copies of ``entries`` (messages of another model)."""
    del field[:]
    field.extend(entries)


def _padded_head_size(head_dim: int) -> int:
    """onnxruntime's CPU kernel takes head sizes in multiples of 16: the smallest one that holds ``head_dim``."""
    return -(-head_dim // HEAD_SIZE_MULTIPLE) * HEAD_SIZE_MULTIPLE


def _pad_heads(w: np.ndarray, heads: int, head_dim: int, size: int, *, rotary: bool) -> np.ndarray:
    """Widen each head's output columns of ``w`` ([in, heads * head_dim]) to ``size`` with zero columns.

    Rotary heads are padded half by half (rotate-half pairs dimension j with j + size / 2), so every
    original pair stays a pair and the zero dimensions pair with each other. Zero query/key dimensions
    add nothing to attention scores; zero value dimensions meet zero rows of the output projection.
    """
    if size == head_dim:
        return w
    rows = w.shape[0]
    parts = w.reshape(rows, heads, 2, head_dim // 2) if rotary else w.reshape(rows, heads, 1, head_dim)
    pad = (size - head_dim) // 2 if rotary else size - head_dim
    widened = np.concatenate([parts, np.zeros((*parts.shape[:3], pad), dtype=w.dtype)], axis=3)
    return widened.reshape(rows, heads * size)


def _required(value: np.ndarray | None, where: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"no constant weight at node {where}")
    return value
