"""Data: deterministic, resumable batches, per-host slices, every source and tokenizer."""

import json

import numpy as np
import pytest

from tpustack.config import DataConfig
from tpustack.data import Batcher, ByteTokenizer, load_tokenizer, load_tokens
from tpustack.errors import UserError


def test_batch_depends_only_on_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a, b = Batcher(tokens, 8, 32, seed=1), Batcher(tokens, 8, 32, seed=1)
    for step in (0, 7, 123456):
        np.testing.assert_array_equal(a.host_batch(step)["inputs"], b.host_batch(step)["inputs"])
    assert not np.array_equal(a.host_batch(0)["inputs"], a.host_batch(1)["inputs"])
    assert not np.array_equal(a.host_batch(0)["inputs"], Batcher(tokens, 8, 32, seed=2).host_batch(0)["inputs"])
    batch = a.host_batch(3)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # next-token targets


def test_each_host_reads_its_slice_of_the_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    whole = Batcher(tokens, 8, 16, seed=0).host_batch(5)["inputs"]
    parts = [Batcher(tokens, 8, 16, seed=0, process_index=i, process_count=4).host_batch(5)["inputs"]
             for i in range(4)]
    assert all(p.shape == (2, 16) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_builtin_corpus_is_python_source_split_by_file():
    tokens = load_tokens(DataConfig(max_bytes=2_000_000), ByteTokenizer())
    text = ByteTokenizer().decode(tokens["train"][:200_000])
    assert "def " in text and "import " in text
    assert 0.005 < len(tokens["heldout"]) / len(tokens["train"]) < 0.1


def test_text_jsonl_and_bin_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 500)
    (tmp_path / "b.txt").write_text("another file " * 500)
    tok = ByteTokenizer()
    text = load_tokens(DataConfig(source="text", path=str(tmp_path), heldout_fraction=0.4), tok)
    assert len(text["train"]) + len(text["heldout"]) == 6000 + 6500 + 2  # + one EOS per document
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"document {i} " * 50}) for i in range(40)))
    docs = load_tokens(DataConfig(source="jsonl", path=str(jl), heldout_fraction=0.2), tok)
    assert tok.eos_id in docs["train"] and len(docs["heldout"]) > 0
    ids = np.arange(5000, dtype=np.uint32) % 70000
    ids.tofile(tmp_path / "t.bin")
    bins = load_tokens(DataConfig(source="bin", path=str(tmp_path / "t.bin"), bin_dtype="uint32"), tok)
    np.testing.assert_array_equal(np.concatenate([bins["train"], bins["heldout"]]), ids)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1 is not a JSON object with a 'text' field"):
        load_tokens(DataConfig(source="jsonl", path=str(bad)), tok)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["def foo(x):\n    return x + 1\n"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    ids = loaded.encode("def foo(x):")
    assert len(ids) < len("def foo(x):") and loaded.eos_id == 2 and loaded.bos_id == 1
    assert loaded.decode(ids) == "def foo(x):"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld → ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("ab"), tok.eos_id]) == "ab"
