"""Wikipedia dump -> plain prose, and a deterministic by-article calib/eval split.

Small, dependency-free stripper for MediaWiki markup: good enough for perplexity text
(prose with headings as plain lines), not a full parser. Bump STRIPPER_VERSION whenever the
output changes so fetch_assets rebuilds cached text.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

STRIPPER_VERSION = 1

# Sections whose bodies are citations / link lists, not prose.
BOILERPLATE_SECTIONS = {
    "references", "notes", "footnotes", "see also", "external links", "external link",
    "further reading", "bibliography", "sources", "citations", "notes and references",
    "references and notes", "works cited", "gallery", "literature", "reference",
}
# Link namespaces that render as media or metadata, not text.
_DROP_LINK_NS = {"file", "image", "media", "category"}
# Interwiki prefixes to sister projects: the link still shows text.
_SISTER_NS = {"wikt", "wiktionary", "w", "wikipedia", "s", "b", "q", "n", "v", "commons", "meta"}
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")

# Tags whose content is never prose.
_DROP_BLOCK_TAGS = (
    "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source", "pre", "chem",
    "hiero", "references", "graph", "mapframe",
)
_COMMENT = re.compile(r"<!--.*?(-->|\Z)", re.S)
_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_BLOCK_TAGS = re.compile(
    r"<(?P<t>" + "|".join(_DROP_BLOCK_TAGS) + r")\b[^>]*?(?:/>|>.*?</(?P=t)\s*>)", re.S | re.I
)
_MATH = re.compile(r"<math\b[^>]*>(.*?)</math\s*>", re.S | re.I)
_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
# Innermost [[...]]: single brackets may occur inside ("Bicyclo[1.1.0]butane"), doubles not.
_INNER_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_EXT_LINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://[^\s<>\]|]+")
_BR = re.compile(r"<br\s*/?\s*>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_QUOTES = re.compile(r"'{2,5}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_DISAMBIG = re.compile(r"\{\{\s*(disambig|dab|disambiguation|hndis|geodis)\b", re.I)


@dataclass(frozen=True)
class Article:
    title: str
    text: str


# ---------------------------------------------------------------- templates


def _split_args(body: str) -> list[str]:
    """Split template arguments on '|' outside [[links|with pipes]]."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(body):
        if body.startswith("[[", i):
            depth, i = depth + 1, i + 2
        elif body.startswith("]]", i) and depth:
            depth, i = depth - 1, i + 2
        else:
            if body[i] == "|" and depth == 0:
                parts.append(body[start:i])
                start = i + 1
            i += 1
    parts.append(body[start:])
    return parts


def _template(body: str) -> str:
    """Render the few inline templates that carry prose; drop the rest (infoboxes, cites)."""
    parts = [p.strip() for p in _split_args(body)]
    name = parts[0].lower().replace("_", " ").strip()
    args, named = [], {}
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if eq and re.fullmatch(r"[\w ]+", key):
            named[key.strip().lower()] = value.strip()
        else:
            args.append(p)
    if name == "convert" and args:
        if len(args) >= 4 and args[1] in {"-", "–", "to", "and", "or", "by", "x"}:
            sep = "–" if args[1] in {"-", "–"} else f" {args[1]} "
            return f"{args[0]}{sep}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}" if len(args) >= 2 else args[0]
    if name in {"lang", "transl"} and len(args) >= 2:
        return args[-1]
    if name.startswith("lang-") and args:
        return args[0]
    if name == "chem":
        return "".join(args)
    if name in {"quote", "blockquote", "quotation"}:
        return named.get("text") or named.get("quote") or (args[0] if args else "")
    if name == "as of" and args:
        return "As of " + " ".join(args[:3])
    if args and name in {
        "nowrap", "nobr", "small", "smaller", "big", "sic", "not a typo", "formatnum",
        "flag", "flagcountry", "nihongo", "angbr", "em", "strong", "abbr", "math", "mvar",
    }:
        return args[0]
    return {"nbsp": " ", "ndash": "–", "mdash": "—", "'": "'", "spaces": " "}.get(name, "")


def _strip_templates(text: str) -> str:
    # Innermost first, so nested templates resolve bottom-up.
    while True:
        new = _INNER_TEMPLATE.sub(lambda m: _template(m.group(1)), text)
        if new == text:
            break
        text = new
    return _drop_balanced(text, "{{", "}}")


def _drop_balanced(text: str, open_: str, close: str) -> str:
    """Remove balanced spans the regex pass could not (a stray brace inside an argument).

    An opener that never closes loses only the marker, never the rest of the article.
    """
    out: list[str] = []
    i = 0
    while True:
        start = text.find(open_, i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        depth, j = 0, start
        while j < len(text):
            if text.startswith(open_, j):
                depth, j = depth + 1, j + len(open_)
            elif text.startswith(close, j):
                depth, j = depth - 1, j + len(close)
                if depth == 0:
                    break
            else:
                j += 1
        i = j if depth == 0 else start + len(open_)
    # Stray closers from unbalanced input carry no text either.
    return "".join(out).replace(close, "")


# ---------------------------------------------------------------- tables and links


def _strip_tables(text: str) -> str:
    """Drop wiki tables ``{| ... |}`` (line-based, nested)."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


def _link(body: str) -> str:
    target, _, label = body.partition("|")
    target = target.strip()
    colon_prefixed = target.startswith(":")
    target = target.lstrip(":").strip()
    ns = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if not colon_prefixed and ns in _DROP_LINK_NS:
        return ""
    if not colon_prefixed and ns and ns not in _SISTER_NS and _LANG_PREFIX.match(ns):
        return ""  # interlanguage link
    if "|" in body:
        label = label.strip()
        if label:
            return label
        # Pipe trick: [[Foo (bar)|]] shows "Foo".
        return re.sub(r"\s*\(.*?\)\s*$", "", target.split(":", 1)[-1]).strip()
    return target.split("#", 1)[0] or target.split("#", 1)[-1]


def _strip_links(text: str) -> str:
    while True:
        new = _INNER_LINK.sub(lambda m: _link(m.group(1)), text)
        if new == text:
            return new
        text = new


def _math(m: re.Match) -> str:
    # Short symbolic math ("x", "n = 3") reads as prose; LaTeX does not.
    body = m.group(1).strip()
    return body if "\\" not in body and "{" not in body and len(body) <= 20 else ""


# ---------------------------------------------------------------- lines


def _clean_inline(line: str) -> str:
    line = line.replace("\xa0", " ")
    line = re.sub(r"[ \t]+", " ", line)
    line = re.sub(r"\(\s*[,;:]\s*", "(", line)  # "( ; born 1970)" -> "(born 1970)"
    line = re.sub(r"\(\s*\)", "", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"\(\s+", "(", line)
    line = re.sub(r"([,;])(?:\s*[,;])+", r"\1", line)
    return re.sub(r" {2,}", " ", line).strip()


def _lines(text: str) -> list[str]:
    """Headings -> plain lines (boilerplate sections dropped), lists -> their text."""
    items: list[tuple[int, str]] = []  # (heading level, or 0 for prose; text)
    skip_level = 0
    for raw in text.split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            level, title = len(heading.group(1)), _clean_inline(heading.group(2))
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower().strip(" :") in BOILERPLATE_SECTIONS else 0
            if not skip_level and title:
                items.append((level, title))
            continue
        if skip_level or line.startswith(("|", "!", "----")):
            continue  # stray table rows outside a {| block, rules
        line = _clean_inline(re.sub(r"^[*#:;]+\s*", "", line))
        if re.search(r"[^\W\d_]", line):
            items.append((0, line))
    # Keep a heading only if prose follows before the next heading of its level or above.
    kept: list[str] = []
    for i, (level, line) in enumerate(items):
        if level:
            following = (lv for lv, _ in items[i + 1 :] if lv == 0 or lv <= level)
            if next(following, -1) != 0:
                continue
        kept.append(line)
    return kept


def strip_markup(wikitext: str) -> str:
    """Convert one page of MediaWiki markup to plain prose, one paragraph per line."""
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _MATH.sub(_math, text)
    text = _strip_templates(text)
    text = _strip_tables(text)
    text = _strip_links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    # Entities last: unescaping earlier could forge markup ("&lt;ref&gt;").
    text = html.unescape(text)
    return "\n".join(_lines(text))


# ---------------------------------------------------------------- dump parsing


def iter_pages(xml_stream: BinaryIO) -> Iterator[tuple[str, int, bool, str]]:
    """Yield (title, namespace, is_redirect, wikitext) per <page>, streaming."""
    title, ns, redirect, text = "", 0, False, ""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = int(elem.text or 0)
        elif tag == "redirect":
            redirect = True
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            yield title, ns, redirect, text
            title, ns, redirect, text = "", 0, False, ""
            elem.clear()


def extract_articles(xml_stream: BinaryIO, min_words: int = 150) -> list[Article]:
    """Main-namespace articles as plain text, skipping redirects, disambiguations, stubs."""
    articles = []
    for title, ns, redirect, wikitext in iter_pages(xml_stream):
        if ns != 0 or redirect or wikitext.lstrip()[:9].upper() == "#REDIRECT":
            continue
        if title.endswith("(disambiguation)") or _DISAMBIG.search(wikitext):
            continue
        body = strip_markup(wikitext)
        if len(body.split()) >= min_words:
            articles.append(Article(title, f"{title}\n{body}"))
    return articles


def extract_articles_bz2(data: bytes, min_words: int = 150) -> list[Article]:
    import io

    with bz2.open(io.BytesIO(data)) as stream:
        return extract_articles(stream, min_words)


# ---------------------------------------------------------------- split


def title_key(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def split_articles(
    articles: Iterable[Article], eval_fraction: float = 0.2
) -> tuple[list[Article], list[Article]]:
    """Split by whole article: never one article on both sides.

    Articles are visited in sha256(title) order and go to eval until eval holds
    ``eval_fraction`` of all characters (a plain hash threshold gives too uneven sizes with
    ~100 articles of very different lengths). Both lists keep the input order.
    """
    articles = list(articles)
    titles = [a.title for a in articles]
    if len(set(titles)) != len(titles):
        raise ValueError("duplicate article titles")
    total = sum(len(a.text) for a in articles)
    eval_titles: set[str] = set()
    size = 0
    for a in sorted(articles, key=lambda a: title_key(a.title)):
        if size >= eval_fraction * total and eval_titles:
            break
        eval_titles.add(a.title)
        size += len(a.text)
    if len(articles) >= 2 and len(eval_titles) == len(articles):
        eval_titles.discard(max(eval_titles, key=title_key))
    calib = [a for a in articles if a.title not in eval_titles]
    evals = [a for a in articles if a.title in eval_titles]
    return calib, evals


def join_articles(articles: Iterable[Article]) -> str:
    """One article per block, blank line between articles, newline at the end."""
    return "\n\n".join(a.text for a in articles) + "\n"
