"""`tpustack export`: the byte tokenizer as tokenizer.json, the complete Hugging Face export,
the orbax serving export (read back without tpustack, and onto another mesh)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from text_samples import sample_strings
from tpustack.data import ByteTokenizer
from tpustack.interop.tokenizer_json import byte_tokenizer, byte_tokenizer_config, byte_tokenizer_json


def _write_byte_tokenizer(directory) -> None:
    (directory / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    (directory / "tokenizer_config.json").write_text(json.dumps(byte_tokenizer_config()))


def test_byte_tokenizer_json_encodes_and_decodes_as_the_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    _write_byte_tokenizer(tmp_path)
    ours, texts = ByteTokenizer(), sample_strings(1000, specials=True)
    loaded = byte_tokenizer()
    bare = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # knows nothing of split_special_tokens
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, len(auto)) == (256, 257, 258)
    for text in texts:
        ids = ours.encode(text).tolist()
        assert loaded.encode(text).ids == ids, text
        assert auto(text)["input_ids"] == ids, text  # add_special_tokens (the default) adds nothing
        assert loaded.decode(ids) == text and auto.decode(ids) == text, text
        if "<s>" not in text and "</s>" not in text:
            assert bare.encode(text).ids == ids, text
    # special ids decode to nothing, as ByteTokenizer.decode drops them
    assert auto.decode([256, 104, 105, 257], skip_special_tokens=True) == "hi" == ours.decode([256, 104, 105, 257])
