"""The .m model file: reading distributed-llama's own files, writing them back, and every rejection."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dllama_py.formats.model_file import (
    ModelFile,
    ModelFormatError,
    ModelWriter,
    encode_header,
    read_model,
    write_model,
)
from dllama_py.model.config import ArchType, ConfigError, FloatType, HeaderKey, ModelConfig, RopeType
from dllama_py.model.structure import tensor_specs

COMPAT_MODELS = ["llama-tiny", "qwen3-tiny", "qwen3moe-tiny"]


# ---- numpy reference of dllama-format.md section 2 (used here and by test_convert_hf) ----------------
def q40_reference(x: np.ndarray) -> np.ndarray:
    """Q40-encode float32 (rows, cols) -> uint8 (rows, cols/32*18) with distributed-llama's rule:
    d = (signed value of largest magnitude) / -8, q = trunc(clamp(x/d... as x*(1/d) + 8.5, 0, 15))."""
    rows = x.shape[0]
    blocks = x.astype(np.float32).reshape(-1, 32)
    gmax, gmin = blocks.max(axis=1), blocks.min(axis=1)
    d = np.where(-gmin > gmax, gmin, gmax) / np.float32(-8)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    q = np.clip(blocks * inv[:, None] + np.float32(8.5), 0, 15).astype(np.uint8)
    out = np.empty((blocks.shape[0], 18), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(rows, -1)


def q80_reference(x: np.ndarray) -> np.ndarray:
    """Q80-encode float32 (rows, cols) -> uint8 (rows, cols/32*34): d = max|x|/127 (f32), q = round(x/d)."""
    rows = x.shape[0]
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    q = np.round(blocks * inv[:, None]).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(rows, -1)


def q40_dequantize_reference(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., nb*18) -> (values float32 (blocks, 32), scale |d| float32 (blocks,))."""
    blocks = q.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    nibbles = np.concatenate([blocks[:, 2:] & 0xF, blocks[:, 2:] >> 4], axis=1).astype(np.float32)
    return (nibbles - 8) * d[:, None], np.abs(d)


def q40_block_differences(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int]:
    """Compare two q40 encodings of the same data block by block. Returns (blocks differing,
    blocks differing by more than one quantization step in a single value)."""
    if np.array_equal(ours, theirs):
        return 0, 0
    a, step = q40_dequantize_reference(ours)
    b, _ = q40_dequantize_reference(theirs)
    differing = (a != b).any(axis=1)
    n_values = (a != b).sum(axis=1)
    worst = np.abs(a - b).max(axis=1)
    bad = differing & ((n_values > 1) | (worst > step * 1.0001))
    return int(differing.sum()), int(bad.sum())


# ---- helpers ----------------------------------------------------------------------------------------
def compat_file(testdata: Path, model: str, float_type: str) -> Path:
    return testdata / "compat" / "dllama" / f"dllama_model_{model}_{float_type}.m"


def tiny_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = {
        "arch": ArchType.LLAMA,
        "dim": 64,
        "hidden_dim": 96,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 40,
        "max_seq_len": 128,
        "weight_float_type": FloatType.F32,
    }
    values.update(overrides)
    return ModelConfig(**values)  # type: ignore[arg-type]


def write_random_model(path: Path, config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in tensor_specs(config)}
    write_model(path, config, tensors.items())
    return tensors


def header_bytes(items: list[tuple[int, int]], magic: int = 0x0A00ABCD) -> bytes:
    body = b"".join(struct.pack("<ii", k, v) for k, v in items)
    return struct.pack("<ii", magic, 8 + len(body)) + body


def base_items(config: ModelConfig) -> list[tuple[int, int]]:
    return [(int(k), v) for k, v in config.header_items()]


# ---- reading distributed-llama's files -------------------------------------------------------------
@pytest.mark.parametrize("model", COMPAT_MODELS)
@pytest.mark.parametrize("float_type", ["f32", "q40"])
def test_every_compat_file_opens_with_its_manifest_header(
    testdata: Path, model: str, float_type: str
) -> None:
    manifest = json.loads((testdata / "compat" / "manifest.json").read_text())
    expected = manifest["models"][model]["dllama_files"][float_type]["header"]
    path = compat_file(testdata, model, float_type)
    with read_model(path) as m:
        kv = expected["kv"]
        assert m.header_size == expected["header_bytes"]
        assert {HeaderKey(k).name.lower(): v for k, v in m.header} == {
            k.replace("weights_float_type", "weight_float_type"): v for k, v in kv.items()
        }
        c = m.config
        assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads) == (128, 384, 3, 8, 4)
        assert c.weight_float_type == FloatType.from_label(float_type)
        assert c.arch == ArchType(kv["arch_type"])
        last = list(m)[-1]
        assert last.offset + last.spec.nbytes == path.stat().st_size


def test_tensors_are_views_into_the_mapping_not_copies(testdata: Path) -> None:
    with read_model(compat_file(testdata, "qwen3moe-tiny", "q40")) as m:
        offset = m.header_size
        for tensor in m:
            assert tensor.offset == offset
            assert not tensor.data.flags.owndata and not tensor.data.flags.writeable
            assert tensor.data.shape == tensor.spec.storage_shape
            offset += tensor.spec.nbytes
        assert m["layers.1.experts.3.w2"].shape == (128, 128 // 32 * 18)
        assert m["layers.0.router"].dtype == np.float32 and m["layers.0.router"].shape == (4, 128)
        assert m["layers.2.q_norm"].shape == (1, 16)


def test_q40_file_blocks_equal_the_reference_quantizer_on_the_hf_weights(testdata: Path) -> None:
    from safetensors.numpy import load_file

    hf = load_file(testdata / "compat" / "hf" / "qwen3-tiny" / "model.safetensors")
    with read_model(compat_file(testdata, "qwen3-tiny", "q40")) as m:
        assert np.array_equal(m["layers.1.wv"], q40_reference(hf["model.layers.1.self_attn.v_proj.weight"]))
        assert np.array_equal(m["layers.2.w2"], q40_reference(hf["model.layers.2.mlp.down_proj.weight"]))
        assert np.array_equal(m["classifier"], q40_reference(hf["model.embed_tokens.weight"]))  # tied
        assert np.array_equal(m["embedding"], hf["model.embed_tokens.weight"])


def test_header_written_for_a_read_config_is_byte_identical(testdata: Path) -> None:
    for model in COMPAT_MODELS:
        path = compat_file(testdata, model, "q40")
        with read_model(path) as m:
            assert encode_header(m.config) == path.read_bytes()[: m.header_size]


# ---- writing ------------------------------------------------------------------------------------------
def test_written_model_reads_back_identically(tmp_path: Path) -> None:
    config = tiny_config(arch=ArchType.QWEN3_MOE, n_experts=4, n_active_experts=2, moe_hidden_dim=32)
    tensors = write_random_model(tmp_path / "m.m", config)
    with read_model(tmp_path / "m.m") as m:
        assert m.config == config
        assert set(m.tensors) == set(tensors)
        for name, values in tensors.items():
            assert np.array_equal(m[name], values), name
    assert not (tmp_path / "m.m.tmp").exists()


def test_writer_rejects_tensors_out_of_order_and_leaves_no_file(tmp_path: Path) -> None:
    config = tiny_config()
    with (
        pytest.raises(ValueError, match="expected tensor embedding, got layers.0.wq"),
        ModelWriter(tmp_path / "m.m", config) as writer,
    ):
        writer.write("layers.0.wq", np.zeros((64, 64), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_finish_an_incomplete_file(tmp_path: Path) -> None:
    writer = ModelWriter(tmp_path / "m.m", tiny_config())
    writer.write("embedding", np.zeros((40, 64), np.float32))
    with pytest.raises(ValueError, match="tensor layers.0.wq was not written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_rope_scaling_keys_are_written_between_theta_and_head_dim() -> None:
    config = tiny_config(
        rope_theta=500000,
        rope_scaling_factor=32,
        rope_scaling_low_freq_factor=1,
        rope_scaling_high_freq_factor=4,
        rope_scaling_orig_max_seq_len=8192,
        rope_type=RopeType.LLAMA3_1,
    )
    keys = [int(k) for k, _ in config.header_items()]
    assert keys == [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 14, 15, 16, 17, 18, 19, 20]
    assert ModelConfig.from_header(config.header_items()) == config


# ---- ModelConfig ----------------------------------------------------------------------------------------
def test_config_defaults_and_derived_sizes() -> None:
    items = [
        (1, ArchType.QWEN3_MOE),
        (2, 256),
        (3, 512),
        (4, 2),
        (5, 8),
        (6, 2),
        (9, 100),
        (10, 64),
        (13, 2),
        (7, 8),
        (8, 2),
        (21, 128),
        (20, 6),
    ]
    c = ModelConfig.from_header(items)
    assert c.head_dim == 32 and c.q_dim == 256 and c.kv_dim == 64 and c.ff_dim == 128 and c.n_kv_groups == 4
    assert c.rope_type == RopeType.FALCON and c.rope_theta == 10000 and c.norm_epsilon == 1e-6
    assert c.hidden_act.name == "SILU" and c.has_qk_norm and c.is_moe and not c.has_rope_scaling
    dense = tiny_config(head_dim=32)
    assert dense.q_dim == 128 and dense.ff_dim == 96 and dense.rope_type == RopeType.LLAMA


def test_float_type_row_sizes() -> None:
    assert [FloatType(t).row_bytes(64) for t in range(4)] == [256, 128, 36, 68]
    assert FloatType.Q40.tensor_bytes(3, 96) == 3 * 3 * 18
    with pytest.raises(ValueError, match="multiple of 32"):
        FloatType.Q80.row_bytes(48)
    assert FloatType.from_label("Q40") == FloatType.Q40


def test_quantized_model_with_rows_not_a_multiple_of_32_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"layers.0.w2 has rows of 80 values.*q40"):
        tensor_specs(tiny_config(dim=64, hidden_dim=80, weight_float_type=FloatType.Q40))


# ---- rejections -----------------------------------------------------------------------------------------
def write_with_header(tmp_path: Path, head: bytes, tail: bytes = b"") -> Path:
    path = tmp_path / "bad.m"
    path.write_bytes(head + tail)
    return path


def test_bad_magic_is_reported_with_the_file_name(tmp_path: Path) -> None:
    path = write_with_header(tmp_path, b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(ModelFormatError, match=r"bad\.m: bad magic 0x46554747.*not a distributed-llama"):
        ModelFile(path)


@pytest.mark.parametrize("magic", [0xABCD00, 0xABCD01])
def test_old_format_is_rejected(tmp_path: Path, magic: int) -> None:
    path = write_with_header(tmp_path, struct.pack("<9i", magic, 128, 512, 3, 8, 4, 0, 0, 512))
    with pytest.raises(ModelFormatError, match="bad.m: old model format"):
        ModelFile(path)


@pytest.mark.parametrize("size", [0, 5])
def test_file_too_small_for_a_header(tmp_path: Path, size: int) -> None:
    with pytest.raises(ModelFormatError, match=f"{size} bytes is too small"):
        ModelFile(write_with_header(tmp_path, bytes(size)))


def test_unknown_header_key(tmp_path: Path) -> None:
    path = write_with_header(tmp_path, header_bytes(base_items(tiny_config()) + [(22, 7)]))
    with pytest.raises(ModelFormatError, match=r"bad\.m: unknown header key 22 \(value 7\)"):
        ModelFile(path)


def test_unknown_architecture(tmp_path: Path) -> None:
    items = [(k, 0xABCD09 if k == 1 else v) for k, v in base_items(tiny_config())]
    with pytest.raises(ModelFormatError, match="bad.m: unknown architecture 0xABCD09"):
        ModelFile(write_with_header(tmp_path, header_bytes(items)))


def test_missing_weight_type(tmp_path: Path) -> None:
    items = [(k, v) for k, v in base_items(tiny_config()) if k != 13]
    with pytest.raises(ModelFormatError, match=r"bad\.m: header has no weights_float_type \(key 13\)"):
        ModelFile(write_with_header(tmp_path, header_bytes(items)))


def test_impossible_header_values(tmp_path: Path) -> None:
    items = [(k, 3 if k == 6 else v) for k, v in base_items(tiny_config())]  # 4 heads, 3 kv heads
    with pytest.raises(ModelFormatError, match="n_heads 4 is not a multiple of n_kv_heads 3"):
        ModelFile(write_with_header(tmp_path, header_bytes(items)))


def test_extra_bytes_report_expected_and_found_sizes(tmp_path: Path) -> None:
    write_random_model(tmp_path / "m.m", tiny_config())
    size = (tmp_path / "m.m").stat().st_size
    with open(tmp_path / "m.m", "ab") as file:
        file.write(bytes(10))
    with pytest.raises(
        ModelFormatError,
        match=rf"m\.m: size does not match the header: expected {size} bytes, "
        rf"found {size + 10} \(10 extra bytes\)",
    ):
        ModelFile(tmp_path / "m.m")


def test_truncated_file_names_the_tensor(tmp_path: Path) -> None:
    config = tiny_config()
    write_random_model(tmp_path / "m.m", config)
    data = (tmp_path / "m.m").read_bytes()
    (tmp_path / "m.m").write_bytes(data[: -(64 * 4 + 40 * 64 * 4)])  # cut into final_norm
    with pytest.raises(ModelFormatError, match=rf"truncated: tensor final_norm .*expected {len(data)} bytes"):
        ModelFile(tmp_path / "m.m")


def test_header_size_beyond_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="header size 4096 is larger than the file"):
        ModelFile(write_with_header(tmp_path, struct.pack("<ii", 0x0A00ABCD, 4096) + bytes(16)))


def test_explicit_rope_type_and_epsilon_survive_a_round_trip() -> None:
    config = tiny_config(rope_type=RopeType.FALCON, norm_epsilon=1e-6)
    items = config.header_items()
    assert (HeaderKey.ROPE_TYPE, 1) in items and (HeaderKey.NORM_EPSILON, 6) in items
    assert ModelConfig.from_header(items) == config
