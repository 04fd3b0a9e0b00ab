"""convert-hf: byte-identical to distributed-llama's converter, every input form, every rejection."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dllama_py.converter.convert_hf import main, rotate_half_to_interleaved
from safetensors.numpy import load_file
from test_model_file import (
    COMPAT_MODELS,
    q40_block_differences,
    q40_dequantize_reference,
    q40_reference,
    q80_reference,
)

from dllama_py.formats.model_file import read_model

Tensors = dict[str, tuple[str, np.ndarray]]  # name -> (safetensors dtype, raw array)


# ---- helpers -----------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: Tensors) -> None:
    """Write a safetensors file with any dtype (numpy has no bf16: BF16 arrays are raw uint16)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, array) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    blob = json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(blob)) + blob)
        for _, array in tensors.values():
            file.write(np.ascontiguousarray(array).tobytes())


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def hf_tensors(testdata: Path, model: str) -> dict[str, np.ndarray]:
    return load_file(testdata / "compat" / "hf" / model / "model.safetensors")


def make_model(
    tmp_path: Path,
    testdata: Path,
    model: str = "llama-tiny",
    edit_config: Callable[[dict[str, Any]], None] | None = None,
    tensors: Tensors | None = None,
) -> Path:
    """An HF folder in tmp_path/'hf': the compat model's config (optionally edited) and weights
    (the original file, or `tensors` written as one shard)."""
    folder = tmp_path / "hf"
    folder.mkdir(parents=True)
    config = json.loads((testdata / "compat" / "hf" / model / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is None:
        (folder / "model.safetensors").symlink_to(testdata / "compat" / "hf" / model / "model.safetensors")
    else:
        write_safetensors(folder / "model.safetensors", tensors)
    return folder


def as_f32(tensors: dict[str, np.ndarray]) -> Tensors:
    return {name: ("F32", array) for name, array in tensors.items()}


def convert(
    capsys: pytest.CaptureFixture[str], folder: Path, float_type: str, output: Path, *extra: str
) -> tuple[int, str]:
    code = main([str(folder), float_type, "test", "--output", str(output), *extra])
    return code, capsys.readouterr().err


def compat_path(testdata: Path, model: str, float_type: str) -> Path:
    return testdata / "compat" / "dllama" / f"dllama_model_{model}_{float_type}.m"


@pytest.fixture
def core() -> Any:
    """The C++ extension; tests that quantize are skipped until it is built."""
    return pytest.importorskip("dllama_py._core", reason="dllama_py._core is not built yet")


# ---- distributed-llama compatibility -------------------------------------------------------------------
@pytest.mark.parametrize("model", COMPAT_MODELS)
def test_f32_output_is_byte_identical_to_distributed_llama(
    testdata: Path,
    tmp_path: Path,
    model: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([str(testdata / "compat" / "hf" / model), "f32", model, "--quiet"]) == 0
    ours = tmp_path / f"dllama_model_{model}_f32.m"
    assert ours.read_bytes() == compat_path(testdata, model, "f32").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [ours.name]  # no temporary file left


@pytest.mark.parametrize("model", COMPAT_MODELS)
def test_q40_output_matches_distributed_llama_block_for_block(
    testdata: Path, tmp_path: Path, model: str, core: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = convert(capsys, testdata / "compat" / "hf" / model, "q40", tmp_path / "out.m", "--quiet")
    assert code == 0, err
    theirs_path = compat_path(testdata, model, "q40")
    assert (tmp_path / "out.m").stat().st_size == theirs_path.stat().st_size
    total_blocks = differing = beyond_one_step = 0
    with read_model(tmp_path / "out.m") as ours, read_model(theirs_path) as theirs:
        assert ours.header == theirs.header
        for a, b in zip(ours, theirs, strict=True):
            assert (a.name, a.offset, a.float_type) == (b.name, b.offset, b.float_type)
            if a.float_type.label == "f32":
                assert np.array_equal(a.data, b.data), a.name
                continue
            n_diff, n_bad = q40_block_differences(a.data, b.data)
            total_blocks += a.data.size // 18
            differing += n_diff
            beyond_one_step += n_bad
    print(
        f"{model} q40: {differing} of {total_blocks} blocks differ from distributed-llama, "
        f"{beyond_one_step} by more than one step in one value"
    )
    assert beyond_one_step == 0
    assert differing <= total_blocks // 1000  # ties are rare: at most 0.1 % of blocks


def test_q80_and_f16_outputs_follow_the_reference_rules(
    testdata: Path, tmp_path: Path, core: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_dir = testdata / "compat" / "hf" / "qwen3-tiny"
    hf = hf_tensors(testdata, "qwen3-tiny")
    for float_type in ("q80", "f16"):
        code, err = convert(capsys, hf_dir, float_type, tmp_path / f"{float_type}.m", "--quiet")
        assert code == 0, err
        with read_model(tmp_path / f"{float_type}.m") as m:
            up = hf["model.layers.1.mlp.up_proj.weight"]
            if float_type == "f16":
                assert np.array_equal(m["layers.1.w3"], up.astype(np.float16).view(np.uint16))
            else:
                ours, ref = m["layers.1.w3"].reshape(-1, 34), q80_reference(up).reshape(-1, 34)
                assert np.array_equal(ours[:, :2], ref[:, :2])  # scales
                diff = np.abs(ours[:, 2:].view(np.int8).astype(int) - ref[:, 2:].view(np.int8).astype(int))
                assert diff.max() <= 1 and (diff > 0).sum() <= diff.size // 1000  # rounding ties only
            assert np.array_equal(m["embedding"], hf["model.embed_tokens.weight"])


def test_core_quantizers_agree_with_the_numpy_reference(core: Any) -> None:
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32) * 0.02
    x[0, :32] = 0  # an all-zero block
    n_diff, n_bad = q40_block_differences(core.quantize_q40(x), q40_reference(x))
    assert n_bad == 0 and n_diff <= 1
    # a tie (+max and -max): distributed-llama's writers break it differently; either choice loses one
    # extreme by one step, so the two encodings differ by one step in at most two values
    tie = np.linspace(-1, 1, 32, dtype=np.float32)[None, :]
    ours, step = q40_dequantize_reference(core.quantize_q40(tie))
    ref, _ = q40_dequantize_reference(q40_reference(tie))
    assert (ours != ref).sum() <= 2 and np.abs(ours - ref).max() <= step[0]
    assert np.abs(ours - tie).max() <= step[0] and np.abs(ref - tie).max() <= step[0]
    q80 = core.quantize_q80(x).reshape(-1, 34)
    assert np.array_equal(q80[:, :2], q80_reference(x).reshape(-1, 34)[:, :2])


# ---- input forms ------------------------------------------------------------------------------------------
def test_llama_permutation_turns_rotate_half_into_interleaved_pairs() -> None:
    head_dim, heads = 8, 2
    rows = np.arange(heads * head_dim, dtype=np.float32)[:, None]  # row i holds value i
    out = rotate_half_to_interleaved(rows, head_dim)[:, 0]
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_tie_word_embeddings_takes_the_classifier_from_the_embedding(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, edit_config=lambda c: c.update(tie_word_embeddings=True))
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    with read_model(tmp_path / "out.m") as m:
        assert np.array_equal(m["classifier"], m["embedding"])
    with read_model(compat_path(testdata, "llama-tiny", "f32")) as untied:
        assert not np.array_equal(untied["classifier"], untied["embedding"])


def test_missing_lm_head_falls_back_to_the_embedding(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = hf_tensors(testdata, "llama-tiny")
    del tensors["lm_head.weight"]
    folder = make_model(tmp_path, testdata, tensors=as_f32(tensors))
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    with read_model(tmp_path / "out.m") as m:
        assert np.array_equal(m["classifier"], tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_checkpoint_converts_byte_identically(
    testdata: Path, tmp_path: Path, with_index: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, tensors={})
    names = sorted(hf_tensors(testdata, "llama-tiny"), reverse=True)  # shards not in file order
    tensors = hf_tensors(testdata, "llama-tiny")
    weight_map = {}
    for shard in range(3):
        shard_name = f"model-{shard + 1:05d}-of-00003.safetensors"
        part = {name: tensors[name] for name in names[shard::3]}
        write_safetensors(folder / shard_name, as_f32(part))
        weight_map.update(dict.fromkeys(part, shard_name))
    (folder / "model.safetensors").unlink()
    if with_index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    assert (tmp_path / "out.m").read_bytes() == compat_path(testdata, "llama-tiny", "f32").read_bytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_bf16_and_f16_inputs_are_widened_exactly(
    testdata: Path, tmp_path: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = hf_tensors(testdata, "llama-tiny")
    if dtype == "BF16":
        narrow = {name: ("BF16", to_bf16(a)) for name, a in tensors.items()}
        widen = {name: (raw.astype(np.uint32) << 16).view(np.float32) for name, (_, raw) in narrow.items()}
    else:
        narrow = {name: ("F16", a.astype(np.float16)) for name, a in tensors.items()}
        widen = {name: raw.astype(np.float32) for name, (_, raw) in narrow.items()}
    folder = make_model(tmp_path, testdata, tensors=narrow)
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    expected = make_model(tmp_path / "expected", testdata, tensors=as_f32(widen))
    assert convert(capsys, expected, "f32", tmp_path / "expected.m", "-q")[0] == 0
    assert (tmp_path / "out.m").read_bytes() == (tmp_path / "expected.m").read_bytes()
    with read_model(tmp_path / "out.m") as m:
        assert np.abs(m["layers.0.wv"] - tensors["model.layers.0.self_attn.v_proj.weight"]).max() < 1e-3


LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
    "rope_type": "llama3",
}


def rope_parameters_form(config: dict[str, Any]) -> None:
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA3_SCALING}


def rope_scaling_form(config: dict[str, Any]) -> None:
    config.pop("rope_parameters")
    config.update(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)


@pytest.mark.parametrize("form", [rope_parameters_form, rope_scaling_form])
def test_llama3_rope_scaling_is_read_in_both_config_forms(
    testdata: Path, tmp_path: Path, form: Callable[[dict[str, Any]], None], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, edit_config=form)
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    with read_model(tmp_path / "out.m") as m:
        assert m.header[13:19] == [(12, 500000), (14, 8), (15, 1), (16, 4), (17, 256), (18, 2)]
        assert m.config.has_rope_scaling and m.config.rope_type.name == "LLAMA3_1"


def test_num_local_experts_alone_is_enough(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, "qwen3moe-tiny", edit_config=lambda c: c.pop("num_experts"))
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    assert (tmp_path / "out.m").read_bytes() == compat_path(testdata, "qwen3moe-tiny", "f32").read_bytes()


def test_progress_bar_shows_tensors_bytes_and_speed(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = convert(capsys, testdata / "compat" / "hf" / "llama-tiny", "f32", tmp_path / "out.m")
    assert code == 0
    assert "tensor 30/30 classifier" in err and "B/s" in err and "2.75M/2.75M" in err


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("HF_DIR", "FLOAT_TYPE", "NAME", "--output", "--threads", "--quiet", "q40", "bf16"):
        assert text in out


# ---- rejections --------------------------------------------------------------------------------
def edit(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config.update(changes)


CONFIG_REJECTIONS = [
    (edit(model_type="gemma2"), r"model_type 'gemma2' is not supported \(supported: llama, mistral, qwen3"),
    (edit(attention_bias=True), "attention_bias is true; biases are not supported"),
    (edit(mlp_bias=True), "mlp_bias is true; biases are not supported"),
    (edit(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope scaling type 'yarn' is not supported"),
    (edit(rope_scaling={"type": "linear", "factor": 2.0}), r"rope scaling type 'linear' is not supported"),
    (edit(rms_norm_eps=1e-4), r"rms_norm_eps 0.0001 is not supported .*1e-5 or 1e-6"),
    (edit(rope_theta=10000.5), "rope_theta = 10000.5 is not a whole number"),
    (edit(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh' is not supported"),
    (edit(num_key_value_heads=3), "n_heads 8 is not a multiple of n_kv_heads 3"),
    (edit(intermediate_size=320), r"gate_proj.weight has shape \[384, 128\], expected \[320, 128\]"),
    (edit(quantization_config={"quant_method": "gptq"}), "already quantized"),
    (lambda c: c.pop("hidden_size"), "config.json has no hidden_size"),
]


@pytest.mark.parametrize(("edit_config", "message"), CONFIG_REJECTIONS)
def test_unsupported_config_is_rejected_in_one_line(
    testdata: Path, tmp_path: Path, edit_config: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, edit_config=edit_config)
    assert_rejected(capsys, folder, tmp_path, message)


def test_moe_with_dense_layers_is_rejected(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, "qwen3moe-tiny", edit_config=edit(mlp_only_layers=[0]))
    assert_rejected(capsys, folder, tmp_path, "every layer must be MoE")


def test_bias_tensors_are_rejected(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = hf_tensors(testdata, "llama-tiny")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    folder = make_model(tmp_path, testdata, tensors=as_f32(tensors))
    assert_rejected(
        capsys, folder, tmp_path, r"bias tensors \(model.layers.0.self_attn.q_proj.bias.*not supported"
    )


def test_missing_tensor_is_named(testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = hf_tensors(testdata, "llama-tiny")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    folder = make_model(tmp_path, testdata, tensors=as_f32(tensors))
    assert_rejected(
        capsys,
        folder,
        tmp_path,
        r"tensor model.layers.1.self_attn.v_proj.weight is missing "
        r"\(needed for layers.1.wv\)",
    )


def test_unsupported_tensor_dtype_is_named(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = as_f32(hf_tensors(testdata, "llama-tiny"))
    tensors["model.norm.weight"] = ("I32", np.zeros(128, np.int32))
    folder = make_model(tmp_path, testdata, tensors=tensors)
    assert_rejected(capsys, folder, tmp_path, "tensor model.norm.weight has dtype I32")


def test_truncated_safetensors_is_reported(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, tensors=as_f32(hf_tensors(testdata, "llama-tiny")))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    assert_rejected(capsys, folder, tmp_path, "inconsistent offsets .* damaged or truncated")


def test_q40_of_rows_not_a_multiple_of_32_is_rejected(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_rejected(
        capsys,
        testdata / "stories260K_hf",
        tmp_path,
        r"layers.0.w2 has rows of 172 values, not a multiple of 32: q40 cannot store it",
        "q40",
    )


def test_folder_problems_are_reported(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_rejected(capsys, tmp_path / "nowhere", tmp_path, "nowhere is not a folder")
    (tmp_path / "empty").mkdir()
    assert_rejected(capsys, tmp_path / "empty", tmp_path, "no config.json")
    folder = make_model(tmp_path, testdata, tensors={})
    (folder / "model.safetensors").unlink()
    assert_rejected(capsys, folder, tmp_path, r"no \*.safetensors files found")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    assert_rejected(capsys, folder, tmp_path, "names x.safetensors, which is missing")


def test_bad_arguments_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "q4", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'q4'" in err


def assert_rejected(
    capsys: pytest.CaptureFixture[str],
    folder: Path,
    tmp_path: Path,
    message: str,
    float_type: str = "f32",
    *extra: str,
) -> None:
    code, err = convert(capsys, folder, float_type, tmp_path / "out.m", "-q", *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("convert-hf: error: "), err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out.m").exists() and not (tmp_path / "out.m.tmp").exists()


def test_mistral_converts_like_llama(
    testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path, testdata, edit_config=edit(model_type="mistral", sliding_window=None))
    assert convert(capsys, folder, "f32", tmp_path / "out.m", "-q")[0] == 0
    assert (tmp_path / "out.m").read_bytes() == compat_path(testdata, "llama-tiny", "f32").read_bytes()


def test_threads_flag_sets_the_core_thread_count(
    testdata: Path, tmp_path: Path, core: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    before = core.get_num_threads()
    try:
        code, err = convert(
            capsys, testdata / "compat" / "hf" / "llama-tiny", "q40", tmp_path / "a.m", "-q", "--threads", "1"
        )
        assert code == 0, err
        assert core.get_num_threads() == 1
    finally:
        core.set_num_threads(before)
    assert (tmp_path / "a.m").read_bytes() == compat_path(testdata, "llama-tiny", "q40").read_bytes()
    assert_rejected(
        capsys,
        testdata / "compat" / "hf" / "llama-tiny",
        tmp_path,
        "--threads must be at least 1",
        "q40",
        "--threads",
        "0",
    )
