"""LRS where reasoning models are served: one `vllm serve --data-parallel-size 2` of a tiny
Llama whose tokenizer has `<think>` and `</think>`, started with `VLLM_PATCH=rerank
RERANK_BEST_OF=3 VLLM_PLUGINS=telltale_norm` (eager, CPU).

- Clients that send nothing extra get the best of 3 (the `openai` client, and a real lm-eval
  `local-completions` run, counted in the engines' statistics).
- Annotations arrive from both data-parallel engines at once, with no waiting, and
  `telltale_norm.stats(url)` reports both engines.
- `telltale_span` scores exactly the decode steps of its span, checked against a
  plain-PyTorch decoder and a plain loop over the token ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import telltale_norm
from processes import VllmServer, clean_env, post
from reference_decoder import ReferenceDecoder
from rerank_oracles import TAU, TAU_JSON, expected_scores, reference_norms, span_steps
from telltale_norm.tasks import task_dir

K = 3
ENV = {"VLLM_PATCH": "rerank", "PATCHED_LAYERS": "1,2", "PATCHED_TAU_JSON": TAU_JSON,
       "RERANK_BEST_OF": str(K), "VLLM_PLUGINS": "telltale_norm"}


@pytest.fixture(scope="module")
def reasoning_server(think_model, tmp_path_factory):
    server = VllmServer(think_model, ENV, tmp_path_factory.mktemp("serve-dp") / "serve.log",
                        args=("--data-parallel-size", "2"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def rerank_requests(server):
    """Rerank candidates each data-parallel engine has admitted, by dp_rank."""
    return {s["dp_rank"]: s["rerank_requests"]
            for s in telltale_norm.stats(server.url, all_ranks=True)}


def test_clients_that_send_nothing_extra_get_the_best_of_k(reasoning_server):
    import openai

    client = openai.OpenAI(base_url=reasoning_server.url + "/v1", api_key="none")
    before = sum(rerank_requests(reasoning_server).values())
    chat = client.chat.completions.create(model=reasoning_server.model, max_tokens=8,
                                          messages=[{"role": "user", "content": "Hi"}])
    text = client.completions.create(model=reasoning_server.model, prompt="Hi", max_tokens=8)
    for resp in (chat.model_dump(), text.model_dump()):
        (choice,) = resp["choices"]
        (entry,) = resp["telltale"]["choices"]
        assert entry["best_of"] == K and len(entry["candidates"]) == K
        assert choice["telltale_scores"] == entry["candidates"][entry["selected_candidate"]][
            "telltale_scores"]
        assert resp["usage"]["completion_tokens"] == sum(
            c["completion_tokens"] for c in entry["candidates"])
    assert sum(rerank_requests(reasoning_server).values()) - before == 2 * K


def test_annotations_arrive_from_both_data_parallel_engines(reasoning_server):
    before = rerank_requests(reasoning_server)
    assert sorted(before) == [0, 1]  # both engines report
    results: dict[int, tuple[int, dict, float]] = {}

    def ask(i):
        start = time.monotonic()
        status, body = post(reasoning_server.url + "/v1/completions", {
            "model": reasoning_server.model, "prompt": f"Count to {i}:", "n": 2,
            "max_tokens": 8, "temperature": 0.8, "ignore_eos": True},
            headers={"X-data-parallel-rank": str(i % 2)})  # half on each engine
        results[i] = status, body, time.monotonic() - start

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for status, body, seconds in results.values():
        assert status == 200, body
        assert [c["telltale_selected"] for c in body["choices"]].count(True) == 1
        assert body["telltale"]["selected"] and seconds < 60
    after = rerank_requests(reasoning_server)
    assert {rank: after[rank] - before[rank] for rank in after} == {0: 8, 1: 8}


@pytest.mark.parametrize("span", ["all", "reasoning", "answer"])
def test_a_span_scores_exactly_its_decode_steps(reasoning_server, think_model, span):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(think_model)
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    prompt = tokenizer("Think about 2 + 2.")["input_ids"] + [start]  # the thought is open
    status, body = post(reasoning_server.url + "/v1/completions", {
        "model": reasoning_server.model, "prompt": prompt, "n": 2, "max_tokens": 16,
        "temperature": 1.0, "seed": 3, "ignore_eos": True, "return_token_ids": True,
        "allowed_token_ids": [start, end, 100, 200, 300], "vllm_xargs": {"telltale_span": span}})
    assert status == 200, body
    reference = ReferenceDecoder(think_model)
    spans = []
    for choice in body["choices"]:
        tokens = choice["token_ids"]
        steps = np.array(span_steps(prompt, tokens[:-1], span, start, end))
        norm = reference_norms(reference, prompt, tokens)[steps]
        want = expected_scores(norm, np.float32([[TAU[1], TAU[2]]] * len(norm)))
        scores = choice["telltale_scores"]
        assert scores["span"] == span and scores["steps"] == steps.sum()
        for name in ("A", "B", "D", "mean"):
            assert scores[name] == pytest.approx(want[name], rel=1e-4, abs=1e-3), name
        spans.append((span_steps(prompt, tokens, "reasoning", start, end),
                      span_steps(prompt, tokens, "answer", start, end)))
    # seed 3: both candidates think, close the thought and answer (so each span is real)
    assert all(any(thought) and any(answer) for thought, answer in spans)


def test_lm_eval_local_completions_gets_best_of_answers(reasoning_server, tmp_path):
    before = sum(rerank_requests(reasoning_server).values())
    limit = 4
    done = subprocess.run([
        sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
        f"model={reasoning_server.model},base_url={reasoning_server.url}/v1/completions,"
        "tokenizer_backend=None,tokenized_requests=False,num_concurrent=2,max_retries=1",
        "--tasks", "telltale_wordproblems_easy", "--include_path", str(task_dir()),
        "--limit", str(limit), "--num_fewshot", "0", "--gen_kwargs", "max_gen_toks=8",
        "--log_samples", "--output_path", str(tmp_path)],
        env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    (samples,) = tmp_path.glob("*/samples_telltale_wordproblems_easy_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert {row["doc_id"] for row in rows} == set(range(limit))  # (a row per filter)
    # each of lm-eval's requests (greedy, n = 1) ran as K sampled rerank candidates
    assert sum(rerank_requests(reasoning_server).values()) - before == limit * K
