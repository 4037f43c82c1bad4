"""Data, tokenizers and TensorBoard logs on gs:// (a local emulator) give what local files give."""

import json

import numpy as np
import pytest

from tpustack import paths
from tpustack.config import DataConfig
from tpustack.data import Batcher, ByteTokenizer, load_tokenizer, load_tokens
from tpustack.data.sources import is_heldout
from tpustack.metrics import MetricsWriter


def _write_both(local_root, gs_root, files: dict[str, bytes]):
    for name, data in files.items():
        for root in (local_root, gs_root):
            paths.makedirs(paths.join(root, *name.split("/")[:-1]))
            paths.write_bytes(paths.join(root, name), data)


def _assert_same_tokens(a, b):
    assert a.keys() == b.keys() == {"train", "heldout"}
    for split in a:
        np.testing.assert_array_equal(np.asarray(a[split]), np.asarray(b[split]))
        assert np.asarray(a[split]).dtype == np.asarray(b[split]).dtype


def _batches(tokens, steps=(0, 5), hosts=2, batch=4, seq=16):
    return [Batcher(tokens, batch, seq, seed=3, process_index=i, process_count=hosts).host_batch(s)["inputs"]
            for s in steps for i in range(hosts)]


@pytest.fixture
def roots(tmp_path, gcs_bucket):
    return str(tmp_path / "data"), gcs_bucket + "/data"


def _tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([f"document {i}: the quick brown fox\n" for i in range(50)], trainer)
    return tok.to_str().encode()


def test_text_and_jsonl_from_gs_match_local(roots):
    local, gs = roots
    docs = {f"{'sub/' if i % 3 else ''}doc{i:02d}.txt": f"document {i}: {'the quick brown fox ' * (i + 5)}\r\n".encode()
            for i in range(30)}
    docs["notes.bin"] = b"\x00not text"  # not a text suffix: skipped in a directory
    docs["corpus.jsonl"] = "\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(40)).encode() + b"\n\n"
    docs["tokenizer/tokenizer.json"] = _tokenizer_json()
    _write_both(local, gs, docs)
    hf_local, text = load_tokenizer(paths.join(local, "tokenizer")), "document 7: the quick brown fox"
    for spec in (paths.join(gs, "tokenizer"), paths.join(gs, "tokenizer", "tokenizer.json")):  # a directory or the file
        hf_gs = load_tokenizer(spec)
        assert (hf_gs.bos_id, hf_gs.eos_id, hf_gs.vocab_size) == (1, 2, hf_local.vocab_size)
        np.testing.assert_array_equal(hf_gs.encode(text), hf_local.encode(text))
        assert len(hf_gs.encode(text)) < len(text) and hf_gs.decode(hf_gs.encode(text)) == text
    for tok in (ByteTokenizer(), hf_gs):
        for source, rel in (("text", ""), ("text", "*.txt"), ("text", "sub/*.txt"), ("jsonl", "corpus.jsonl")):
            a, b = (load_tokens(DataConfig(source=source, path=paths.join(root, rel) if rel else root,
                                           heldout_fraction=0.3), tok) for root in (local, gs))
            _assert_same_tokens(a, b)
            for x, y in zip(_batches(a["train"]), _batches(b["train"])):
                np.testing.assert_array_equal(x, y)
    # the split goes by each document's name relative to data.path, wherever the files are
    texts = {n: len(d) for n, d in docs.items() if n.endswith(".txt")}  # "\r\n" read as "\n", + EOS
    held = [n for n in texts if is_heldout(n, 0.3)]
    assert 0 < len(held) < len(texts)
    for root in (local, gs):
        split = load_tokens(DataConfig(source="text", path=root, heldout_fraction=0.3), ByteTokenizer())
        assert len(split["heldout"]) == sum(texts[n] for n in held)
        assert len(split["train"]) == sum(texts.values()) - len(split["heldout"])


def test_bin_from_gs_reads_only_each_hosts_rows(roots, monkeypatch):
    local, gs = roots
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 60_000, size=50_000).astype(np.uint16)
    val = rng.integers(0, 60_000, size=5_000).astype(np.uint16)
    _write_both(local, gs, {"one.bin": ids.tobytes(), "dir/train.bin": ids.tobytes(), "dir/val.bin": val.tobytes()})
    reads = []
    read_ranges = paths.read_ranges

    def recording(path, starts, lengths):
        reads.append((path, list(starts), list(lengths)))
        return read_ranges(path, starts, lengths)

    monkeypatch.setattr(paths, "read_ranges", recording)
    for rel in ("one.bin", "dir"):
        reads.clear()
        cfg = dict(source="bin", bin_dtype="uint16", heldout_fraction=0.1)
        a = load_tokens(DataConfig(path=paths.join(local, rel), **cfg), ByteTokenizer())
        b = load_tokens(DataConfig(path=paths.join(gs, rel), **cfg), ByteTokenizer())
        assert isinstance(a["train"], np.memmap) and not isinstance(b["train"], np.ndarray)
        assert [len(b[s]) for s in ("train", "heldout")] == [len(a[s]) for s in ("train", "heldout")]
        assert not reads  # sizes come from metadata; slicing a split reads nothing
        for split in ("train", "heldout"):
            for hosts in (1, 2):
                for step in (0, 9):
                    for i in range(hosts):
                        want = Batcher(a[split], 8, 32, 5, split, i, hosts)
                        got = Batcher(b[split], 8, 32, 5, split, i, hosts)
                        reads.clear()
                        np.testing.assert_array_equal(got.host_batch(step)["inputs"], want.host_batch(step)["inputs"])
                        # only this host's windows of 33 tokens crossed the wire, nothing around them
                        starts = want.offsets(step)[want.rows]
                        needed = np.unique((starts[:, None] + np.arange(33)).ravel())
                        assert len(reads) == 1 and sum(reads[0][2]) == needed.size * 2
                        offset = 0 if split == "train" or rel == "dir" else len(a["train"])
                        read = np.concatenate([np.arange(s // 2, (s + n) // 2) for s, n in zip(*reads[0][1:])])
                        np.testing.assert_array_equal(read, needed + offset)
        _assert_same_tokens(a, b)  # np.asarray of a whole remote split reads it in one range


def test_tensorboard_events_land_in_the_bucket(gcs_bucket, tmp_path):
    from tb_events import scalar_tags

    logdir = paths.join(gcs_bucket, "run", "tb")
    writer = MetricsWriter(logdir)
    for step in range(1, 4):
        writer.scalars(step, {"loss": 0.5 * step, "nan": float("nan")}, prefix="train/")
    writer.close()
    events = paths.glob(paths.join(logdir, "events.out.tfevents.*"))
    assert len(events) == 1
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / events[0].rsplit("/", 1)[1]).write_bytes(paths.read_bytes(events[0]))
    assert scalar_tags(str(tmp_path / "tb")) == {"train/loss": [0.5, 1.0, 1.5]}
