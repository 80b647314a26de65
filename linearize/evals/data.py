"""Builds the offline tasks' data from gensim's package data and writes lm-eval task stubs.

How the offline tasks reach lm-eval (no fork, no patching):

1. ``linearize/evals/tasks/_<task>.yaml`` are complete lm-eval task configs except for the data location
   (``dataset_path: json``) and have no ``task:`` key, so lm-eval's indexer ignores them.
2. :func:`prepare_tasks` builds each task's documents (JSON lines) with the tokenizer being
   evaluated and writes, into one folder, a stub per task::

       include: /abs/path/linearize/evals/tasks/_linearize_wiki.yaml
       task: linearize_wiki
       tag: linearize_offline
       dataset_kwargs: {data_files: {test: /abs/path/data/linearize_wiki.jsonl}}

3. ``lm_eval.tasks.TaskManager(include_path=<that folder>)`` (or ``lm_eval --include_path``)
   then knows the tasks; ``!function utils.*`` resolves next to the base YAMLs.

Two tasks depend on the tokenizer (token windows, passkey lengths), so the folder is built per
tokenizer; teacher and student of one conversion share it. Building everything takes a few
seconds (parsing the Wikipedia dump dominates).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import yaml

from linearize.offline_text import capital_analogies, python_docs, wiki_articles

from .config import CAPITALS, OFFLINE_TAG, OFFLINE_TASKS, PASSKEY, PYDOC, WIKI, WIKI_WINDOWS, OfflineTaskConfig

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# Passkey prompt pieces, the format of Mohtashami & Jaggi 2023 (Landmark Attention), also used by
# LongLoRA and the linear-attention papers' passkey tests.
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def wiki_docs(config: OfflineTaskConfig) -> list[dict]:
    """The held-out articles, whole (or cut to ``wiki_max_chars``), in dump order."""
    docs = []
    for art in wiki_articles("heldout"):
        text = art.text if config.wiki_max_chars is None else art.text[: config.wiki_max_chars]
        docs.append({"title": art.title, "text": text})
    return docs


def wiki_window_docs(tokenizer, config: OfflineTaskConfig) -> list[dict]:
    """Consecutive ``wiki_window_tokens``-token windows of the held-out articles, shuffled (seeded)
    so that lm-eval's ``--limit`` (first N documents) samples every article. A window is the exact
    text span of its tokens; the tail of an article shorter than a window is dropped."""
    size = config.wiki_window_tokens
    docs = []
    for art in wiki_docs(config):
        enc = tokenizer(art["text"], add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        for start in range(0, len(offsets) - size + 1, size):
            text = art["text"][offsets[start][0] : offsets[start + size - 1][1]]
            docs.append({"title": art["title"], "start_token": start, "text": text,
                         "n_tokens": _n_tokens(tokenizer, text)})
    random.Random(config.seed).shuffle(docs)
    return docs


def capital_docs(config: OfflineTaskConfig) -> list[dict]:
    """Distinct capital analogies as multiple-choice questions, shuffled (seeded).

    Distractors are other countries of the same sections, never the example's country."""
    rng = random.Random(config.seed)
    seen, questions = set(), []
    for q in capital_analogies(config.capital_sections):
        if (q.a, q.b, q.c, q.d) not in seen:
            seen.add((q.a, q.b, q.c, q.d))
            questions.append(q)
    countries = sorted({q.d for q in questions} | {q.b for q in questions})
    if len(countries) < config.capital_choices + 1:
        raise ValueError(
            f"capital_choices={config.capital_choices} needs more countries than the {len(countries)} "
            f"in sections {config.capital_sections}"
        )
    docs = []
    for q in questions:
        pool = [c for c in countries if c not in (q.b, q.d)]
        choices = rng.sample(pool, config.capital_choices - 1)
        label = rng.randrange(config.capital_choices)
        choices.insert(label, q.d)
        docs.append({"section": q.section, "context": f"{q.a} is to {q.b} as {q.c} is to",
                     "choices": choices, "label": label})
    rng.shuffle(docs)
    return docs


def passkey_doc(tokenizer, length: int, depth: float, key: int) -> dict:
    """One passkey document of at most ``length`` tokens (prompt and answer) with the key after
    ``round(depth * fillers)`` filler sentences."""
    fixed = (_n_tokens(tokenizer, PASSKEY_INTRO) + _n_tokens(tokenizer, PASSKEY_NEEDLE.format(key=key))
             + _n_tokens(tokenizer, PASSKEY_QUESTION) + _n_tokens(tokenizer, f" {key}"))
    per_filler = _n_tokens(tokenizer, PASSKEY_FILLER)
    fillers = (length - fixed) // per_filler
    while fillers >= 1:
        before = round(depth * fillers)
        context = (PASSKEY_INTRO + PASSKEY_FILLER * before + PASSKEY_NEEDLE.format(key=key)
                   + PASSKEY_FILLER * (fillers - before) + PASSKEY_QUESTION)
        n = _n_tokens(tokenizer, context + f" {key}")
        if n <= length:
            # lm-eval adds no delimiter for loglikelihood requests: the target carries its space.
            return {"context": context, "target": f" {key}", "length": length, "depth": depth, "n_tokens": n}
        fillers -= 1  # token merges across pieces made it longer than planned
    raise ValueError(
        f"passkey length {length} is too short: the prompt without filler already takes {fixed} tokens; "
        "use longer passkey_lengths"
    )


def passkey_docs(tokenizer, config: OfflineTaskConfig) -> list[dict]:
    """Every (length, depth, sample) cell once with a seeded random 5-digit key, shuffled (seeded)
    so that ``--limit`` samples lengths and depths alike."""
    rng = random.Random(config.seed)
    docs = [
        passkey_doc(tokenizer, length, depth, rng.randint(10000, 99999))
        for length in config.passkey_lengths
        for depth in config.passkey_depths
        for _ in range(config.passkey_samples)
    ]
    rng.shuffle(docs)
    return docs


def build_docs(task: str, tokenizer, config: OfflineTaskConfig) -> list[dict]:
    """Documents of one offline task."""
    if task == WIKI:
        cut = config.wiki_doc_max_chars
        return [{**doc, "text": doc["text"][:cut]} if cut else doc for doc in wiki_docs(config)]
    if task == CAPITALS:
        return capital_docs(config)
    if task == PYDOC:
        return [{"title": doc.title, "text": doc.text} for doc in python_docs()]
    if tokenizer is None:
        raise ValueError(f"task {task} is built with the evaluated model's tokenizer; pass tokenizer=")
    if task == WIKI_WINDOWS:
        return wiki_window_docs(tokenizer, config)
    if task == PASSKEY:
        return passkey_docs(tokenizer, config)
    raise ValueError(f"unknown offline task {task!r}; offline tasks are {', '.join(OFFLINE_TASKS)}")


def prepare_tasks(out_dir: str | Path, tokenizer=None, config: OfflineTaskConfig | None = None,
                  tasks: tuple[str, ...] | list[str] = OFFLINE_TASKS) -> Path:
    """Build the data of ``tasks`` and write their lm-eval stubs into ``out_dir``.

    Returns ``out_dir`` (absolute): pass it as lm-eval's ``include_path``.
    """
    config = config or OfflineTaskConfig()
    out = Path(out_dir).expanduser().resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    counts = {}
    for task in tasks:
        docs = build_docs(task, tokenizer, config)
        data_file = out / "data" / f"{task}.jsonl"
        with open(data_file, "w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        stub = {
            "include": str(TASKS_DIR / f"_{task}.yaml"),
            "task": task,
            "tag": OFFLINE_TAG,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        }
        (out / f"{task}.yaml").write_text(
            "# Written by evals.prepare_tasks; the task itself is defined in the included file.\n"
            + yaml.safe_dump(stub, sort_keys=False), encoding="utf-8")
        counts[task] = len(docs)
        logger.info("%s: %d documents -> %s", task, len(docs), data_file)
    manifest = {"tasks": counts, "config": config.to_dict(),
                "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def point_stubs_to(folder: str | Path, final: str | Path) -> None:
    """Rewrite the stubs of a task folder built at ``folder`` so that their data files point into
    ``final`` (where the folder is about to be moved, e.g. by ``linearize.outputs.atomic_folder``)."""
    folder, final = Path(folder), Path(final).resolve()
    for stub_file in sorted(folder.glob("*.yaml")):
        lines = stub_file.read_text(encoding="utf-8").splitlines(keepends=True)
        header = "".join(line for line in lines if line.startswith("#"))
        stub = yaml.safe_load("".join(lines))
        stub["dataset_kwargs"]["data_files"]["test"] = str(final / "data" / f"{stub['task']}.jsonl")
        stub_file.write_text(header + yaml.safe_dump(stub, sort_keys=False), encoding="utf-8")


# Rough tokens of one document per offline task without a token count of its own (for progress ETAs).
_CHARS_PER_TOKEN = 4
_CAPITAL_TOKENS = 60  # 4 choices of a ~15-token question


def estimated_tokens(folder: str | Path, task: str, limit: int | float | None) -> int:
    """Tokens the model reads for ``task`` under ``limit`` (documents: lm-eval's first N), estimated
    from the task data in ``folder`` (written by :func:`prepare_tasks`); weights a progress bar."""
    with open(Path(folder) / "data" / f"{task}.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    if limit is not None:
        docs = docs[: int(limit) if limit >= 1 else math.ceil(limit * len(docs))]
    total = 0
    for doc in docs:
        if "n_tokens" in doc:
            total += int(doc["n_tokens"])
        elif task == CAPITALS:
            total += _CAPITAL_TOKENS
        else:
            total += len(doc.get("text", "")) // _CHARS_PER_TOKEN
    return max(total, 1)
