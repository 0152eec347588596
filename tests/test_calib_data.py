"""Calibration from datasets (JSONL, parquet; text and chat messages), BOS windows, and the
calibration digest in the resume fingerprint."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import byte_tokenizer, calib_text, make_model
from tokenizers import processors

from cospadi.pipeline.cli import main
from cospadi.pipeline.config import ConfigError, make_config
from cospadi.stages.calib_data import calibration_set, dataset_ids, load_rows
from cospadi.stages.calibration import CalibrationError, bos_prefix, calibration_ids
from cospadi.stages.evaluate import windows_of

BOS = 256
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
            "{% endfor %}")


def bos_tokenizer():
    """The byte tokenizer, adding BOS in front of every text as Gemma's and Llama's do."""
    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


def chat_tokenizer(adds_bos: bool):
    tok = bos_tokenizer() if adds_bos else byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def encode(text: str) -> list[int]:
    return list(byte_tokenizer()(text, add_special_tokens=False)["input_ids"])


def order(n: int, seed: int) -> list[int]:  # the documented row order: torch.randperm(seed)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


ROWS = [f"row {i}: " + "abcdefghij"[i % 10] * (5 + 3 * i) for i in range(8)]


def write_jsonl(path, rows, key="text"):
    path.write_text("".join(json.dumps({key: r, "id": i}) + "\n" for i, r in enumerate(rows)),
                    encoding="utf-8")
    return path


def write_parquet(path, rows, key="text"):
    import datasets

    datasets.Dataset.from_list([{key: r, "id": i} for i, r in enumerate(rows)]).to_parquet(
        str(path))
    return path


def test_bos_prefix_modes():
    assert bos_prefix(byte_tokenizer(), "auto") == []  # SmolLM2-like: adds nothing
    assert bos_prefix(bos_tokenizer(), "auto") == [BOS]  # Gemma-like
    assert bos_prefix(byte_tokenizer(), "always") == [BOS]
    assert bos_prefix(bos_tokenizer(), "never") == []


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_packed_text_windows(tmp_path, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"d.{fmt}", ROWS)
    ds = load_rows(str(path), "train")
    ids, _ = dataset_ids(ds, byte_tokenizer(), 4, 16, column=None, packing="pack", seed=3,
                         prefix=[], source="t")
    stream = [t for i in order(len(ROWS), 3) for t in encode(ROWS[i])]
    assert ids.shape == (4, 16)
    assert ids.flatten().tolist() == stream[:64]
    other, _ = dataset_ids(ds, byte_tokenizer(), 4, 16, column="text", packing="pack", seed=4,
                           prefix=[], source="t")
    assert not torch.equal(ids, other)  # the seed picks the rows


def test_packed_windows_start_with_bos(tmp_path):
    ds = load_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "train")
    tok = bos_tokenizer()
    ids, _ = dataset_ids(ds, tok, 5, 16, column=None, packing="pack", seed=0,
                         prefix=bos_prefix(tok), source="t")
    assert (ids[:, 0] == BOS).all()
    # dropping the BOS of every window and of every document leaves the rows' bytes in order
    text = [t for t in ids.flatten().tolist() if t != BOS]
    stream = [t for i in order(len(ROWS), 0) for t in encode(ROWS[i])]
    assert text == stream[:len(text)]
    # a document starting inside a window keeps its own BOS there
    assert (ids[:, 1:] == BOS).any()


def test_truncated_windows(tmp_path):
    ds = load_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "train")
    seq = 20  # rows 0..2 (12, 15, 18 bytes) are shorter and are skipped
    ids, _ = dataset_ids(ds, byte_tokenizer(), 3, seq, column=None, packing="truncate",
                         seed=1, prefix=[], source="t")
    long_rows = [i for i in order(len(ROWS), 1) if len(encode(ROWS[i])) >= seq]
    assert ids.tolist() == [encode(ROWS[i])[:seq] for i in long_rows[:3]]
    with pytest.raises(CalibrationError, match=r"only 5 of 8 non-empty rows .* have 20 "
                                               r"tokens \(6 needed .*; 3 shorter\)"):
        dataset_ids(ds, byte_tokenizer(), 6, seq, column=None, packing="truncate", seed=1,
                    prefix=[], source="t")


@pytest.mark.parametrize("adds_bos", [False, True])
def test_chat_messages_rendered_with_template(tmp_path, adds_bos):
    chats = [[{"role": "user", "content": f"question {i}?"},
              {"role": "assistant", "content": f"answer {i}" * 3}] for i in range(6)]
    ds = load_rows(str(write_parquet(tmp_path / "c.parquet", chats, key="messages")), "train")
    tok = chat_tokenizer(adds_bos)
    ids, _ = dataset_ids(ds, tok, 2, 24, column=None, packing="truncate", seed=0,
                         prefix=bos_prefix(tok), source="t")
    first = order(len(chats), 0)[0]
    rendered = "<s>" + "".join(f"<{m['role']}>{m['content']}\n" for m in chats[first])
    # the template writes BOS itself: exactly one BOS whether or not the tokenizer adds one
    assert ids[0].tolist() == ([BOS] + encode(rendered[3:]))[:24]
    assert ids[0, 1] != BOS


def test_dataset_errors(tmp_path):
    tok = byte_tokenizer()
    ds = load_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "train")
    with pytest.raises(CalibrationError, match=r"no column 'body' \(columns: text, id\)"):
        dataset_ids(ds, tok, 2, 8, column="body", packing="pack", seed=0, prefix=[],
                    source="t")
    with pytest.raises(CalibrationError, match="too short for 50 samples of 16"):
        dataset_ids(ds, tok, 50, 16, column=None, packing="pack", seed=0, prefix=[],
                    source="t")
    empty = load_rows(str(write_jsonl(tmp_path / "e.jsonl", ["", "  ", "\n"])), "train")
    with pytest.raises(CalibrationError, match="no non-empty rows in column 'text'"):
        dataset_ids(empty, tok, 1, 4, column=None, packing="pack", seed=0, prefix=[],
                    source="t")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl is not UTF-8 .*offset 28"):
        load_rows(str(bad), "train")
    with pytest.raises(CalibrationError, match="missing.jsonl does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"), "train")
    chats = load_rows(str(write_jsonl(tmp_path / "m.jsonl", [[{"role": "user",
                                                                "content": "hi"}]],
                                      key="messages")), "train")
    with pytest.raises(CalibrationError, match="chat messages but the tokenizer has no chat"):
        dataset_ids(chats, tok, 1, 2, column=None, packing="pack", seed=0, prefix=[],
                    source="t")
    with pytest.raises(CalibrationError, match=r"split 'test'"):
        load_rows(str(tmp_path / "d.jsonl"), "test")
    with pytest.raises(ConfigError, match="calib-text or calib-data, not both"):
        make_config(None, {"calib_text": "a.txt", "calib_data": "b.jsonl"})


def test_text_windows_with_bos(tmp_path):
    text = calib_text(tmp_path / "c.txt").read_text()
    plain = calibration_ids(text, byte_tokenizer(), 4, 32)
    with_bos = calibration_ids(text, byte_tokenizer(), 4, 32, prefix=[BOS])
    assert plain.shape == with_bos.shape == (4, 32)
    assert (with_bos[:, 0] == BOS).all() and not (plain == BOS).any()
    # same text, windows of 31 text tokens behind the BOS
    assert with_bos[0, 1:].tolist() == encode(text)[:31]
    ev = windows_of(torch.tensor(encode(text)), 32, 3, prefix=[BOS])
    assert ev[:, 0].tolist() == [BOS] * 3 and ev[1, 1:].tolist() == encode(text)[31:62]


def test_fingerprint_and_resume_with_calib_data(tmp_path, capsys):
    model = make_model(tmp_path / "model", "llama", layers=1)
    rows = [f"document {i} " + "lorem ipsum dolor " * (i + 3) for i in range(12)]
    data = write_jsonl(tmp_path / "calib.jsonl", rows)
    cfg = make_config(None, {"calib_data": str(data), "calib_samples": 4, "seq_len": 32})
    first = calibration_set(cfg, model)
    assert calibration_set(cfg, model).digest == first.digest  # deterministic
    used = order(len(rows), cfg.seed)[0]
    write_jsonl(data, [r + " changed" if i == used else r for i, r in enumerate(rows)])
    changed = calibration_set(cfg, model)
    assert changed.digest["content"] != first.digest["content"]
    bos = calibration_set(make_config(None, {"calib_data": str(data), "calib_samples": 4,
                                             "seq_len": 32, "bos": "always"}), model)
    assert bos.digest["content"] == changed.digest["content"]
    assert bos.digest["tokens"] != changed.digest["tokens"] and (bos.ids[:, 0] == BOS).all()

    args = ["-q", "compress", "--model", str(model), "--out", str(tmp_path / "out"),
            "--calib-data", str(data), "--calib-samples", "4", "--seq-len", "32",
            "--method", "svd-llm", "--calib-packing", "pack"]
    assert main(args) == 0
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    write_jsonl(data, rows)  # back to the original rows: another calibration set
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "calibration data differs" in err and "--restart" in err
    write_jsonl(data, [r + " changed" if i == used else r for i, r in enumerate(rows)])
    assert main([*args, "--bos", "always"]) == 2  # same rows, windows now start with BOS
    assert "same content, other token windows" in capsys.readouterr().err


def test_differences_name_the_calibration_change():
    from cospadi.pipeline.manifest import differences

    text = {"kind": "text", "content": "c1", "tokens": "t1"}
    assert differences({"calibration": text}, {"calibration": dict(text)}) == []
    assert differences({"calibration": text}, {"calibration": {**text, "content": "c2",
                                                               "tokens": "t2"}}) == [
        "calibration text differs"]
    assert "same content, other token windows" in differences(
        {"calibration": text}, {"calibration": {**text, "tokens": "t2"}})[0]
    # a manifest from before the digests held the text file's hash as a plain string
    assert "older cospadi" in differences({"calibration": "c1"}, {"calibration": text})[0]
