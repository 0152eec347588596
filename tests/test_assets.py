"""Wiki markup stripping, dump parsing and the by-article split (offline), plus one slow
end-to-end check of the real demo assets (downloads from PyPI on first run)."""

from __future__ import annotations

import bz2
import io
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import fetch_assets  # noqa: E402
import wikitext  # noqa: E402
from wikitext import Article, extract_articles, split_articles, strip_markup  # noqa: E402

# ---------------------------------------------------------------- stripping


@pytest.mark.parametrize(
    ("wiki", "plain"),
    [
        ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
        ("A [[Link]], a [[target|label]] and [[bus]]es.", "A Link, a label and buses."),
        ("See [[Foo (bar)|]] here.", "See Foo here."),
        ("Go to [[Page#Section|there]] or [[Page#Section]].", "Go to there or Page."),
        ("x {{cite web|url=http://a.b|title=T}} y", "x y"),
        ("a {{outer|{{inner|{{deep}}}}|z}} b", "a b"),
        ("It is {{convert|5|km|mi}} long.", "It is 5 km long."),
        ("From {{convert|3|-|4|m}} tall.", "From 3–4 m tall."),
        ("In French {{lang|fr|[[Paris|la ville]]}} is.", "In French la ville is."),
        ("Fact.<ref name=\"a\">{{cite book|t=X}}</ref> More.<ref name=\"a/b\"/> End.",
         "Fact. More. End."),
        ("Keep <!-- hidden\nmultiline --> this.", "Keep this."),
        ("[http://example.com Example site] and [http://bare.org] and http://x.y/z end.",
         "Example site and and end."),
        ("H<sub>2</sub>O and a<br/>b and <span style=\"x\">c</span>.", "H2O and a b and c."),
        ("Rock &amp; roll&nbsp;music.", "Rock & roll music."),
        ("The mean <math>A</math> is <math>\\frac{1}{n}</math> here.",
         "The mean A is here."),
        ("Albert ({{IPAc-en|ˈ|æ}}; born 1879) was.", "Albert (born 1879) was."),
        ("Word ({{IPA|x}}) next.", "Word next."),
        ("__NOTOC__\nText.", "Text."),
    ],
)
def test_strip_inline(wiki, plain):
    assert strip_markup(wiki) == plain


def test_strip_files_categories_interlanguage():
    wiki = (
        "[[File:Map.png|thumb|A map of [[France]] in [1900] with {{small|x}}.]]\n"
        "Prose about [[Image:x.jpg]] France.\n"
        "[[Category:Countries]]\n[[de:Frankreich]]\n"
        "A [[:Category:Countries|category link]] and [[wikt:word|word]]."
    )
    assert strip_markup(wiki) == "Prose about France.\nA category link and word."


def test_strip_tables_and_infobox():
    wiki = (
        "{{Infobox country\n| name = X\n| capital = [[Y]]\n| pop = {{formatnum:123}}\n}}\n"
        "Intro line.\n"
        "{| class=\"wikitable\"\n|-\n! Head\n|-\n| cell {{flag|X}}\n"
        "{|\n| nested\n|}\n| more\n|}\n"
        "After table."
    )
    assert strip_markup(wiki) == "Intro line.\nAfter table."


def test_strip_headings_lists_and_boilerplate_sections():
    wiki = (
        "Lead.\n\n== History ==\n=== Early ===\nOld times.\n"
        "== Empty ==\n{{main|Other}}\n"
        "== Lists ==\n* one item\n** nested item\n# numbered\n; term : definition\n----\n"
        "== See also ==\n* [[Other]]\n=== Sub of see also ===\nJunk.\n"
        "== References ==\n{{reflist}}\n"
        "== Later ==\nBack to prose."
    )
    assert strip_markup(wiki).split("\n") == [
        "Lead.", "History", "Early", "Old times.", "Lists", "one item", "nested item",
        "numbered", "term: definition", "Later", "Back to prose.",
    ]


def test_unbalanced_markup_does_not_eat_text():
    broken = "Before {{broken template\nstill text."
    assert strip_markup(broken) == "Before broken template\nstill text."
    assert strip_markup("Stray }} closer.") == "Stray closer."


# ---------------------------------------------------------------- dump parsing


def _page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
        f"<revision><text xml:space=\"preserve\">{text}</text></revision></page>"
    )


def test_extract_articles_skips_redirects_namespaces_stubs_and_disambiguation():
    body = " ".join(["word"] * 200)
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + _page("Good", f"'''Good''' is {body}. &lt;ref&gt;cite&lt;/ref&gt;")
        + _page("Moved", "#REDIRECT [[Good]]", redirect=True)
        + _page("Talk:Good", body, ns=1)
        + _page("Stub", "Too short.")
        + _page("Thing (disambiguation)", body)
        + _page("Thing", "{{disambig}} " + body)
        + "</mediawiki>"
    )
    data = bz2.compress(xml.encode())
    arts = wikitext.extract_articles_bz2(data)
    assert [a.title for a in arts] == ["Good"]
    assert arts[0].text.startswith("Good\nGood is word word")
    assert "cite" not in arts[0].text
    assert extract_articles(io.BytesIO(xml.encode())) == arts


# ---------------------------------------------------------------- split


def _articles(n: int) -> list[Article]:
    return [Article(f"Title {i}", f"Title {i}\n" + "text " * (10 + 37 * i % 101)) for i in range(n)]


def test_split_is_disjoint_complete_and_deterministic():
    arts = _articles(60)
    calib, evals = split_articles(arts, 0.2)
    assert not {a.title for a in calib} & {a.title for a in evals}
    assert sorted(a.title for a in calib + evals) == sorted(a.title for a in arts)
    total = sum(len(a.text) for a in arts)
    assert 0.2 * total <= sum(len(a.text) for a in evals) < 0.35 * total
    # Input order does not matter; membership follows titles.
    c2, e2 = split_articles(list(reversed(arts)), 0.2)
    assert {a.title for a in e2} == {a.title for a in evals}
    assert split_articles(arts, 0.2) == (calib, evals)
    # Text files never share an article block.
    calib_blocks = set(wikitext.join_articles(calib).strip().split("\n\n"))
    eval_blocks = set(wikitext.join_articles(evals).strip().split("\n\n"))
    assert not calib_blocks & eval_blocks and len(eval_blocks) == len(evals)


def test_split_edge_cases():
    two = _articles(2)
    calib, evals = split_articles(two, 0.99)
    assert len(calib) == 1 and len(evals) == 1
    with pytest.raises(ValueError):
        split_articles(two + two[:1])


# ---------------------------------------------------------------- manifest helpers


def test_files_ok_detects_corruption(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello")
    files = {"a.txt": fetch_assets.file_record(p)}
    assert fetch_assets.files_ok(tmp_path, files)
    p.write_text("hellO")
    assert not fetch_assets.files_ok(tmp_path, files)
    assert not fetch_assets.files_ok(tmp_path, {})


def test_resolve_model_local_dir_and_clear_offline_error(tmp_path, monkeypatch):
    assert fetch_assets.resolve_model(tmp_path) == tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="neither a local folder"):
        fetch_assets.resolve_model("no-such-org/no-such-model-xyz")


# ---------------------------------------------------------------- real assets


@pytest.mark.slow
def test_real_assets_end_to_end():
    """Fetch (or re-verify) the demo assets and check the converted model is sane."""
    import json

    from cospadi.stages.evaluate import load_model_for_eval, perplexity

    dest = Path(os.environ.get("COSPADI_ASSETS", ROOT / "assets"))
    m = fetch_assets.fetch_assets(dest)
    assert fetch_assets.verify(dest) == []
    assert m["model"]["shards"] >= 2
    index = json.loads((dest / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == m["model"]["shards"]
    cfg = json.loads((dest / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["tie_word_embeddings"] and "quantization_config" not in cfg
    arts = m["text"]["articles"]
    assert not set(arts["calib"]) & set(arts["eval"])
    assert m["text"]["tokens"]["eval"] >= 100_000
    # A wrong q/k rotary layout or a broken dequantisation gives perplexity in the hundreds.
    model, tok = load_model_for_eval(dest / "model", "cpu", "float32")
    text = (dest / "eval.txt").read_text(encoding="utf-8")
    res = perplexity(model, tok, text, seq_len=512, max_windows=4, progress=False)
    assert res["ppl"] < 40, res
