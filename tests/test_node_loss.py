"""A worker lost in the middle of a generation: the root names it, plans the model onto the
nodes that remain, ships their slices again, evaluates the sequence so far again and carries
on; the text is the undisturbed one. `--on-node-loss stop` keeps the error. A worker that
comes back rejoins (Engine.rejoin, which dllama-api calls while idle)."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_helpers import WorkerProcess

from dllama_py.cluster.root import cluster_engine
from dllama_py.engine.engine import EngineError
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer


def generate_killing(engine, tokenizer, case, victim: WorkerProcess | None, at: int) -> list[int]:
    """Greedy generation of a reference case; `victim` is killed (SIGKILL) after token `at`."""
    def on_token(event) -> None:
        nonlocal count
        count += 1
        if victim is not None and count == at:
            victim.stop()

    count = 0
    result = Generator(engine, tokenizer).generate(tokenizer.encode(case["prompt"]), case["num_generated"],
                                                   Sampler(0.0), stop_ids=[1], on_token=on_token)
    return result.generated_ids


@pytest.mark.parametrize("victim_index", [0, 1])
def test_a_worker_killed_mid_generation_of_three_nodes(stories, reference, victim_index):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    workers = [WorkerProcess(), WorkerProcess()]
    lines: list[str] = []
    try:
        engine = cluster_engine(model, [w.address for w in workers], threads=1, log=lines.append, progress=False,
                                buffer_type="f32")
        try:
            victim = workers[victim_index]
            case = reference[0]
            got = generate_killing(engine, tokenizer, case, victim, at=20)
            assert got == case["generated_ids"]
            assert engine.plan.n_nodes == 2 and engine.lost == [victim.address]
            assert any(f"lost node {victim.address}" in line for line in lines), lines
        finally:
            engine.close()
    finally:
        for w in workers:
            w.stop()


def test_batched_sequences_survive_and_the_worker_rejoins(stories, reference):
    """Three sequences in their slots when a worker of three dies: each slot is evaluated again
    on the two nodes left and every sequence's logits stay those of an undisturbed run; the
    worker restarted on its port comes back with rejoin()."""
    model, _ = stories
    workers = [WorkerProcess(), WorkerProcess()]
    prompts = [[1, 400, 30, 8], [1, 90, 12], [1, 7, 7, 7, 7, 250]]
    try:
        engine = cluster_engine(model, [w.address for w in workers], threads=1, log=lambda _: None,
                                progress=False, buffer_type="f32", slots=3)
        try:
            engine.step_batch([(i, 0, p, ALL_ROWS) for i, p in enumerate(prompts)])
            workers[1].stop()
            engine.step_batch([(i, len(p), [42], ALL_ROWS) for i, p in enumerate(prompts)])
            after_loss = [engine.logits(i).copy() for i in range(3)]
            assert engine.plan.n_nodes == 2
            assert not engine.rejoin()  # nobody listens on its port yet
            workers[1] = WorkerProcess(port=workers[1].port)  # the lost worker comes back
            assert engine.rejoin() and engine.plan.n_nodes == 3 and engine.lost == []
            engine.step_batch([(i, len(p) + 1, [43], ALL_ROWS) for i, p in enumerate(prompts)])
            after_rejoin = [engine.logits(i).copy() for i in range(3)]
        finally:
            engine.close()
        with cluster_engine(model, [], threads=1, log=lambda _: None, progress=False, slots=3) as alone:
            alone.step_batch([(i, 0, p + [42], ALL_ROWS) for i, p in enumerate(prompts)])
            want_loss = [alone.logits(i)[-1:].copy() for i in range(3)]
            alone.step_batch([(i, len(p) + 1, [43], ALL_ROWS) for i, p in enumerate(prompts)])
            want_rejoin = [alone.logits(i).copy() for i in range(3)]
        for got, want in zip(after_loss + after_rejoin, want_loss + want_rejoin):
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    finally:
        for w in workers:
            w.stop()


def test_on_node_loss_stop_keeps_the_error(stories, reference):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    workers = [WorkerProcess(), WorkerProcess()]
    try:
        engine = cluster_engine(model, [w.address for w in workers], threads=1, log=lambda _: None, progress=False,
                                on_node_loss="stop")
        try:
            with pytest.raises(EngineError, match="the cluster failed"):
                generate_killing(engine, tokenizer, reference[0], workers[0], at=10)
        finally:
            engine.close()
    finally:
        for w in workers:
            w.stop()


def test_dllama_api_keeps_serving_when_a_worker_dies_and_takes_it_back(stories_files, testdata, tmp_path):
    """root + 2 workers, two greedy streams: one worker is killed while they stream; both finish
    with llama2.c's texts on the two nodes left, /health names the lost worker, and once the
    worker runs again the idle server takes it back (3 nodes)."""
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from api_support import ApiServer, Worker, free_port, reference_completion
    from test_api_parallel import wait_for

    workers = [Worker(free_port(), tmp_path / "w1.log"), Worker(free_port(), tmp_path / "w2.log")]
    api = ApiServer(*stories_files, tmp_path / "api.log", "--parallel", "2", "--buffer-float-type", "f32",
                    "--debug-token-delay-ms", "20", "--reconnect-interval", "0.5", "--workers",
                    *[w.address for w in workers])
    try:
        refs = [reference_completion(testdata, p) for p in ("Once upon a time", "The cat")]
        streamed = [threading.Event() for _ in refs]

        def stream(i: int) -> str:
            body = {"prompt": refs[i]["prompt"], "max_tokens": refs[i]["num_generated"], "temperature": 0,
                    "stream": True}
            text = ""
            with httpx.stream("POST", f"{api.url}/v1/completions", json=body, headers=api.headers(),
                              timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if event["choices"]:
                            text += event["choices"][0]["text"]
                            if len(text) > 20:
                                streamed[i].set()
            return refs[i]["prompt"] + text

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(stream, i) for i in range(2)]
            assert all(event.wait(60) for event in streamed)
            assert api.get("/health").json()["slots"]["in_use"] == 2  # both still streaming
            workers[1].kill()
            texts = [f.result() for f in futures]
        assert texts == [ref["text"] for ref in refs]
        health = api.get("/health").json()
        assert health["nodes"] == 2 and health["lost_workers"] == [workers[1].address], health
        assert f"lost node {workers[1].address}" in api.log()
        workers[1] = Worker(int(workers[1].address.rsplit(":", 1)[1]), tmp_path / "w2-again.log")
        wait_for(lambda: api.get("/health").json()["nodes"] == 3, timeout=60)
        answer = api.client().completions.create(model="stories260K", prompt=refs[0]["prompt"], temperature=0,
                                                 max_tokens=refs[0]["num_generated"])
        assert refs[0]["prompt"] + answer.choices[0].text == refs[0]["text"]
    finally:
        api.stop()
        for w in workers:
            w.stop()


def test_a_frozen_worker_is_planned_around_too(stories, reference):
    """A worker that stops answering (SIGSTOP) rather than dying: noticed at the net timeout,
    found silent when asked again, planned around; the text is the undisturbed one."""
    import signal

    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    workers = [WorkerProcess(), WorkerProcess()]
    lines: list[str] = []
    frozen = workers[1]
    try:
        engine = cluster_engine(model, [w.address for w in workers], threads=1, log=lines.append, progress=False,
                                buffer_type="f32", timeout_ms=1500)
        try:
            def on_token(event) -> None:
                nonlocal count
                count += 1
                if count == 15:
                    frozen.proc.send_signal(signal.SIGSTOP)

            count = 0
            case = reference[1]
            result = Generator(engine, tokenizer).generate(tokenizer.encode(case["prompt"]), case["num_generated"],
                                                           Sampler(0.0), stop_ids=[1], on_token=on_token)
            assert result.generated_ids == case["generated_ids"]
            assert engine.lost == [frozen.address] and any(f"lost node {frozen.address}" in x for x in lines)
        finally:
            engine.close()
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        for w in workers:
            w.stop()
