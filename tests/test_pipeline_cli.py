"""The other subcommands on a pipeline output: eval --json, inspect --json, export-dense."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import calib_text, make_model
from transformers import AutoModelForCausalLM

from cospadi.pipeline.cli import main


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_model(root / "model", "llama", layers=2)
    text = calib_text(root / "calib.txt")
    out = root / "out"
    assert main(["-q", "compress", "--model", str(model), "--out", str(out), "--calib-text",
                 str(text), "--calib-samples", "4", "--seq-len", "32", "--iters", "2",
                 "--ratio", "0.4"]) == 0
    return root, model, text, out


def test_eval_json(compressed, capsys):
    root, model, text, out = compressed
    for target in (model, out):
        assert main(["eval", "--model", str(target), "--text", str(text), "--seq-len", "32",
                     "--max-windows", "3", "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(result) == {"ppl", "tokens"}
        assert result["tokens"] == 3 * 31 and result["ppl"] > 1


def test_eval_missing_text(compressed, capsys):
    _, model, _, _ = compressed
    assert main(["eval", "--model", str(model), "--text", "missing.txt"]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_inspect_json(compressed, capsys):
    *_, out = compressed
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = report["compressed"]["kept_params"]
    assert 0.55 < kept < 0.65  # ratio 0.4
    assert set(report["layers"]) == {"0", "1"}
    assert main(["inspect", str(out)]) == 0
    assert "kept" in capsys.readouterr().out


def test_export_dense(compressed, tmp_path, capsys):
    *_, out = compressed
    dense = tmp_path / "dense"
    assert main(["export-dense", str(out), str(dense)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    custom = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  trust_remote_code=True)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, custom(ids).logits, rtol=1e-3,
                                   atol=1e-3)
    assert main(["export-dense", str(out), str(dense)]) == 2
    assert "already exists" in capsys.readouterr().err
