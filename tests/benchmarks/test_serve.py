"""benchmarks/serve.py's pieces: statistics, workloads, the closed-loop client against a stub SSE server.

The run itself needs the peers (llama-server, vLLM) and minutes: see benchmarks/README.md.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import promptcache as pc
from benchmarks.common import filler_text
from benchmarks.serve import verdicts
from benchmarks.serving.client import Level, Sampling, Target, run_level, send
from benchmarks.serving.stats import LevelRun, Stream, Window, percentile, split_gaps, summarize
from benchmarks.serving.workloads import CHAT, COMPLETIONS, WorkloadSpec, build, parse_workloads, question
from promptcache.markup.parse import parse_prompt, parse_schema


@pytest.fixture(scope="module")
def tok():
    return pc.testing.tiny_tokenizer()


# ---- statistics -----------------------------------------------------------------------------------

def test_percentiles_interpolate_between_ranks_like_numpy():
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.99) == pytest.approx(4.96)
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_a_stream_has_its_ttft_gaps_and_the_servers_token_count():
    s = Stream(sent=10.0, token_times=[10.5, 10.6, 11.0])
    assert s.ttft == pytest.approx(0.5)
    assert [g.seconds for g in s.gaps()] == pytest.approx([0.1, 0.4])
    assert s.tokens == 3  # chunks counted without usage
    s.output_tokens = 4
    assert s.tokens == 4


def test_a_gap_is_during_a_prefill_when_it_overlaps_it_at_all():
    streams = [Stream(0.0, [1.0, 2.0, 3.0, 6.0, 7.0]), Stream(0.0, [4.0, 4.5, 8.0])]
    split = split_gaps(streams, Window(3.5, 5.0))
    # 3->6 spans the window, 4->4.5 lies inside it, 4.5->8 starts in it; 2->3 ends before it, 6->7 after
    assert sorted(split.during) == [0.5, 3.0, 3.5]
    assert sorted(split.outside) == [1.0, 1.0, 1.0]
    touching = split_gaps([Stream(0.0, [1.0, 3.5, 5.0, 6.0])], Window(3.5, 5.0))
    assert touching.during == [1.5] and sorted(touching.outside) == [1.0, 2.5]


def test_summaries_pool_rounds_add_wall_times_and_leave_failures_out():
    ok = Stream(0.0, [1.0, 1.1, 1.2], output_tokens=3, prompt_tokens=100, cached_tokens=90)
    failed = Stream(0.0, error="HTTP 503: busy")
    runs = [LevelRun([ok, failed], wall_s=2.0), LevelRun([Stream(5.0, [5.5, 5.7], prompt_tokens=50)], wall_s=3.0)]
    row = summarize(runs)
    assert (row["requests"], row["errors"], row["output_tokens"]) == (2, 1, 5)
    assert row["output_tokens_per_s"] == pytest.approx(5 / 5.0)
    assert row["ttft_p50_ms"] == pytest.approx(750.0)
    assert row["itl_p50_ms"] == pytest.approx(100.0)
    assert row["prompt_tokens_mean"] == 75 and row["cached_tokens_mean"] == 90
    assert "stall_ratio" not in row


def test_the_stall_ratio_is_the_p99_gap_during_the_long_prefill_over_the_p50_outside():
    # two streams ticking every 0.1 s; a prefill from 1.0 to 1.5 stalls the first, not the second
    ticks = [round(0.1 * i, 1) for i in range(1, 21)]
    stalled = [t for t in ticks if not 1.0 <= t <= 1.5] + [1.55]
    long = Stream(1.0, [1.5], prompt_tokens=4096)
    row = summarize([LevelRun([Stream(0.0, sorted(stalled)), Stream(0.0, ticks)], wall_s=2.0, long=long)])
    assert row["long_ttft_ms"] == pytest.approx(500.0)
    assert row["gaps_during"] == 6  # 0.9->1.55, and 1.0->1.1 ... 1.4->1.5
    assert row["itl_p50_outside_ms"] == pytest.approx(100.0)
    assert row["itl_p99_during_ms"] == pytest.approx(100 + 550 * 0.95)
    assert row["stall_ratio"] == pytest.approx(6.225)
    assert (row["long_requests"], row["long_errors"], row["long_prompt_tokens"]) == (1, 0, 4096)


def test_verdicts_need_both_servers_at_8_clients_and_promptcache_at_1():
    def row(w, s, c, tps, ttft, stall=None):
        return {"workload": w, "server": s, "clients": c, "output_tokens_per_s": tps, "ttft_p50_ms": ttft,
                **({} if stall is None else {"stall_ratio": stall})}
    rows = [row("prefix-1024", "promptcache", 1, 10, 100), row("prefix-1024", "promptcache", 8, 45, 300),
            row("prefix-1024", "llama-server", 8, 40, 400), row("module-2048", "promptcache", 8, 45, 500),
            row("module-2048", "llama-server", 8, 40, 400), row("mix-1024", "promptcache", 1, 5, 1, 9.0),
            row("mix-1024", "promptcache", 2, 5, 1, 2.0)]
    met = verdicts(rows)
    assert met["prefix-1024: 8 clients, tok/s >= llama-server's and TTFT p50 below it"] is True
    assert met["prefix-1024: 8 clients >= 4x the tok/s of 1"] is True
    assert met["module-2048: 8 clients, tok/s >= llama-server's and TTFT p50 below it"] is False
    assert met["module-2048: 8 clients >= 4x the tok/s of 1"] is None  # no 1-client row
    assert met["mix-1024: running streams' ITL p99 during the 4k prefill < 3x their p50 (2+ clients)"] is True


# ---- workloads ------------------------------------------------------------------------------------

def test_workload_entries_are_parsed_and_bad_ones_named():
    specs = parse_workloads("prefix:1024, module:2048,mix:512")
    assert [s.name for s in specs] == ["prefix-1024", "module-2048", "mix-512"]
    for bad in ("prefix", "suffix:10", "prefix:abc", "prefix:0", "prefix:9000"):
        with pytest.raises(ValueError, match=f"workload '{bad}'.*prefix, module, mix"):
            parse_workloads(bad)


def test_questions_are_distinct_from_their_first_words():
    qs = [question(i) for i in range(500)]
    assert len(set(qs)) == 500
    assert len({q.split(".")[0] for q in qs}) == 500


def test_level_question_numbers_are_distinct_within_the_cap():
    level = Level(clients=16, per_client=2, duration_s=1, first_question=1000)
    numbers = [level.question(k, n) for k in range(16) for n in range(4 * 2)]
    assert len(set(numbers)) == len(numbers) == level.max_requests
    assert min(numbers) == 1000


def test_prefix_and_mix_workloads_share_a_system_prompt_and_ask_distinct_questions(tok):
    prefix = build(WorkloadSpec("prefix", 200), tok, filler_text)
    mix = build(WorkloadSpec("mix", 200), tok, filler_text)
    a, b = prefix.call(1, pml=True), prefix.call(2, pml=False)
    assert a.path == b.path == CHAT
    assert a.body["messages"][0] == b.body["messages"][0] == {"role": "system", "content": prefix.context}
    assert a.body["messages"][1]["content"] != b.body["messages"][1]["content"]
    assert 180 <= len(tok(prefix.context, add_special_tokens=False).input_ids) <= 220
    assert prefix.long_call(1) is None
    first, second = mix.long_call(1), mix.long_call(2)
    assert first.path == COMPLETIONS and first.body["prompt"].split("\n")[0] != second.body["prompt"].split("\n")[0]
    assert len(tok(first.body["prompt"], add_special_tokens=False).input_ids) >= 4096


def test_the_module_workload_gives_promptcache_and_its_peers_the_same_text(tok):
    work = build(WorkloadSpec("module", 150), tok, filler_text)
    pml, plain = work.call(7, pml=True), work.call(7, pml=False)
    assert pml.path == plain.path == COMPLETIONS
    schema, prompt = parse_schema(work.schema), parse_prompt(pml.body["prompt"])
    (module,) = schema.children
    assert (schema.name, prompt.schema, module.name, [s.name for s in prompt.selections]) == (
        work.schema_name, work.schema_name, "doc", ["doc"])
    assert module.children[0].text + prompt.tail[0].text == plain.body["prompt"]
    assert plain.body["prompt"].startswith(work.context) and question(7) in plain.body["prompt"]


# ---- the client, against a stub server ------------------------------------------------------------

class _Stub(BaseHTTPRequestHandler):
    """Streams `max_tokens` chunks, 5 ms apart; a prompt starting "Report" waits 80 ms first (a prefill)."""

    protocol_version = "HTTP/1.0"
    seen: list = []

    def do_POST(self):  # noqa: N802 - the base class's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        long = str(body.get("prompt", "")).startswith("Report")
        self.seen.append((time.perf_counter(), long))
        if body.get("model") != "m":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "unknown model"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(0.08 if long else 0.005)
        chat = "messages" in body
        self.wfile.write(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n')
        for _ in range(body["max_tokens"]):
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.005)
        usage = {"completion_tokens": body["max_tokens"], "prompt_tokens": 12,
                 "prompt_tokens_details": {"cached_tokens": 10}}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    _Stub.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Target("127.0.0.1", server.server_address[1], "m", pml=False)
    server.shutdown()
    server.server_close()


def test_a_streamed_request_records_text_chunks_and_usage(stub, tok):
    work = build(WorkloadSpec("prefix", 50), tok, filler_text)
    s = send(stub, work.call(0, pml=False), Sampling(max_tokens=6, timeout_s=10))
    assert s.error is None and len(s.token_times) == 6  # the empty role chunk is not a token
    assert (s.output_tokens, s.prompt_tokens, s.cached_tokens) == (6, 12, 10)
    refused = send(Target(stub.host, stub.port, "other", False), work.call(0, pml=False), Sampling(6, 10))
    assert refused.error.startswith("HTTP 404") and refused.token_times == []


def test_the_long_prompt_arrives_once_every_client_has_finished_one_request_and_they_go_on(stub, tok):
    work = build(WorkloadSpec("mix", 50), tok, filler_text)
    level = Level(clients=3, per_client=1, duration_s=30, first_question=0)
    run = run_level(stub, work, level, Sampling(max_tokens=4, timeout_s=10), nonce=5)
    assert run.long is not None and run.long.error is None and run.window is not None
    firsts = sorted(run.streams, key=lambda s: s.sent)[:level.clients]  # each client's first request
    assert run.long.sent >= max(s.token_times[-1] for s in firsts)
    assert len(run.streams) > level.clients  # the clients kept streaming while the long prompt ran
    assert summarize([run])["gaps_during"] > 0
    assert sum(long for _, long in _Stub.seen) == 1
