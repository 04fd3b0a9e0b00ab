"""NaN and infinity (issue 14, defect 3): refused as flags and request fields, refused in weights
by convert-hf unless asked, and a forward pass that produces them is an error that says so, for
one request only: the engine (one node or a cluster) and dllama-api go on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from api_support import ApiServer
from cluster_helpers import REPO, WorkerProcess, quiet
from test_convert_hf import as_f32, convert, hf_tensors, make_model

from dllama_py.cluster.root import cluster_engine
from dllama_py.commands.cli import main
from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ARGMAX, FULL, LogitsMode, NonFiniteLogits, Readout
from dllama_py.formats.model_file import read_model, write_model

NAN_TOKEN = 500  # its embedding row is NaN in nan_model: any prompt holding it makes NaN logits
TOPK = Readout(LogitsMode.TOPK, temperature=0.8)


@pytest.fixture(scope="module")
def nan_model(stories, tmp_path_factory) -> Path:
    """stories260K (f32) whose embedding row NAN_TOKEN is NaN; every other token is as before."""
    model, _ = stories
    path = tmp_path_factory.mktemp("nan") / "nan.m"
    with read_model(model) as m:
        config = m.config
        tensors = [(t.name, np.array(m[t.name], dtype=np.float32)) for t in m]
    for name, array in tensors:
        if name == "embedding":
            array[NAN_TOKEN] = np.nan
    write_model(path, config, tensors)
    return path


# ---- flags and fields -------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature must be a finite number, 0 or more, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, 0 or more, got inf"),
    (["--topp", "nan"], "--topp must be a finite number, got nan"),
    (["--topp", "inf"], "--topp must be a finite number, got inf"),
])
@pytest.mark.parametrize("mode", ["inference", "chat"])
def test_non_finite_sampling_flags_are_one_line_errors(stories, capsys, flags, message, mode):
    model, tok = stories
    argv = [mode, "--model", str(model), "--tokenizer", str(tok), "--nthreads", "1", *flags]
    if mode == "inference":
        argv += ["--prompt", "Once", "--steps", "2"]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("field", ["temperature", "top_p", "frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_request_fields_are_400_saying_so(api, field, value):
    body = b'{"prompt": "Once", "max_tokens": 2, "%s": %s}' % (field.encode(), value)
    response = api.post("/v1/completions", content=body, headers={**api.headers(), "content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "finite number" in error["message"], error


# ---- convert-hf -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_convert_hf_refuses_non_finite_weights_naming_the_tensor(testdata, tmp_path, capsys, bad):
    tensors = hf_tensors(testdata, "llama-tiny")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    folder = make_model(tmp_path, testdata, tensors=as_f32(tensors))
    code, err = convert(capsys, folder, "f32", tmp_path / "out.m", "-q")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("convert-hf: error: "), err
    assert "model.layers.1.mlp.down_proj.weight (for layers.1.w2) holds NaN or infinite values" in err, err
    assert "--allow-non-finite" in err
    assert not (tmp_path / "out.m").exists() and not (tmp_path / "out.m.tmp").exists()
    code, err = convert(capsys, folder, "f32", tmp_path / "out.m", "-q", "--allow-non-finite")
    assert code == 0, err
    assert "warning: tensor model.layers.1.mlp.down_proj.weight (for layers.1.w2) holds 1 NaN or infinite" in err
    with read_model(tmp_path / "out.m") as m:
        assert np.isfinite(m["layers.1.w2"]).sum() == m["layers.1.w2"].size - 1


# ---- the forward pass -------------------------------------------------------------------------


def test_non_finite_logits_are_an_error_and_the_engine_goes_on(nan_model):
    engine = Engine(nan_model, threads=1)
    try:
        for readout in (ARGMAX, TOPK, FULL):
            with pytest.raises(NonFiniteLogits, match="non-finite logits .*on node 0"):
                engine.step([1, NAN_TOKEN], 0, readout)
            engine.step([1, 403], 0, ARGMAX)
            assert engine.argmax() == 407
    finally:
        engine.close()


def test_non_finite_logits_on_a_cluster_leave_it_in_step(nan_model):
    worker = WorkerProcess()
    engine = cluster_engine(nan_model, [worker.address], threads=1, log=quiet, progress=False)
    try:
        for readout in (ARGMAX, TOPK, FULL):
            with pytest.raises(NonFiniteLogits, match="non-finite logits"):
                engine.step([1, NAN_TOKEN], 0, readout)
            engine.step([1, 403], 0, ARGMAX)
            assert engine.argmax() == 407
    finally:
        engine.close()
        worker.stop()
    assert not any("ended:" in line for line in worker.lines), worker.lines


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.8", "--topp", "0.9"],
                                      ["--temperature", "0.8", "--topp", "1"]])
def test_dllama_inference_says_the_logits_are_not_finite(stories, nan_model, sampling):
    """It used to emit token 0 forever (greedy) or end in an IndexError (sampling)."""
    _, tok = stories
    out = subprocess.run(
        [sys.executable, "-m", "dllama_py.commands.cli", "inference", "--model", str(nan_model), "--tokenizer",
         str(tok), "--prompt-ids", f"1,{NAN_TOKEN}", "--steps", "4", "--nthreads", "1", *sampling],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: the forward pass produced non-finite logits"), \
        out.stderr


# ---- dllama-api -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(stories, nan_model, tmp_path_factory):
    _, tok = stories
    server = ApiServer(nan_model, tok, tmp_path_factory.mktemp("api_logs") / "api.log")
    yield server
    server.stop()


def test_non_finite_logits_fail_the_request_not_the_server(api):
    """Each such request used to tear the engine down and reload it."""
    response = api.post("/v1/completions", json={"prompt": [1, NAN_TOKEN], "max_tokens": 3, "temperature": 0})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "non_finite_logits" and "non-finite logits" in error["message"], error
    streamed = api.post("/v1/completions", json={"prompt": [1, NAN_TOKEN], "max_tokens": 3, "stream": True})
    assert "non_finite_logits" in streamed.text
    status = api.health().json()
    assert status["model_loaded"] and status["reconnect_attempts"] == 0, status
    assert status["requests"]["failed"] >= 2
    good = api.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert good.status_code == 200, good.text
    assert "reconnecting" not in api.log()

