"""Chat templates: a Hugging Face directory's own, or the default that `tpustack serve` and
the Hugging Face export use when a tokenizer has none (the byte tokenizer never has one)."""

from __future__ import annotations

import json

from tpustack import paths

# `<|role|>\ncontent\n` per message, then `<|assistant|>\n`. Rendered with trim_blocks and
# lstrip_blocks, as transformers' apply_chat_template and the server both do.
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def load_chat_template(path: str) -> tuple[str | None, str, str]:
    """(chat template or None, bos token text, eos token text) of a Hugging Face directory."""
    template, bos, eos = None, "", ""
    cfg_path = paths.join(path, "tokenizer_config.json")
    if paths.isfile(cfg_path):
        cfg = json.loads(paths.read_bytes(cfg_path))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        text = lambda t: t.get("content", "") if isinstance(t, dict) else (t or "")  # noqa: E731
        bos, eos = text(cfg.get("bos_token")), text(cfg.get("eos_token"))
    jinja_path = paths.join(path, "chat_template.jinja")
    if template is None and paths.isfile(jinja_path):
        template = paths.read_bytes(jinja_path).decode("utf-8")
    return template, bos, eos
