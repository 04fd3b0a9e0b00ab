"""GGUF files: load time of a 1B-shaped Q4_K_M file, and perplexity of one model in several formats.

1. Load. A random-weight GGUF of Llama 3.2 1B's shape (dim 2048, ff 8192, 16 layers, 32 heads,
   8 KV heads, head_dim 64, vocab 128256, output tied to the embedding) with llama-quantize's
   Q4_K_M types (Q4_K matrices; attn_v and ffn_down Q6_K in the layers llama.cpp's
   `use_more_bits` picks, 8 of 16; the tied token_embd Q6_K) is made once with gguf-py's
   GGUFWriter from random K-quant blocks with sane fp16 scales, and cached beside model_cache.py's
   1B q40 `.m` model. Each configuration runs in a fresh process (so its peak RSS is its own), the
   configurations taken round-robin --runs times (medians): opening the file (header, metadata,
   tensor table), constructing `Engine(path, max_seq_len=256)` (for the GGUF: every K-quant
   matrix dequantized and requantized, Q4_K -> q40 and Q6_K -> q80 by default, everything -> q80
   with weight_type="q80"), the part of that spent requantizing, and a decode step after load.
   Decode speed is then measured once more with the three models loaded in one process, one
   step of each in turn (so that other load on the machine touches them alike): the GGUF runs
   the same kernels, so its time per token follows the bytes its matrices take.
   A breakdown times dequantize_rows and encode_rows alone on one tensor of each kind of conversion.
2. Perplexity. The synthetic llama-spm model of ../shared/testdata/gguf (random weights, Llama 2
   vocabulary) as F16 and Q8_0 GGUFs written here from the Hugging Face weights make_hf_models.py
   regenerates (the F16 file is byte for byte llama.cpp's conversion: its SHA-256 is checked), and
   llama.cpp's own Q4_0 and Q4_K_M files (the latter requantized to q40, the default, and to q80),
   over tests/data/perplexity_story.txt tokenized with each file's own tokenizer; also the mean KL
   divergence from F16 and the top-1 agreement at the scored positions. Random weights: the
   absolute perplexity means nothing, the ratio to F16 (and the KL divergence, which is far less
   noisy on 315 tokens) is what each quantization costs.

Generated files go to the cache folder ($DLLAMA_BENCH_CACHE, default ~/.cache/dllama-py/bench),
never into the repository. Prints tables and writes JSON (--json PATH).

    python benchmarks/bench_gguf.py --json bench_gguf.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model_cache import CACHE, llama_1b_q40  # noqa: E402

REPO = HERE.parent
TESTDATA = Path(os.environ.get("DLLAMA_TESTDATA", REPO.parent / "shared" / "testdata"))
GGUF_DATA = TESTDATA / "gguf"
STORY = REPO / "tests" / "data" / "perplexity_story.txt"
GGUF_1B = CACHE / "llama1b-shape-q4_k_m.gguf"
PPL_DIR = CACHE / "gguf-ppl"
HF_SHA256 = "a989f43c4efba9422676ff174e69b8b8856af5548062c047c649ad8a8b3e356b"  # hf/llama-spm/model.safetensors
F16_SHA256 = "68173382ef3b37ec1c1f526b75ee5d0a83767b0fb0b056b2d34003205087ec9b"  # llama.cpp's llama-spm-f16.gguf
Q4_K, Q6_K = 12, 14
BLOCK_BYTES = {Q4_K: 144, Q6_K: 210}


# ---- 1. the 1B-shaped Q4_K_M file ------------------------------------------------------------
def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's src/llama-quant.cpp: the layers whose attn_v and ffn_down Q4_K_M keeps in Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_tensors(n_layers: int = 16, dim: int = 2048, ff: int = 8192, vocab: int = 128256,
                   kv_dim: int = 512) -> list[tuple[str, int, int, int]]:
    """(name, ggml type, rows, cols) of a tied Llama's Q4_K_M file; type 0 is an F32 norm (rows 1)."""
    out = [("token_embd.weight", Q6_K, vocab, dim), ("output_norm.weight", 0, 1, dim)]
    for i in range(n_layers):
        more = Q6_K if use_more_bits(i, n_layers) else Q4_K
        out += [(f"blk.{i}.attn_norm.weight", 0, 1, dim), (f"blk.{i}.attn_q.weight", Q4_K, dim, dim),
                (f"blk.{i}.attn_k.weight", Q4_K, kv_dim, dim), (f"blk.{i}.attn_v.weight", more, kv_dim, dim),
                (f"blk.{i}.attn_output.weight", Q4_K, dim, dim), (f"blk.{i}.ffn_norm.weight", 0, 1, dim),
                (f"blk.{i}.ffn_gate.weight", Q4_K, ff, dim), (f"blk.{i}.ffn_up.weight", Q4_K, ff, dim),
                (f"blk.{i}.ffn_down.weight", more, dim, ff)]
    return out


def random_kquant(rng: np.random.Generator, ggml_type: int, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, row bytes) of random K-quant blocks whose fp16 super-block scales are 5e-4, so
    every value is finite and small (|x| < 0.5 for Q4_K, < 2.1 for Q6_K)."""
    size = BLOCK_BYTES[ggml_type]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(5e-4).tobytes(), dtype=np.uint8)
    if ggml_type == Q4_K:  # BlockQ4K {u16 d, dmin; u8 scales[12]; u8 qs[128]}
        blocks[:, :, 0:2] = scale
        blocks[:, :, 2:4] = scale
    else:  # BlockQ6K {u8 ql[128]; u8 qh[64]; i8 scales[16]; u16 d}
        blocks[:, :, 208:210] = scale
    return blocks.reshape(rows, -1)


def make_1b_gguf(path: Path = GGUF_1B) -> Path:
    """The cached 1B-shaped Q4_K_M GGUF (about 0.9 GB), written tensor by tensor."""
    if path.exists():
        return path
    import gguf

    print(f"making {path} (once)...", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    tensors = q4_k_m_tensors()
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type("model")
    w.add_name("Llama-3.2-1B-shaped random Q4_K_M")
    w.add_block_count(16)
    w.add_context_length(131072)
    w.add_embedding_length(2048)
    w.add_feed_forward_length(8192)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_key_length(64)
    w.add_value_length(64)
    w.add_file_type(15)  # MOSTLY_Q4_K_M
    w.add_vocab_size(128256)
    w.add_rope_dimension_count(64)
    w.add_quantization_version(2)
    for name, t, rows, cols in tensors:
        if t == 0:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            nbytes = rows * cols // 256 * BLOCK_BYTES[t]
            w.add_tensor_info(name, (rows, nbytes // rows), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, t, rows, cols in tensors:
        w.write_tensor_data(np.ones(cols, np.float32) if t == 0 else random_kquant(rng, t, rows, cols))
    w.close()
    tmp.replace(path)
    return path


def child_load(kind: str, path: str, weight_type: str | None, steps: int) -> dict:
    """One configuration, measured in this (fresh) process: open, Engine(...), decode steps."""
    from dllama_py.engine.engine import Engine
    from dllama_py.engine.exchange import ARGMAX
    from dllama_py.formats import gguf_file
    from dllama_py.formats.model_file import read_model

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if kind == "gguf":
        with open(path, "rb") as f:
            import mmap

            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                gguf_file.parse_header(data, Path(path))
        header_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = gguf_file.GGUFModel(path, weight_type)
        requantized = [t for t in model if t.name != "embedding" and t.source.info.ggml_type in (Q4_K, Q6_K)]
        kquant_bytes = sum(t.stored.nbytes for t in requantized)
        kquant_values = sum(math.prod(t.shape) for t in requantized)
    else:
        header_s = math.nan
        model = read_model(path)
        kquant_bytes = kquant_values = 0
    open_s = time.perf_counter() - t0
    model.close()

    requant_s = [0.0]
    data_property = gguf_file.GGUFTensor.data

    def timed_data(self):  # noqa: ANN001, ANN202 (GGUFTensor.data, timed)
        start = time.perf_counter()
        try:
            return data_property.fget(self)
        finally:
            requant_s[0] += time.perf_counter() - start

    gguf_file.GGUFTensor.data = property(timed_data)
    t0 = time.perf_counter()
    engine = Engine(path, max_seq_len=256, progress=False, weight_type=weight_type)
    load_s = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    matrix_bytes = engine.plan.node_weight_bytes(0) - engine.plan.embedding_bytes()
    token, times = 1, []
    for pos in range(steps + 2):
        t0 = time.perf_counter()
        engine.step([token], pos, ARGMAX)
        token = engine.argmax()
        times.append(time.perf_counter() - t0)
    decode_s = statistics.median(times[2:])
    types = sorted({str(ft.label) for ft in [engine.config.weight_float_type]
                    + [t for _, t in engine.config.tensor_types]})
    engine.close()
    return {"open_s": open_s, "header_s": header_s, "load_s": load_s,
            "requant_s": requant_s[0] if kind == "gguf" else 0.0, "kquant_bytes": kquant_bytes,
            "other_s": load_s - (requant_s[0] if kind == "gguf" else 0.0),
            "kquant_values": kquant_values, "decode_ms": decode_s * 1e3, "matrix_bytes": matrix_bytes,
            "matrix_types": types, "peak_rss": rss_load, "rss_before": rss_start,
            "peak_rss_after_decode": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child_decode(models: list[tuple[str, str | None]], rounds: int) -> dict:
    """Decode steps of several models loaded side by side, one step of each in turn."""
    from dllama_py.engine.engine import Engine
    from dllama_py.engine.exchange import ARGMAX

    engines = [Engine(path, max_seq_len=256, progress=False, weight_type=wt) for path, wt in models]
    tokens, times = [1] * len(engines), [[] for _ in engines]
    for pos in range(rounds + 2):
        for i, engine in enumerate(engines):
            t0 = time.perf_counter()
            engine.step([tokens[i]], pos, ARGMAX)
            tokens[i] = engine.argmax()
            times[i].append(time.perf_counter() - t0)
    for engine in engines:
        engine.close()
    return {"decode_ms": [statistics.median(t[2:]) * 1e3 for t in times],
            "decode_ms_min": [min(t[2:]) * 1e3 for t in times]}


def run_child(kind: str, path: Path, weight_type: str | None, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(path), weight_type or "-", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def requant_breakdown(path: Path, repeats: int) -> list[dict]:
    """One tensor of each kind of conversion: dequantize_rows alone and encode_rows alone over the
    tensor in gguf_file.CHUNK_VALUES chunks, and GGUFTensor.data (what the loader calls: both,
    plus placing the rows in one array)."""
    from dllama_py.formats import gguf_file
    from dllama_py.formats.model_file import encode_rows
    from dllama_py.model.config import FloatType

    rows_out = []
    models = {ft: gguf_file.GGUFModel(path, ft.label) for ft in (FloatType.Q40, FloatType.Q80)}
    for name, target in [("layers.2.w3", FloatType.Q40), ("layers.2.w3", FloatType.Q80),
                         ("layers.0.w2", FloatType.Q80), ("layers.0.w2", FloatType.Q40)]:
        tensor = models[target].tensors[name]
        info = tensor.source.info
        rows, cols = tensor.shape
        step = max(1, gguf_file.CHUNK_VALUES // cols)
        tensor.data  # noqa: B018 (page the file's bytes in)
        deq, enc, whole = [], [], []
        for _ in range(repeats):
            d = e = 0.0
            for r in range(0, rows, step):
                t0 = time.perf_counter()
                values = gguf_file.dequantize_rows(tensor.stored[r:r + step], info.ggml_type, cols)
                t1 = time.perf_counter()
                encode_rows(values, target)
                d, e = d + t1 - t0, e + time.perf_counter() - t1
            deq.append(d)
            enc.append(e)
            t0 = time.perf_counter()
            tensor.data  # noqa: B018
            whole.append(time.perf_counter() - t0)
        rows_out.append({"tensor": name, "gguf_type": info.type_name, "to": target.label, "values": rows * cols,
                         "gguf_bytes": info.nbytes, "dequantize_s": statistics.median(deq),
                         "encode_s": statistics.median(enc), "data_s": statistics.median(whole)})
    for model in models.values():
        model.close()
    return rows_out


def part_load(args: argparse.Namespace) -> dict:
    gguf_path = make_1b_gguf()
    m_path = llama_1b_q40()
    configs = [("m q40", "m", m_path, None), ("gguf default", "gguf", gguf_path, None),
               ("gguf q80", "gguf", gguf_path, "q80")]
    runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
    for k in range(args.runs):
        for label, kind, path, wt in configs:
            r = run_child(kind, path, wt, args.steps)
            runs[label].append(r)
            print(f"  run {k + 1}/{args.runs} {label}: load {r['load_s']:.2f} s, decode {r['decode_ms']:.1f} ms",
                  flush=True)
    print(f"  decoding with the three models side by side ({args.steps * 3} rounds)...", flush=True)
    cmd = [sys.executable, __file__, "--child-decode", str(args.steps * 3)]
    for _, _, path, wt in configs:
        cmd += [str(path), wt or "-"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    side_by_side = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nload of a 1B-shaped model, Engine(max_seq_len=256), median of {args.runs} fresh processes; "
          "decode: side by side in one process")
    header = (f"{'model':<13} {'file GB':>7} {'open s':>7} {'load s':>7} {'requant s':>9} {'other s':>7}"
              f" {'kquant GB/s':>11}"
              f" {'Mval/s':>7} {'peak RSS GB':>11} {'matrices':>9} {'GB/token':>8} {'decode ms':>9}"
              f" {'GB/s':>5}")
    print(header)
    print("-" * len(header))
    table = []
    for n, (label, kind, path, wt) in enumerate(configs):
        rs = runs[label]

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        row = {"model": label, "path": str(path), "weight_type": wt, "file_bytes": path.stat().st_size,
               "runs": rs, **{k: med(k) for k in ("open_s", "header_s", "load_s", "requant_s", "other_s",
                                                   "peak_rss", "peak_rss_after_decode")},
               "kquant_bytes": rs[0]["kquant_bytes"], "kquant_values": rs[0]["kquant_values"],
               "matrix_bytes": rs[0]["matrix_bytes"], "matrix_types": rs[0]["matrix_types"],
               "decode_after_load_ms": med("decode_ms"), "decode_ms": side_by_side["decode_ms"][n],
               "decode_ms_min": side_by_side["decode_ms_min"][n]}
        row["requant_kquant_gbs"] = row["kquant_bytes"] / row["requant_s"] / 1e9 if row["requant_s"] else None
        row["requant_mvalues_s"] = row["kquant_values"] / row["requant_s"] / 1e6 if row["requant_s"] else None
        row["decode_weight_gbs"] = row["matrix_bytes"] / (row["decode_ms"] / 1e3) / 1e9
        table.append(row)
        gbs = f"{row['requant_kquant_gbs']:.3f}" if row["requant_kquant_gbs"] else "-"
        mvs = f"{row['requant_mvalues_s']:.0f}" if row["requant_mvalues_s"] else "-"
        print(f"{label:<13} {row['file_bytes'] / 1e9:>7.2f} {row['open_s']:>7.3f} {row['load_s']:>7.2f}"
              f" {row['requant_s']:>9.2f} {row['other_s']:>7.2f} {gbs:>11} {mvs:>7} {row['peak_rss'] / 1e9:>11.2f}"
              f" {'+'.join(row['matrix_types']):>9} {row['matrix_bytes'] / 1e9:>8.3f} {row['decode_ms']:>9.1f}"
              f" {row['decode_weight_gbs']:>5.1f}")
    print("open s: .m header / GGUF header + metadata + tensor table + config (GGUF header alone: "
          f"{table[1]['header_s'] * 1e3:.1f} ms); requant s: time inside GGUFTensor.data (dequantize + "
          "requantize) during the load; other s: the rest (copies, regrouping, page faults); kquant GB/s: "
          "GGUF K-quant bytes per requant second; GB/token: matrix bytes a decode step reads; GB/s: those "
          "bytes / decode time")

    print("\nrequantization breakdown (one tensor each; seconds, medians)")
    breakdown = requant_breakdown(gguf_path, max(1, args.runs))
    header = (f"{'tensor':<12} {'conversion':<12} {'Mvalues':>7} {'dequant s':>9} {'encode s':>8}"
              f" {'.data s':>8} {'Mval/s':>7} {'dequant Mval/s':>14} {'encode Mval/s':>13}")
    print(header)
    print("-" * len(header))
    for b in breakdown:
        mv = b["values"] / 1e6
        print(f"{b['tensor']:<12} {b['gguf_type'] + '->' + b['to']:<12} {mv:>7.1f} {b['dequantize_s']:>9.3f}"
              f" {b['encode_s']:>8.3f} {b['data_s']:>8.3f} {mv / b['data_s']:>7.0f} {mv / b['dequantize_s']:>14.0f}"
              f" {mv / b['encode_s']:>13.0f}")
    return {"load": table, "requant_breakdown": breakdown}


# ---- 2. perplexity of llama-spm in several formats --------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hf_weights() -> dict[str, np.ndarray]:
    """llama-spm's Hugging Face weights, regenerated once by make_hf_models.py into the cache."""
    from safetensors.numpy import load_file

    st = PPL_DIR / "hf" / "llama-spm" / "model.safetensors"
    if not st.exists():
        print(f"regenerating the HF weights into {PPL_DIR / 'hf'} (once)...", flush=True)
        subprocess.run([sys.executable, str(GGUF_DATA / "make_hf_models.py"), str(PPL_DIR / "hf"),
                        str(TESTDATA / "llama2_tokenizer" / "tokenizer.model"), str(TESTDATA / "qwen3_tokenizer")],
                       check=True)
        if sha256(st) != HF_SHA256:
            raise RuntimeError(f"{st} is not the README's (sha256 {HF_SHA256})")
    return load_file(str(st))


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation into its RoPE layout (Llama only)."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def write_llama_spm(path: Path, file_type: int) -> Path:
    """llama-spm as convert_hf_to_gguf.py writes it (the same keys, order and tensor order; F16
    file_type 1) or with every matrix Q8_0 by gguf-py's quantizer (file_type 7); the tokenizer
    metadata is copied from llama.cpp's Q4_0 file."""
    if path.exists():
        return path
    import gguf

    from dllama_py.formats.gguf_file import read_metadata

    cfg = json.loads((GGUF_DATA / "llama-spm-config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    meta = read_metadata(GGUF_DATA / "llama-spm-q4_0.gguf")
    hf = hf_weights()
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type("model")
    w.add_name("Llama Spm")
    w.add_size_label("20M")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_file_type(file_type)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_quantization_version(2)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    names = {"input_layernorm": "attn_norm", "mlp.down_proj": "ffn_down", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "post_attention_layernorm": "ffn_norm", "self_attn.k_proj": "attn_k",
             "self_attn.o_proj": "attn_output", "self_attn.q_proj": "attn_q", "self_attn.v_proj": "attn_v"}
    for key in sorted(hf):  # the converter's order: the safetensors file's (sorted) key order
        value = hf[key]
        if key == "lm_head.weight":
            name = "output.weight"
        elif key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, layer, rest = key.split(".", 3)
            name = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
        if name.endswith("attn_q.weight"):
            value = permute_rows(value, heads)
        elif name.endswith("attn_k.weight"):
            value = permute_rows(value, kv_heads)
        if value.ndim == 1:
            w.add_tensor(name, value.astype(np.float32))
        elif file_type == 1:
            w.add_tensor(name, value.astype(np.float16))
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(value, q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def scored_log_probs(engine, ids: list[int], ctx: int, bos_id: int | None) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """float64 log-softmax rows at the positions perplexity() scores (ctx/2 .. ctx-2 of every
    window), and the ids they predict: for the KL divergence and top-1 agreement with F16."""
    from dllama_py.engine.exchange import ALL_ROWS

    rows, targets = [], []
    for k in range(len(ids) // ctx):
        window = list(ids[k * ctx:(k + 1) * ctx])
        if bos_id is not None:
            window[0] = bos_id
        logits = []
        for pos in range(0, ctx, engine.max_batch):
            chunk = window[pos:pos + engine.max_batch]
            engine.step(chunk, pos, ALL_ROWS)
            logits.append(engine.logits().reshape(len(chunk), -1).astype(np.float64))
        x = np.concatenate(logits)[ctx // 2:ctx - 1]
        x -= x.max(axis=1, keepdims=True)
        rows.append(x - np.log(np.exp(x).sum(axis=1, keepdims=True)))
        targets += window[ctx // 2 + 1:]
    return np.concatenate(rows), np.asarray(targets)


def part_ppl(args: argparse.Namespace) -> dict:
    from dllama_py.converter.gguf_tokenizer import read_tokenizer

    from dllama_py.engine.engine import Engine
    from dllama_py.generation import perplexity as ppl

    PPL_DIR.mkdir(parents=True, exist_ok=True)
    f16 = write_llama_spm(PPL_DIR / "llama-spm-f16.gguf", 1)
    f16_same = sha256(f16) == F16_SHA256
    print(f"{f16}: {'byte for byte llama.cpp F16 conversion (sha256 checked)' if f16_same else 'NOT llama.cpp F16'}")
    if not f16_same:
        raise RuntimeError(f"{f16} differs from llama.cpp's llama-spm-f16.gguf (sha256 {F16_SHA256})")
    q8 = write_llama_spm(PPL_DIR / "llama-spm-q8_0.gguf", 7)
    formats = [("F16", f16, None, "written here (= llama.cpp's F16 file)"),
               ("Q8_0", q8, None, "written here, gguf-py quantize"),
               ("Q4_0", GGUF_DATA / "llama-spm-q4_0.gguf", None, "llama-quantize (output Q6_K -> q80)"),
               ("Q4_K_M->q40", GGUF_DATA / "llama-spm-q4_k_m.gguf", None, "llama-quantize, default requant"),
               ("Q4_K_M->q80", GGUF_DATA / "llama-spm-q4_k_m.gguf", "q80", "llama-quantize, weight_type q80")]
    text = STORY.read_text()
    results = []
    reference_ids = None
    base_logp = None
    for label, path, wt, note in formats:
        tokenizer, _ = read_tokenizer(path)
        ids = ppl.tokenize_text(tokenizer, text)
        if reference_ids is None:
            reference_ids = ids
        elif ids != reference_ids:
            raise RuntimeError(f"{path} tokenizes the text differently from the F16 file")
        t0 = time.perf_counter()
        engine = Engine(path, max_seq_len=args.ctx, progress=False, weight_type=wt)
        types = sorted({engine.config.weight_float_type.label} | {t.label for _, t in engine.config.tensor_types})
        r = ppl.perplexity(engine, ids, args.ctx, ppl.window_bos(tokenizer))
        logp, targets = scored_log_probs(engine, ids, args.ctx, ppl.window_bos(tokenizer))
        engine.close()
        if not np.allclose(-logp[np.arange(len(targets)), targets], r.token_nll, rtol=1e-6, atol=1e-6):
            raise RuntimeError("the KL pass does not score the tokens perplexity() scores")
        if label == "F16":
            base_logp = logp
        kld = (np.exp(base_logp) * (base_logp - logp)).sum(axis=1)  # KL(F16 || this), per token
        top1 = float(np.mean(base_logp.argmax(axis=1) == logp.argmax(axis=1)))
        results.append({"format": label, "path": str(path), "weight_type": wt, "note": note, "held_as": types,
                        "perplexity": r.perplexity, "standard_error": r.standard_error,
                        "windows": r.windows, "scored_tokens": r.scored_tokens, "text_tokens": r.text_tokens,
                        "seconds": time.perf_counter() - t0, "token_nll": r.token_nll,
                        "kld_mean": float(kld.mean()), "kld_stderr": float(kld.std() / math.sqrt(kld.size - 1)),
                        "top1_agreement": top1})
    base = results[0]
    print(f"\nperplexity of llama-spm (random weights), {STORY.name}: {base['text_tokens']} tokens, ctx {args.ctx}, "
          f"{base['windows']} windows, {base['scored_tokens']} scored tokens")
    header = (f"{'format':<12} {'held as':<8} {'PPL':>9} {'± stderr':>9} {'ln PPL':>7} {'ratio to F16':>12}"
              f" {'paired ±':>8} {'KLD vs F16':>10} {'±':>6} {'same top-1':>10}  source")
    print(header)
    print("-" * (len(header) + 30))
    for r in results:
        diff = r["token_nll"] - base["token_nll"]
        mean = float(diff.mean())
        err = float(diff.std() / math.sqrt(diff.size - 1)) if diff.size > 1 else math.nan
        r["ratio_to_f16"] = math.exp(mean)
        r["ratio_stderr"] = math.exp(mean) * err  # from the paired per-token differences
        print(f"{r['format']:<12} {'+'.join(r['held_as']):<8} {r['perplexity']:>9.3g} {r['standard_error']:>9.2g}"
              f" {math.log(r['perplexity']):>7.3f} {r['ratio_to_f16']:>12.4f} {r['ratio_stderr']:>8.4f}"
              f" {r['kld_mean']:>10.4f} {r['kld_stderr']:>6.4f} {100 * r['top1_agreement']:>9.1f}%  {r['note']}")
    print("ratio = exp(mean over tokens of nll - nll_F16); paired ±: its standard error from the per-token "
          "differences; KLD: mean KL(F16 || format) over the scored positions (nats); same top-1: argmax agrees")
    for r in results:
        del r["token_nll"]
    return {"ctx": args.ctx, "text": str(STORY.relative_to(REPO)), "f16_equals_llama_cpp": f16_same,
            "results": results}


def host() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from dllama_py.model import kernels

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "isa": kernels.best_isa()}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child-decode":
        rest = sys.argv[3:]
        models = [(rest[i], None if rest[i + 1] == "-" else rest[i + 1]) for i in range(0, len(rest), 2)]
        print(json.dumps(child_decode(models, int(sys.argv[2]))))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, wt, steps = sys.argv[2:6]
        print(json.dumps(child_load(kind, path, None if wt == "-" else wt, int(steps))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per load configuration (median)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed after each load (median)")
    parser.add_argument("--ctx", type=int, default=128, help="perplexity window (default 128)")
    parser.add_argument("--skip-load", action="store_true", help="skip part 1 (load of the 1B-shaped file)")
    parser.add_argument("--skip-ppl", action="store_true", help="skip part 2 (perplexity table)")
    args = parser.parse_args(argv)
    out = {"host": host()}
    print(f"{out['host']['date']}, {out['host']['cpu']}, {out['host']['cores']} cores, {out['host']['isa']}")
    if not args.skip_load:
        out.update(part_load(args))
    if not args.skip_ppl:
        print()
        out["perplexity"] = part_ppl(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
