"""Bad settings and bad inputs: one clear line naming the culprit, exit status 2, no output."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import calib_text, make_model

from cospadi.pipeline.cli import main
from cospadi.pipeline.config import ConfigError, make_config
from cospadi.pipeline.manifest import LockHeld, WorkLock


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = make_model(root / "model", "llama", layers=2)
    text = calib_text(root / "calib.txt")
    return root, model, text


def _args(model, text, out, *extra):
    return ["-q", "compress", "--model", str(model), "--out", str(out), "--calib-text",
            str(text), "--calib-samples", "4", "--seq-len", "16", "--iters", "2", *extra]


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    line = err[-1]
    assert line.startswith("cospadi: error: "), line
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in line, line
    return line


# --- config ------------------------------------------------------------------------------

def test_yaml_unknown_key_and_wrong_type(tmp_path, capsys, assets):
    _, model, text = assets
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: 0.3\ngroup-sise: 2\n")
    _fails(capsys, _args(model, text, tmp_path / "o", "--config", str(bad)),
           "'group-sise'", "group-size")
    bad.write_text("iters: ten\n")
    _fails(capsys, _args(model, text, tmp_path / "o", "--config", str(bad)), "'iters'", "int")
    bad.write_text("- a list\n")
    _fails(capsys, _args(model, text, tmp_path / "o", "--config", str(bad)), "mapping")


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ratio: 0.4\nrho: 3\ngroup_size: 2\nkeep-work: true\n")
    cfg = make_config(path, {"ratio": 0.2})
    assert (cfg.ratio, cfg.rho, cfg.group_size, cfg.keep_work) == (0.2, 3.0, 2, True)
    with pytest.raises(ConfigError, match="propagate"):
        make_config(None, {"propagate": "sideways"})


def test_presets_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for preset in sorted(root.glob("*.yaml")):
        make_config(preset)


@pytest.mark.parametrize("flag,value,needle", [
    ("--ratio", "1.5", "ratio"), ("--ratio", "0", "ratio"), ("--rho", "0.5", "rho"),
    ("--iters", "0", "iters"), ("--group-size", "3", "group-size 3"),
    ("--seq-len", "512", "seq-len 512"), ("--calib-samples", "5000", "too short"),
    ("--method", "pca", "method"), ("--device", "tpu", "device")])
def test_bad_settings(tmp_path, capsys, assets, flag, value, needle):
    _, model, text = assets
    _fails(capsys, _args(model, text, tmp_path / "o", flag, value), needle)
    assert not (tmp_path / "o").exists()


def test_bad_calibration_text(tmp_path, capsys, assets):
    _, model, _ = assets
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _fails(capsys, _args(model, empty, tmp_path / "o"), "empty.txt", "empty")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    _fails(capsys, _args(model, latin, tmp_path / "o"), "latin.txt", "UTF-8")
    _fails(capsys, _args(model, tmp_path / "none.txt", tmp_path / "o"), "none.txt")


def test_dry_run_plan(tmp_path, capsys, assets):
    _, model, text = assets
    assert main(_args(model, text, tmp_path / "o", "--dry-run")) == 0
    out = capsys.readouterr().out
    for needle in ("self_attn.q_proj", "mlp.down_proj", "kept bytes", "grams", "activations",
                   "factors", "host", "expected time", "capture", "solve", "assembly"):
        assert needle in out
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


# --- checkpoint problems -----------------------------------------------------------------

def _copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def _shard_with(model: Path, suffix: str) -> tuple[Path, str]:
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(k for k in index if k.endswith(suffix))
    return model / index[name], name


def test_missing_model_dir(tmp_path, capsys, assets):
    _, _, text = assets
    _fails(capsys, _args(tmp_path / "nope", text, tmp_path / "o"), "nope", "does not exist")


def test_index_names_missing_shard(tmp_path, capsys, assets):
    _, model, text = assets
    bad = _copy(model, tmp_path / "m")
    shard, _ = _shard_with(bad, "layers.1.mlp.up_proj.weight")
    shard.unlink()
    _fails(capsys, _args(bad, text, tmp_path / "o"), shard.name, "does not exist")


@pytest.mark.parametrize("damage", ["truncated", "garbled header", "huge header length"])
def test_truncated_or_corrupt_shard(tmp_path, capsys, assets, damage):
    _, model, text = assets
    bad = _copy(model, tmp_path / "m")
    shard, _ = _shard_with(bad, "layers.0.self_attn.v_proj.weight")
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "garbled header":
        data[8:40] = b"x" * 32
    else:
        data[:8] = (10 ** 12).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    _fails(capsys, _args(bad, text, tmp_path / "o"), shard.name, "truncated or corrupt")
    assert not (tmp_path / "o").exists()


def _rewrite(shard: Path, name: str, tensor: torch.Tensor) -> None:
    tensors = load_file(shard)
    tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})


def test_wrong_shape(tmp_path, capsys, assets):
    _, model, text = assets
    bad = _copy(model, tmp_path / "m")
    shard, name = _shard_with(bad, "layers.1.self_attn.o_proj.weight")
    _rewrite(shard, name, torch.zeros(64, 32))
    _fails(capsys, _args(bad, text, tmp_path / "o"), name, "(64, 32)", "(64, 64)")


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nan_or_inf_weights(tmp_path, capsys, assets, value):
    _, model, text = assets
    bad = _copy(model, tmp_path / "m")
    shard, name = _shard_with(bad, "layers.1.mlp.gate_proj.weight")
    tensor = load_file(shard)[name].clone()
    tensor[3, 5] = value
    _rewrite(shard, name, tensor)
    _fails(capsys, _args(bad, text, tmp_path / "o"), name, "NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, capsys, assets):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, _, text = assets
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    _fails(capsys, _args(tmp_path / "gpt2", text, tmp_path / "o"), "GPT2LMHeadModel",
           "expected")


# --- work directory ----------------------------------------------------------------------

def test_resume_refused_then_restart(tmp_path, capsys, assets):
    _, model, text = assets
    out, work = tmp_path / "o", tmp_path / "w"
    assert main(_args(model, text, out, "--work-dir", str(work), "--method", "svd-llm")) == 0
    assert main(_args(model, text, out, "--work-dir", str(work), "--method", "svd-llm")) == 0
    assert "nothing to do" in capsys.readouterr().out
    line = _fails(capsys, _args(model, text, out, "--work-dir", str(work), "--method",
                                "svd-llm", "--ratio", "0.4"), "ratio 0.3 -> 0.4", "--restart")
    assert "model" not in line.split("setup:")[1].split("->")[0]
    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + " more")
    _fails(capsys, _args(model, other, out, "--work-dir", str(work), "--method", "svd-llm"),
           "calibration text differs")
    another = make_model(tmp_path / "m2", "llama", layers=2, seed=1)  # same shapes
    _fails(capsys, _args(another, text, out, "--work-dir", str(work), "--method", "svd-llm"),
           "model files differ (model-00001-of-")
    assert main(_args(model, text, out, "--work-dir", str(work), "--method", "svd-llm",
                      "--ratio", "0.4", "--restart")) == 0


def test_output_dir_not_ours(tmp_path, capsys, assets):
    _, model, text = assets
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _fails(capsys, _args(model, text, out), "not a cospadi output")
    assert (out / "precious.txt").read_text() == "keep me"


def test_lock_held_and_stale_lock(tmp_path, capsys, assets):
    _, model, text = assets
    work = tmp_path / "w"
    lock = WorkLock(work / "lock")
    lock.acquire()
    try:
        _fails(capsys, _args(model, text, tmp_path / "o", "--work-dir", str(work)),
               "in use", f"pid {os.getpid()}")
        with pytest.raises(LockHeld):
            WorkLock(work / "lock").acquire()
    finally:
        lock.release()
    # a lock file left by a dead process: taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "lock").write_text(json.dumps({"pid": dead.pid, "host": "x"}))
    assert main(_args(model, text, tmp_path / "o", "--work-dir", str(work),
                      "--method", "svd-llm")) == 0


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("limit_kib,stage", [(48, "embed"), (200, "assemble")])
def test_disk_full_then_resume(tmp_path, assets, limit_kib, stage):
    """A file-size limit stands in for a full disk (writes fail with EFBIG): one clean
    line, status 2, nothing that looks finished; the rerun without the limit resumes
    (keeping what was done) and gives the bytes of an uninterrupted run."""
    _, model, text = assets
    extra = ("--method", "svd-llm", "--calib-samples", "8", "--seq-len", "64")
    assert main(_args(model, text, tmp_path / "ref", *extra)) == 0
    out = tmp_path / "o"
    argv = _args(model, text, out, *extra)

    def limit() -> None:  # the largest file: an activation chunk 122 KiB, the shard 236 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kib << 10, limit_kib << 10))

    code = "import sys; from cospadi.pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *argv], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cospadi: error: out of disk space writing "), last
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    done = {p.stem for p in (tmp_path / "o.work" / "done").glob("*.json")}
    assert "assemble" not in done
    assert (stage == "assemble") == ({"embed", "factor-0000", "factor-0001"} <= done), done
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".partial"))]
    records = {p: p.read_bytes() for p in (tmp_path / "o.work" / "done").glob("*.json")}
    assert main(argv) == 0
    assert all(p.read_bytes() == data for p, data in records.items())  # nothing redone
    assert _tree(out) == _tree(tmp_path / "ref")


def test_singular_and_indefinite_grams_warn(tmp_path, capsys, assets, monkeypatch):
    """64 calibration tokens make the 96-wide down_proj Gram singular; one Gram made
    indefinite on purpose: the run succeeds and names every fallback whitening."""
    from cospadi.pipeline import tasks

    _, model, text = assets
    original = tasks.read_grams

    def indefinite(path, names=None):
        grams, tokens = original(path, names)
        if "block_0001" in str(path) and "attn_in" in grams:
            gram = grams["attn_in"]
            grams["attn_in"] = gram - 0.5 * gram.diagonal().mean() * torch.eye(len(gram),
                                                                                 dtype=gram.dtype)
        return grams, tokens

    monkeypatch.setattr(tasks, "read_grams", indefinite)
    work = tmp_path / "w"
    assert main(_args(model, text, tmp_path / "o", "--work-dir", str(work), "--method",
                      "svd-llm")) == 0
    err = capsys.readouterr().err
    solves = [solve for path in sorted((work / "done").glob("factor-*.json"))
              for solve in json.loads(path.read_text())["solves"]]
    fallback = [s for s in solves if s["whitening"] != "cholesky"]
    assert any(s["projection"] == "mlp.down_proj" for s in fallback)
    indefinite_solves = [s for s in fallback if s["layers"] == [1]
                         and s["projection"] == "self_attn.q_proj"]
    assert indefinite_solves and indefinite_solves[0]["shift"] > 0.1
    for s in fallback:
        assert (f"layers {s['layers']} {s['projection']}: Gram singular or indefinite, "
                f"whitened by {s['whitening']}") in err
    assert (tmp_path / "o" / "config.json").is_file()


def test_missing_intermediate_file_is_recomputed(tmp_path, assets):
    """A factor file removed by hand: its producer runs again, the output is unchanged."""
    _, model, text = assets
    out, work = tmp_path / "o", tmp_path / "w"
    argv = _args(model, text, out, "--work-dir", str(work), "--method", "svd-llm")
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    shutil.rmtree(out)
    (work / "factors" / "block_0001.safetensors").unlink()
    assert main(argv) == 0
    assert (work / "factors" / "block_0001.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
