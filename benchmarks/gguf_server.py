"""llama.cpp's own OpenAI-compatible server (llama_cpp.server) on a GGUF export answers the same chat
requests as `tpustack serve` on the checkpoint: text compared at temperature 0 (issue 13, item 2);
the same prompts as raw completions too (a code model's chat answers can be all indentation).

    python benchmarks/gguf_server.py [--checkpoint runs/small_12m] [--max-tokens 32]

Exports the checkpoint with `tpustack export --format gguf --type f32` (the chat template
goes into the file), starts both servers on localhost, sends each prompt to both, and
writes benchmarks/results/gguf_server.json. Needs llama-cpp-python's server extras
(fastapi, sse-starlette, starlette-context, pydantic-settings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PROMPTS = ["def main():", "import os\nimport sys\n", "class Parser(object):", "Write a for loop in Python.",
           "    return", "Hello! Who are you?"]

# llama_cpp.server applies a repeat penalty of 1.1 unless told otherwise (its own request field);
# greedy decoding means none, as in tpustack serve.
EXTRA = {"llama": {"repeat_penalty": 1.0}, "tpustack": {}}


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> str:
    """The served model id once /v1/models answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                return json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    raise TimeoutError(f"server on port {port} not ready in {timeout} s")


def ask(port: int, model: str, prompt: str, max_tokens: int, endpoint: str, extra: dict) -> dict:
    """One temperature-0 request: `chat` (the prompt as a user message) or `completions` (raw text)."""
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens, **extra}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "chat/completions" if endpoint == "chat" else "completions"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    choice = out["choices"][0]
    text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    return {"text": text, "finish_reason": choice["finish_reason"], "prompt_tokens": out["usage"]["prompt_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/small_12m")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/gguf_server.json")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gguf-server-")
    gguf_path = os.path.join(tmp, "model.gguf")
    subprocess.run([sys.executable, "-m", "tpustack", "export", "--checkpoint", args.checkpoint, "--format", "gguf",
                    "--type", "f32", "--out", gguf_path], check=True, capture_output=True)
    logs = {name: open(os.path.join(tmp, f"{name}.log"), "w") for name in ("llama", "tpustack")}
    servers = {
        "llama": (8431, subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--port",
                                          "8431", "--n_ctx", "1024", "--n_threads", "2"],
                                         stdout=logs["llama"], stderr=subprocess.STDOUT)),
        "tpustack": (8432, subprocess.Popen([sys.executable, "-m", "tpustack", "serve", "--checkpoint", args.checkpoint,
                                             "--port", "8432"], stdout=logs["tpustack"], stderr=subprocess.STDOUT)),
    }
    try:
        models = {name: wait_ready(port, proc) for name, (port, proc) in servers.items()}
        rows = []
        for endpoint in ("chat", "completions"):
            for prompt in PROMPTS:
                answers = {name: ask(servers[name][0], models[name], prompt, args.max_tokens, endpoint, EXTRA[name])
                           for name in servers}
                rows.append({"endpoint": endpoint, "prompt": prompt, **answers,
                             "equal": answers["llama"] == answers["tpustack"]})
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    result = {"checkpoint": args.checkpoint, "max_tokens": args.max_tokens, "temperature": 0,
              "equal": sum(r["equal"] for r in rows), "requests": len(rows), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for r in rows:
        print(f"{'equal' if r['equal'] else 'DIFFER':6} {r['endpoint']:11} {r['prompt']!r:32} -> "
              f"{r['tpustack']['text'][:50]!r}")
        if not r["equal"]:
            print(f"{'':6} {'':11} {'llama.cpp:':32} -> {r['llama']['text'][:50]!r}")
    print(f"{result['equal']}/{result['requests']} answers equal (llama_cpp.server on the f32 GGUF vs tpustack serve)")


if __name__ == "__main__":
    main()
