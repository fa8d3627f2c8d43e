"""Operator fusion of exported decoders: fewer nodes, the same greedy tokens, or the original kept.

The GroupQueryAttention rebuild comes first, the optimizer's fusion when it does not match, the
original graph when neither does."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ("12+7=", "sort 3 1 2 =", "def f(x):", "3+4=", "sort 9 8 =")


def _export(root: Path, hidden: int, heads: int) -> Path:
    """A freshly exported (unfused) decoder: a small Llama with random weights, as the builder exports it."""
    pytest.importorskip("torch")
    from workers.fleet.export import export_causal_lm
    from workers.fleet.recipes import DomainPlan, ModelRecipe
    from workers.fleet.tokenizer import EOS, train_tokenizer
    from workers.fleet.train import build_model, save_checkpoint

    tok = train_tokenizer(["12+7=19", "sort 3 1 2 = 1 2 3", "def f(x):\n    return x"] * 40, 300)
    recipe = ModelRecipe(name="x", description="", examples=(), plan=(DomainPlan("arithmetic", 1, 1, 8),),
                         hidden=hidden, layers=2, heads=heads, intermediate=2 * hidden, lr=1e-3, seed=3,
                         max_positions=64)
    save_checkpoint(build_model(recipe, tok.get_vocab_size(), tok.token_to_id(EOS)), tok, root / "ckpt", 64)
    export_causal_lm(root / "ckpt", root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def unfused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 2 heads of 16."""
    return _export(tmp_path_factory.mktemp("fuse"), hidden=32, heads=2)


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 2 heads of 24: onnxruntime's GroupQueryAttention takes multiples of 16 only."""
    return _export(tmp_path_factory.mktemp("fuse-odd"), hidden=48, heads=2)


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _greedy(model_dir: Path) -> list[list[int]]:
    from workers.fleet.greedy import GreedyOnnx
    from workers.fleet.tokenizer import EOS

    greedy = GreedyOnnx(model_dir, EOS, threads=1)
    return [greedy.generate_ids(greedy.tokenizer.encode(p, add_special_tokens=False).ids, 16) for p in PROMPTS]


def test_a_fused_decoder_has_fewer_nodes_and_the_same_greedy_tokens(unfused: Path, tmp_path: Path) -> None:
    import onnx

    from workers.engine import OnnxCausalLM
    from workers.fleet.fuse import ROTARY_CACHES, fuse_decoder, is_fused
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    before, expected = _ops(model / "model.onnx"), _greedy(model)
    assert not is_fused(model / "model.onnx")
    assert fuse_decoder(model, PROMPTS[:3], EOS)
    after = _ops(model / "model.onnx")
    assert is_fused(model / "model.onnx")
    assert after["GroupQueryAttention"] == 2 and after["SkipSimplifiedLayerNormalization"] == 2 * 2  # 2 layers
    assert after["RotaryEmbedding"] == 0 and after["Transpose"] == 0  # rotary and head layout inside the op
    assert sum(after.values()) * 5 < sum(before.values())
    assert _greedy(model) == expected  # also on prompts that were not probes
    caches = [t for t in onnx.load(str(model / "model.onnx")).graph.initializer if t.name in ROTARY_CACHES]
    assert len(caches) == 2 and all(t.dims[0] == 64 for t in caches)  # cut to the model's 64 positions
    assert not list(model.glob(".fuse-*"))  # its scratch directory is gone
    engine = OnnxCausalLM.load(model, name="x", eos_token=EOS)  # the serving engine takes the fused graph
    reference = OnnxCausalLM.load(unfused, name="x", eos_token=EOS)
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=12).text == reference.generate(prompt, max_new_tokens=12).text


def test_heads_of_a_size_the_kernel_does_not_take_are_padded(odd_heads: Path, tmp_path: Path) -> None:
    import onnx

    from workers.engine import OnnxCausalLM
    from workers.fleet.fuse import fuse_decoder
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(odd_heads, tmp_path / "model")
    expected = _greedy(model)
    assert fuse_decoder(model, PROMPTS[:3], EOS)
    assert _ops(model / "model.onnx")["GroupQueryAttention"] == 2
    past = next(i for i in onnx.load(str(model / "model.onnx")).graph.input if i.name.startswith("past_key_values"))
    assert past.type.tensor_type.shape.dim[3].dim_value == 32  # 24 padded with zeros to 32
    assert _greedy(model) == expected
    engine = OnnxCausalLM.load(model, name="x", eos_token=EOS)
    reference = OnnxCausalLM.load(odd_heads, name="x", eos_token=EOS)
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=12).text == reference.generate(prompt, max_new_tokens=12).text


def test_the_optimizer_fusion_stands_in_when_the_rebuild_answers_differently(
        unfused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.fleet import fuse
    from workers.fleet.tokenizer import EOS

    monkeypatch.setattr(fuse, "_gqa_graph", _shifted_embedding(fuse._gqa_graph))
    model = shutil.copytree(unfused, tmp_path / "model")
    expected = _greedy(model)
    assert fuse.fuse_decoder(model, PROMPTS, EOS)
    after = _ops(model / "model.onnx")
    assert after["GroupQueryAttention"] == 0 and after["RotaryEmbedding"] == 2 * 2  # 2 layers: q and k
    assert fuse.is_fused(model / "model.onnx")
    assert _greedy(model) == expected


def test_a_graph_fused_by_the_first_version_is_rebuilt_from_itself(unfused: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.fleet import fuse
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    expected = _greedy(model)
    with monkeypatch.context() as m:  # as version 1 fused it: the optimizer only
        m.setattr(fuse, "FUSED_VERSION", "1")
        m.setattr(fuse, "_gqa_graph", _not_readable)
        assert fuse.fuse_decoder(model, PROMPTS, EOS)
    assert fuse.fused_version(model / "model.onnx") == "1" and not fuse.is_fused(model / "model.onnx")
    assert fuse.fuse_decoder(model, PROMPTS, EOS)
    assert fuse.fused_version(model / "model.onnx") == fuse.FUSED_VERSION
    assert _ops(model / "model.onnx")["GroupQueryAttention"] == 2
    assert _greedy(model) == expected


def _not_readable(onnx_path: Path, config: dict[str, object]) -> object:
    raise ValueError("not a graph this rewrite reads")


def _shifted_embedding(build):  # type: ignore[no-untyped-def]
    """``build`` with a bug: the (tied) token embedding's rows shifted by one."""
    import numpy as np
    from onnx import numpy_helper

    def broken(onnx_path: Path, config: dict[str, object]):  # type: ignore[no-untyped-def]
        model = build(onnx_path, config)
        vocab = int(config["vocab_size"])  # type: ignore[call-overload]
        for tensor in model.graph.initializer:
            for axis, size in enumerate(tensor.dims):
                if size == vocab:
                    shifted = np.roll(numpy_helper.to_array(tensor), 1, axis=axis)
                    tensor.CopyFrom(numpy_helper.from_array(shifted, tensor.name))
        return model

    return broken


def test_fusing_twice_changes_nothing(unfused: Path, tmp_path: Path) -> None:
    from workers.fleet.fuse import fuse_decoder
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    assert fuse_decoder(model, PROMPTS, EOS)
    fused = (model / "model.onnx").read_bytes()
    assert fuse_decoder(model, (), EOS)  # already fused: no probes needed, nothing rewritten
    assert (model / "model.onnx").read_bytes() == fused


def test_a_fused_graph_that_answers_differently_is_not_kept(unfused: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.fleet import fuse
    from workers.fleet.tokenizer import EOS

    monkeypatch.setattr(fuse, "_gqa_graph", _shifted_embedding(fuse._gqa_graph))
    monkeypatch.setattr(fuse, "_fused_graph", _shifted_embedding(fuse._fused_graph))
    model = shutil.copytree(unfused, tmp_path / "model")
    original = (model / "model.onnx").read_bytes()
    assert not fuse.fuse_decoder(model, PROMPTS, EOS)
    assert (model / "model.onnx").read_bytes() == original
    with pytest.raises(ValueError, match="no probe prompts"):
        fuse.fuse_decoder(model, (), EOS)


def test_refresh_fuses_a_fleet_built_before_fusion_once(tiny_fleet: Path, unfused: Path, tmp_path: Path) -> None:
    from workers.fleet.build import GRAPHS_STAMP, refresh_graphs
    from workers.fleet.fuse import is_fused
    from workers.fleet.profiles import PROFILES

    fleet = shutil.copytree(tiny_fleet, tmp_path / "fleet")
    (fleet / GRAPHS_STAMP).unlink()  # as a fleet built before the builder fused its graphs
    shutil.copy2(unfused / "model.onnx", fleet / "models" / "sort" / "model.onnx")  # one graph not fused yet
    shutil.copy2(unfused / "tokenizer.json", fleet / "models" / "sort" / "tokenizer.json")
    shutil.copy2(unfused / "config.json", fleet / "models" / "sort" / "config.json")
    refresh_graphs(fleet, PROFILES["tiny"])
    assert all(is_fused(p) for p in (fleet / "models").glob("*/model.onnx"))
    assert (fleet / GRAPHS_STAMP).is_file()
    stamp_time = (fleet / GRAPHS_STAMP).stat().st_mtime_ns
    refresh_graphs(fleet, PROFILES["tiny"])  # stamped: nothing to do
    assert (fleet / GRAPHS_STAMP).stat().st_mtime_ns == stamp_time


def test_without_the_build_extra_a_cached_fleet_is_served_unfused(tiny_fleet: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A core-only install (no ``onnx``) that finds a fleet built before fusion uses it as it is."""
    from workers.fleet import build as build_module
    from workers.fleet.profiles import PROFILES

    fleet = shutil.copytree(tiny_fleet, tmp_path / "fleet")
    (fleet / build_module.GRAPHS_STAMP).unlink()
    before = {p: p.read_bytes() for p in (fleet / "models").glob("*/model.onnx")}
    monkeypatch.setattr(build_module, "fusion_available", lambda: False)
    build_module.refresh_graphs(fleet, PROFILES["tiny"])
    assert {p: p.read_bytes() for p in (fleet / "models").glob("*/model.onnx")} == before
    assert not (fleet / build_module.GRAPHS_STAMP).exists()  # fused later, once the extra is there


def test_only_plain_llama_configs_are_rebuilt() -> None:
    from workers.fleet.gqa_graph import llama_shape

    base = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 128, "num_hidden_layers": 2,
            "max_position_embeddings": 64}
    shape = llama_shape(base)
    assert (shape.head_dim, shape.kv_heads, shape.rms_eps, shape.rope_theta) == (32, 4, 1e-6, 10000.0)
    with pytest.raises(ValueError, match="not a Llama"):
        llama_shape({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        llama_shape({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_the_rebuilt_graph_takes_the_sequence_lengths_as_inputs(unfused: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto

    from workers.fleet.fuse import fuse_decoder
    from workers.fleet.gqa_graph import SEQLENS_INPUT, TOTAL_LENGTH_INPUT
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    assert fuse_decoder(model, PROMPTS[:3], EOS)
    graph = onnx.load(str(model / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert names == ["input_ids", SEQLENS_INPUT, TOTAL_LENGTH_INPUT] + [
        f"past_key_values.{layer}.{kind}" for layer in range(2) for kind in ("key", "value")]
    types = {i.name: i.type.tensor_type for i in graph.input}
    assert types[SEQLENS_INPUT].elem_type == TensorProto.INT32 and len(types[SEQLENS_INPUT].shape.dim) == 1
    assert types[TOTAL_LENGTH_INPUT].elem_type == TensorProto.INT32 and len(types[TOTAL_LENGTH_INPUT].shape.dim) == 0
    ops = Counter(node.op_type for node in graph.node)
    assert not ops.keys() & {"ReduceSum", "Sub", "Shape", "Squeeze", "Cast"}  # no front computing the lengths
    assert "one" not in {t.name for t in graph.initializer}
    gqa = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert all(list(node.input[5:7]) == [SEQLENS_INPUT, TOTAL_LENGTH_INPUT] for node in gqa) and len(gqa) == 2


def test_a_version_2_graph_is_converted_and_answers_as_before(unfused: Path, tmp_path: Path) -> None:
    import onnx

    from workers.engine import OnnxCausalLM
    from workers.fleet import fuse
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    assert fuse.fuse_decoder(model, PROMPTS[:3], EOS)
    current = onnx.load(str(model / "model.onnx"))
    old = shutil.copytree(model, tmp_path / "old")
    onnx.save(_as_version_2(current), str(old / "model.onnx"))
    shutil.copytree(old, model, dirs_exist_ok=True)
    assert fuse.fused_version(model / "model.onnx") == "2" and "attention_mask" in _inputs(model)
    expected = _greedy(model)  # the version-2 graph, fed its attention_mask

    assert fuse.fuse_decoder(model, PROMPTS, EOS)
    assert fuse.fused_version(model / "model.onnx") == fuse.FUSED_VERSION == "3"
    converted = onnx.load(str(model / "model.onnx"))
    assert _unnamed(converted) == _unnamed(current)  # exactly the graph this version builds
    assert sum(_ops(model / "model.onnx").values()) == sum(_ops(old / "model.onnx").values()) - 6
    assert _greedy(model) == expected
    for io_binding in (False, True):  # the engine feeds the lengths to the new graph, the mask to the old one
        engine = OnnxCausalLM.load(model, name="v3", eos_token=EOS, io_binding=io_binding)
        before = OnnxCausalLM.load(old, name="v2", eos_token=EOS, io_binding=io_binding)
        for prompt in PROMPTS:
            ids = engine.encode(prompt)
            assert engine.generate_ids(ids, max_new_tokens=16) == before.generate_ids(ids, max_new_tokens=16)
            assert engine.generate(prompt, max_new_tokens=16).confidence == pytest.approx(
                before.generate(prompt, max_new_tokens=16).confidence, rel=1e-6)


def test_a_version_2_graph_from_the_optimizer_is_rebuilt(unfused: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 2 fell back to the optimizer's fusion when the rebuild answered differently: such a graph has
    no front to cut, and is rebuilt from its own weights."""
    from workers.fleet import fuse
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    expected = _greedy(model)
    with monkeypatch.context() as m:
        m.setattr(fuse, "FUSED_VERSION", "2")
        m.setattr(fuse, "_gqa_graph", _not_readable)
        assert fuse.fuse_decoder(model, PROMPTS, EOS)
    assert fuse.fused_version(model / "model.onnx") == "2" and _ops(model / "model.onnx")["RotaryEmbedding"] == 4
    assert fuse.fuse_decoder(model, PROMPTS, EOS)
    assert fuse.fused_version(model / "model.onnx") == fuse.FUSED_VERSION
    assert _ops(model / "model.onnx")["GroupQueryAttention"] == 2 and "seqlens_k" in _inputs(model)
    assert _greedy(model) == expected


def test_only_a_graph_computing_its_lengths_from_the_mask_is_converted(unfused: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    from workers.fleet.fuse import fuse_decoder
    from workers.fleet.gqa_graph import lengths_as_inputs
    from workers.fleet.tokenizer import EOS

    model = shutil.copytree(unfused, tmp_path / "model")
    with pytest.raises(ValueError, match="neither computed"):
        lengths_as_inputs(onnx.load(str(model / "model.onnx")))  # an export: a mask, but no such front
    assert fuse_decoder(model, PROMPTS[:3], EOS)
    current = onnx.load(str(model / "model.onnx"))
    with pytest.raises(ValueError, match="no attention_mask input"):
        lengths_as_inputs(current)  # already converted
    old = _as_version_2(current)
    assert _unnamed(lengths_as_inputs(old)) == _unnamed(current)
    reads_mask = onnx.ModelProto()
    reads_mask.CopyFrom(old)
    reads_mask.graph.node.append(helper.make_node("Identity", ["attention_mask"], ["mask_copy"]))
    with pytest.raises(ValueError, match="reads the mask"):
        lengths_as_inputs(reads_mask)
    other_front = onnx.ModelProto()
    other_front.CopyFrom(old)
    sub = next(node for node in other_front.graph.node if node.op_type == "Sub")
    sub.op_type = "Add"
    with pytest.raises(ValueError, match="not by"):
        lengths_as_inputs(other_front)


def _inputs(model_dir: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph.input]


def _as_version_2(model):  # type: ignore[no-untyped-def]
    """A current GroupQueryAttention graph as version 2 of the rebuild wrote it: the two sequence lengths
    computed from an ``attention_mask`` input by six front nodes (that version's code, node for node)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    old = onnx.ModelProto()
    old.CopyFrom(model)
    graph = old.graph
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "axis_seq"], ["mask_len"], domain="", keepdims=0),
        helper.make_node("Sub", ["mask_len", "one"], ["seqlens_k64"], domain=""),
        helper.make_node("Cast", ["seqlens_k64"], ["seqlens_k"], domain="", to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"], domain="", start=1, end=2),
        helper.make_node("Squeeze", ["mask_shape"], ["total64"], domain=""),
        helper.make_node("Cast", ["total64"], ["total_len"], domain="", to=TensorProto.INT32),
        *graph.node,
    ]
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type}_{i}"
        node.input[:] = ["total_len" if name == "total_sequence_length" else name for name in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    inputs = [mask if i.name == "seqlens_k" else i for i in graph.input if i.name != "total_sequence_length"]
    del graph.input[:]
    graph.input.extend(inputs)
    inits = list(graph.initializer)
    at = next(i for i, t in enumerate(inits) if t.name == "axis_seq")
    inits.insert(at, numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))  # 1-d, as it was stored
    del graph.initializer[:]
    graph.initializer.extend(inits)
    for entry in old.metadata_props:
        if entry.key == "calm.fused":
            entry.value = "2"
    return old


def _unnamed(model) -> bytes:  # type: ignore[no-untyped-def]
    """``model`` serialised without its node names (they number the nodes, front nodes included) and its
    metadata (the fusion version's stamp)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    for node in copy.graph.node:
        node.name = ""
    return bytes(copy.SerializeToString(deterministic=True))
