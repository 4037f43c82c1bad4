"""The OpenAI-compatible server under uvicorn on 127.0.0.1, driven by the official openai
client (and raw httpx for what the client hides): outputs equal the solo Generator's,
parameters, errors, auth, limits, metrics, and a disconnect that frees the pages."""

import json
import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import pytest
import uvicorn
from flax.linen import meta
from prometheus_client.parser import text_string_to_metric_families

from helpers import start_serve
from tpustack.config import ModelConfig
from tpustack.data.tokenizers import ByteTokenizer
from tpustack.infer.decode import Generator
from tpustack.infer.engine import Engine, EngineConfig
from tpustack.infer.runner import Runner
from tpustack.infer.sampling import SamplingParams
from tpustack.infer.server import DEFAULT_CHAT_TEMPLATE, Server, ServerConfig, create_app
from tpustack.model import Decoder

openai = pytest.importorskip("openai")

CFG = ModelConfig(vocab_size=258, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=128, init_std=0.3)
ECFG = EngineConfig(page_size=8, num_pages=128, max_seqs=16, token_budget=64, chunk_size=16,
                    token_buckets=(64,), seq_buckets=(16,), max_top_logprobs=5)
KEY = "sk-test"
SOLO = 40  # tokens the solo Generator decodes per prompt
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def params():
    return meta.unbox(Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.fixture(scope="module")
def solo(params):
    gen, memo = Generator(CFG, params), {}

    def run(ids, n, sampling=SamplingParams()):  # one decode length: one compile
        key = (tuple(ids), sampling)
        if key not in memo:
            memo[key] = gen.generate([ids], SOLO, sampling, chunk=SOLO)[0]
        return memo[key][:n]
    return run


@pytest.fixture(scope="module")
def served(params):
    """(base url, Server) of a server on a free 127.0.0.1 port, in a thread."""
    runner = Runner(Engine(CFG, params, ECFG, eos_id=-1, detokenize=TOK.decode))
    server = Server(runner, TOK, ServerConfig(model_name="tiny", api_key=KEY, max_request_bytes=1 << 16,
                                              max_tokens_limit=120))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uv.started
    yield f"http://127.0.0.1:{port}", server
    uv.should_exit = True
    thread.join(30)
    assert runner.engine.pool.in_use() == 0 and runner.error is None


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metrics(url) -> dict:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_completions_greedy_equal_the_solo_generator(client, solo):
    ids = TOK.encode("hello there").tolist()
    want = solo(ids, 12)
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=12, temperature=0)
    assert r.choices[0].text == TOK.decode(want) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 12, 23)
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TOK.decode(want)
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_uses_the_template_and_streams(client, solo):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    from jinja2 import Template
    ids = TOK.encode(Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)).tolist()
    want = TOK.decode(solo(ids, 10))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_seeded_sampling_equals_solo(client, solo):
    ids = TOK.encode("abc").tolist()
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                                  n=3, extra_body={"top_k": 20})
    assert len(r.choices) == 3 and r.usage.completion_tokens == 24
    for c in r.choices:
        want = solo(ids, 8, SamplingParams(1.0, 20, 0.9, 7 + c.index))
        assert c.text == TOK.decode(want)
    texts = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, top_p=0.9,
                                           seed=7, n=2, extra_body={"top_k": 20}, stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in r.choices[:2]]


def test_stop_strings_cut_the_text(client, solo):
    ids = TOK.encode("stop me").tolist()
    full = TOK.decode(solo(ids, 40))
    k = next(k for k in range(3, 30) if "\ufffd" not in full[k - 1:k + 2])
    stop = full[k:k + 2]
    want = full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="stop me", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="stop me", max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="xyz", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the top one
        assert chosen <= 0 and len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-5)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)


def test_auth_and_errors_are_openai_shaped(served, client, solo):
    url, _ = served
    r = httpx.post(url + "/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    auth = {"Authorization": f"Bearer {KEY}"}
    in_flight = {}  # a stream that runs while the bad requests come and go

    def stream():
        chunks = client.completions.create(model="tiny", prompt="steady", max_tokens=40, temperature=0, stream=True)
        in_flight["text"] = "".join(c.choices[0].text for c in chunks)
    thread = threading.Thread(target=stream)
    thread.start()
    bad = [({"prompt": "a", "max_tokens": 10**6}, 400, "max_tokens"),
           ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
           ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
           ({"prompt": "a", "n": 0}, 400, "n"),
           ({"prompt": "a", "logprobs": 9}, 400, "logprobs"),
           ({"prompt": "a", "stop": [1]}, 400, "stop"),
           ({"prompt": ""}, 400, "prompt"),
           ({"prompt": "a" * 120, "max_tokens": 20}, 400, "max_tokens"),  # over the 128-token context
           ({"prompt": [1, 2, 999]}, 400, "prompt"),
           ({"prompt": "a", "model": "gpt-9"}, 404, "model")]
    for body, status, param in bad:
        r = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), body
    r = httpx.post(url + "/v1/chat/completions", json={"messages": []}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"[" * 50000, headers=auth)  # too deep for the parser
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/completions", json={"prompt": "a" * (1 << 17)}, headers=auth)
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a", max_tokens=10**6)
    assert e.value.status_code == 400
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list()] == ["tiny"]
    thread.join(60)
    assert in_flight["text"] == TOK.decode(solo(TOK.encode("steady").tolist(), 40))
    r = client.completions.create(model="tiny", prompt="ok", max_tokens=5, temperature=0)  # still serving
    assert r.choices[0].text == TOK.decode(solo(TOK.encode("ok").tolist(), 5))


def test_metrics_parse_and_move(served, client):
    url, _ = served
    before = metrics(url)
    client.completions.create(model="tiny", prompt="metrics", max_tokens=5, temperature=0)
    after = metrics(url)
    done = ("tpustack_requests_total", (("finish_reason", "length"),))
    assert after[done] == before.get(done, 0) + 1
    assert after[("tpustack_generation_tokens_total", ())] == before[("tpustack_generation_tokens_total", ())] + 5
    for name in ("tpustack_time_to_first_token_seconds_count", "tpustack_inter_token_latency_seconds_count"):
        assert after[(name, ())] > before[(name, ())]
    assert after[("tpustack_time_per_output_token_seconds_count", ())] == \
        before[("tpustack_time_per_output_token_seconds_count", ())] + 1
    for name in ("tpustack_requests_running", "tpustack_requests_waiting", "tpustack_kv_pages_in_use",
                 "tpustack_preemptions_total", "tpustack_prefix_cache_hit_rate"):
        assert (name, ()) in after
    assert after[("tpustack_kv_pages_in_use", ())] == 0


def test_disconnect_mid_stream_frees_the_pages(served):
    url, server = served
    pool = server.runner.engine.pool
    cancelled = ("tpustack_requests_total", (("finish_reason", "cancelled"),))
    before = metrics(url).get(cancelled, 0)
    body = {"model": "tiny", "prompt": "a long answer", "max_tokens": 110, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"][0]["text"] is not None
                assert pool.in_use() > 0
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while pool.in_use() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.in_use() == 0 and not server.runner.engine.has_work()
    assert metrics(url).get(cancelled, 0) == before + 1  # cancelled, not finished


def byte_level_tokenizer_json() -> str:
    """A tokenizer.json: byte-level BPE without merges (256 byte tokens) and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    return tok.to_str()


@pytest.mark.slow
def test_tpustack_serve_an_hf_directory_with_its_chat_template_then_sigterm(params, tmp_path):
    """The CLI end to end: the one loader, the checkpoint's jinja2 template, SIGTERM exits 0."""
    import signal

    from tpustack.interop.hf import save_hf_checkpoint

    ckpt = tmp_path / "hf"
    save_hf_checkpoint(str(ckpt), jax.device_get(params), CFG)
    (ckpt / "tokenizer.json").write_text(byte_level_tokenizer_json())
    template = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    proc, url = start_serve(ckpt, "--num-pages", "64", "--max-seqs", "4", "--token-budget", "32")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["hf"]
        r = client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0)
        assert r.usage.prompt_tokens == len("[USER] hi") + 1  # the template ran: bytes + </s>
        assert r.usage.completion_tokens <= 4
        # SIGTERM with a stream open: uvicorn stops accepting, the stream still runs to its end
        body = {"model": "hf", "prompt": "go", "max_tokens": 60, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["usage"]["completion_tokens"] == 60
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read()
    assert "Traceback" not in err, err[-2000:]
