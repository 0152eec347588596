"""cospadi eval --tasks: lm-evaluation-harness on local tasks (a JSONL file the test writes),
offline, on a dense tiny model and its compressed output; its numbers against ours."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import calib_text, make_model

from cospadi.pipeline.cli import main
from cospadi.stages.evaluate import load_model_for_eval, perplexity

pytest.importorskip("lm_eval")

from cospadi.stages.lm_eval_runner import LmEvalError, run_tasks, table  # noqa: E402

ROLLING, CHOICE = "cospadi_tiny_rolling", "cospadi_tiny_choice"
DOCS = [f"Document {i}: the {w} jumps over {i * 7} lazy dogs near the {w} river."
        for i, w in enumerate(["quick", "brown", "red", "slow", "green", "tall"])]
QUESTIONS = [{"question": f"Q{i}: colour of item {i}?", "choices": ["red", "blue", "green"],
              "answer": i % 3} for i in range(6)]
YAML_ROLLING = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
YAML_CHOICE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
MODEL_ARGS = "max_length=128"  # passed through to lm-eval's hf model; every doc fits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    dense = make_model(root / "model", "llama", layers=2)
    out = root / "out"
    assert main(["-q", "compress", "--model", str(dense), "--out", str(out), "--calib-text",
                 str(calib_text(root / "calib.txt")), "--calib-samples", "4", "--seq-len",
                 "32", "--method", "svd-llm", "--ratio", "0.4"]) == 0
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (root / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "rolling.yaml").write_text(YAML_ROLLING.format(name=ROLLING,
                                                            path=root / "docs.jsonl"))
    (tasks / "choice.yaml").write_text(YAML_CHOICE.format(name=CHOICE,
                                                          path=root / "choice.jsonl"))
    return dense, out, tasks


def _ours_rolling(model, tok, doc: str) -> float:
    """Our perplexity protocol on one window that holds the whole document: BOS + text (lm-eval
    prefixes rolling windows with BOS whatever the tokenizer does, hence bos='always')."""
    n = len(tok(doc, add_special_tokens=False)["input_ids"])
    res = perplexity(model, tok, doc, seq_len=n + 1, progress=False, bos="always")
    assert res["tokens"] == n
    return -res["nll"] * res["tokens"]


@torch.inference_mode()
def _ours_choice(model, tok, question: str, choice: str) -> float:
    context = tok(question, add_special_tokens=False)["input_ids"]
    whole = tok(question + " " + choice, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole)))


@pytest.mark.parametrize("which", ["dense", "compressed"])
def test_lm_eval_matches_our_evaluation(setup, which):
    dense, out, tasks = setup
    target = dense if which == "dense" else out
    results = run_tasks(target, [ROLLING, CHOICE], model_args=MODEL_ARGS,
                        include_path=str(tasks), log_samples=True)
    model, tok = load_model_for_eval(target, "cpu", "float32")
    # rolling loglikelihood: per document and aggregated (bits per byte), same tokens
    rolling = sorted(results["samples"][ROLLING], key=lambda s: s["doc_id"])
    ours = [_ours_rolling(model, tok, d) for d in DOCS]
    theirs = [float(s["filtered_resps"][0]) for s in rolling]
    # 1e-4 nats on ~70-token documents: float32 logits, summation order differs
    assert theirs == pytest.approx(ours, abs=1e-4)
    nbytes = sum(len(d.encode()) for d in DOCS)
    bpb = -sum(ours) / nbytes / math.log(2)
    assert results["results"][ROLLING]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)
    # multiple choice (loglikelihood requests): every choice's log-likelihood, and acc
    choice = sorted(results["samples"][CHOICE], key=lambda s: s["doc_id"])
    correct = 0
    for q, sample in zip(QUESTIONS, choice, strict=True):
        lls = [_ours_choice(model, tok, q["question"], c) for c in q["choices"]]
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-4)
        correct += int(max(range(3), key=lambda i: lls[i]) == q["answer"])
    assert results["results"][CHOICE]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    text = table(results)  # what `cospadi eval --tasks` prints without --json
    assert "bits_per_byte" in text and CHOICE in text and "|" in text


def test_cli_eval_tasks_json(setup, capsys):
    dense, out, tasks = setup
    args = ["eval", "--model", str(out), "--tasks", f"{ROLLING},{CHOICE}", "--include-path",
            str(tasks), "--model-args", MODEL_ARGS, "--limit", "4"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = report["lm_eval"]["results"]
    assert set(res) == {ROLLING, CHOICE}
    assert report["lm_eval"]["n-samples"][ROLLING]["effective"] == 4  # --limit reached lm-eval
    assert 0.0 <= res[CHOICE]["acc,none"] <= 1.0
    assert res[ROLLING]["byte_perplexity,none"] == pytest.approx(
        2 ** res[ROLLING]["bits_per_byte,none"], rel=1e-9)


def test_cli_eval_errors(setup, capsys, monkeypatch):
    dense, _, tasks = setup
    assert main(["eval", "--model", str(dense)]) == 2
    assert "--text FILE" in capsys.readouterr().err
    assert main(["eval", "--model", str(dense), "--tasks", ROLLING, "--include-path",
                 str(tasks / "nope")]) == 2
    assert "include path" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if not installed
    with pytest.raises(LmEvalError, match=r"pip install -e \"\.\[eval\]\""):
        run_tasks(dense, [ROLLING], include_path=str(tasks))
