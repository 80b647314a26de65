"""Real English text that installs from the package registry: gensim's bundled test data.

gensim ships (in ``gensim/test/test_data/``) a shortened English Wikipedia dump and the word2vec
analogy questions. They are the only real text this project can count on without hub access, so
training (``linearize finetune``) and evaluation (``linearize/evals/``) both read them through this module.

Stable API (imported by the finetune data code and by ``linearize/evals/``):

- :func:`wiki_articles` ``(split="all" | "train" | "heldout") -> list[Article]``
- :func:`capital_analogies` ``(sections=CAPITAL_SECTIONS) -> list[Analogy]``
- :func:`gensim_data_path` ``(name) -> Path``
- :func:`python_docs` ``(max_chars=PYTHON_DOC_MAX_CHARS) -> list[Article]``: text of another domain
  than Wikipedia, for evaluation only (see its docstring)

The Wikipedia split is fixed: articles keep the dump's order, and the LAST
:data:`WIKI_HELDOUT_ARTICLES` (= 20) articles are the held-out evaluation set; ``"train"`` is every
article before them. Nothing in this project trains on ``"heldout"``.

Cleaning (done once per process, ≈1.5 s): pages are read with ``gensim.corpora.wikicorpus``
(``extract_pages`` on namespace 0, markup removed with ``filter_wiki``), then bold/italic quote
markup is dropped, empty list items and runs of blank lines are collapsed, and — as gensim's
``WikiCorpus`` does — redirects, pages in ``IGNORED_NAMESPACES`` and pages with fewer than
``ARTICLE_MIN_WORDS`` (50) words are skipped. Casing and punctuation are kept (language-model text,
not bag-of-words tokens). This leaves 106 articles (≈3.07M characters; 86 train, 20 held out)
with gensim 4.4.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

# The dump shipped in gensim's test data (English Wikipedia, shortened by the gensim authors).
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# word2vec's analogy questions (Mikolov et al. 2013), shipped by gensim.
ANALOGY_FILE = "questions-words.txt"
# Sections of ANALOGY_FILE whose pairs are (capital city, country).
CAPITAL_SECTIONS = ("capital-common-countries", "capital-world")
# Number of final articles held out for evaluation (fixed; see module docstring).
WIKI_HELDOUT_ARTICLES = 20
SPLITS = ("all", "train", "heldout")


@dataclass(frozen=True)
class Article:
    """One cleaned Wikipedia article."""

    title: str
    text: str


@dataclass(frozen=True)
class Analogy:
    """``a`` is to ``b`` as ``c`` is to ``d`` (e.g. Athens, Greece, Baghdad, Iraq)."""

    section: str
    a: str
    b: str
    c: str
    d: str


def gensim_data_path(name: str) -> Path:
    """Path of a file in gensim's ``test/test_data`` folder, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "gensim is not installed; the offline text needs it: pip install 'linearize[data]' (gensim>=4.3)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim; reinstall gensim>=4.3")
    return path


_BOLD_ITALIC = re.compile(r"'{2,}")
_EMPTY_ITEM = re.compile(r"^[*#:;\s]*$")
_BLANK_RUN = re.compile(r"\n{3,}")


def clean_wiki_text(raw_markup: str) -> str:
    """Wiki markup -> plain text with paragraphs (see the module docstring for the steps)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = _BOLD_ITALIC.sub("", filter_wiki(raw_markup))
    lines = [line.rstrip() for line in text.splitlines()]
    lines = ["" if _EMPTY_ITEM.match(line) else line for line in lines]
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()


@functools.lru_cache(maxsize=1)
def _all_articles() -> tuple[Article, ...]:
    from gensim.corpora.wikicorpus import ARTICLE_MIN_WORDS, IGNORED_NAMESPACES, extract_pages

    articles = []
    with bz2.open(gensim_data_path(WIKI_DUMP), "rb") as fh:
        for title, markup, _page_id in extract_pages(fh, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            if title.split(":", 1)[0] in IGNORED_NAMESPACES and ":" in title:
                continue
            text = clean_wiki_text(markup)
            if len(text.split()) < ARTICLE_MIN_WORDS:
                continue
            articles.append(Article(title=title, text=text))
    return tuple(articles)


def wiki_articles(split: str = "all") -> list[Article]:
    """Cleaned articles of gensim's Wikipedia sample, in dump order.

    ``split``: ``"all"``; ``"train"`` (every article but the last :data:`WIKI_HELDOUT_ARTICLES`);
    ``"heldout"`` (the last :data:`WIKI_HELDOUT_ARTICLES`, used only for evaluation).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    articles = list(_all_articles())
    if split == "train":
        return articles[:-WIKI_HELDOUT_ARTICLES]
    if split == "heldout":
        return articles[-WIKI_HELDOUT_ARTICLES:]
    return articles


def capital_analogies(sections: tuple[str, ...] | list[str] = CAPITAL_SECTIONS) -> list[Analogy]:
    """Analogy questions from the named sections of ``questions-words.txt``, in file order."""
    wanted = set(sections)
    out: list[Analogy] = []
    found: set[str] = set()
    section = None
    for line in gensim_data_path(ANALOGY_FILE).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            found.add(section)
            continue
        if section in wanted and line.strip():
            a, b, c, d = line.split()
            out.append(Analogy(section, a, b, c, d))
    missing = wanted - found
    if missing:
        raise ValueError(
            f"sections {sorted(missing)} are not in {ANALOGY_FILE}; available: {sorted(found)}"
        )
    return out


# Each Python documentation topic is cut to this many characters (at a line end): the 79 topics of
# Python 3.11 then hold ~108K characters (~30K tokens for SmolLM2), a few minutes of scoring on CPU.
PYTHON_DOC_MAX_CHARS = 2000


def python_docs(max_chars: int | None = PYTHON_DOC_MAX_CHARS) -> list[Article]:
    """The Python language reference's topics as plain English prose (``pydoc_data.topics``, which
    ships with CPython for ``help()``): text of another domain than the Wikipedia the finetunes
    train on, held out of every recipe and design choice (evaluation only: the out-of-domain task).

    Topics are sorted by name, each cut to ``max_chars`` characters at a line end (None: whole).
    The text is the running interpreter's: scores compare within one Python minor version.
    """
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = topics[name].strip()
        if max_chars is not None and len(text) > max_chars:
            end = text.rfind("\n", 0, max_chars)
            text = text[: end if end > 0 else max_chars].rstrip()
        docs.append(Article(title=name, text=text))
    return docs
