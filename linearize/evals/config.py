"""Settings of the offline evaluation tasks, defined once (the CLI and tests build from these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from linearize.offline_text import CAPITAL_SECTIONS

# Offline task names (lm-eval task names; the YAMLs live in linearize/evals/tasks/).
WIKI = "linearize_wiki"
WIKI_WINDOWS = "linearize_wiki512"
CAPITALS = "linearize_capitals"
PASSKEY = "linearize_passkey"
# Out of domain: Python's own documentation prose (never trained on; every recipe trains on Wikipedia).
PYDOC = "linearize_pydoc"
OFFLINE_TASKS = (WIKI, WIKI_WINDOWS, CAPITALS, PASSKEY, PYDOC)
# The lm-eval tag (group of tasks) that selects all of them.
OFFLINE_TAG = "linearize_offline"

# Metric reported per task in the recovery table (and used for the average and the chart).
# Standard tasks follow the convention of the linearization papers (LoLCATs, Liger, Lizard):
# acc for PIQA, ARC-easy, WinoGrande, MMLU; acc_norm for ARC-challenge and HellaSwag.
PRIMARY_METRIC = {
    WIKI: "word_perplexity",
    WIKI_WINDOWS: "token_perplexity",
    CAPITALS: "acc",
    PASSKEY: "acc",
    PYDOC: "word_perplexity",
    "piqa": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "mmlu": "acc",
}
# Fallback order for tasks not in PRIMARY_METRIC: the first of these that lm-eval reports.
METRIC_PREFERENCE = ("acc", "exact_match", "acc_norm", "word_perplexity", "perplexity", "f1", "mcc")


@dataclass
class OfflineTaskConfig:
    """How the offline task data is built (see linearize/evals/data.py for each task)."""

    # Issue 7's perplexity targets use 512-token windows of the held-out articles.
    wiki_window_tokens: int = 512
    # Cut each held-out article to this many characters (None: whole articles), for both wiki tasks. For tests.
    wiki_max_chars: int | None = None
    # Cut each linearize_wiki document (not the source of the 512-token windows) to this many
    # characters (None: whole articles). A quick look (QUICK_LOOK) sets it.
    wiki_doc_max_chars: int | None = None
    capital_sections: tuple[str, ...] = CAPITAL_SECTIONS
    # Choices per capital question: the right country plus seeded distractors (chance = 1/4).
    capital_choices: int = 4
    # Total prompt+answer lengths in tokens of the passkey documents; the issue asks for 1K-8K.
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    # Relative positions of the key in the filler (0 = start, 1 = just before the question).
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # Documents per (length, depth) cell, each with its own random key.
    passkey_samples: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        self.capital_sections = tuple(self.capital_sections)
        self.passkey_lengths = tuple(int(x) for x in self.passkey_lengths)
        self.passkey_depths = tuple(float(x) for x in self.passkey_depths)
        if self.wiki_window_tokens < 2:
            raise ValueError(f"wiki_window_tokens={self.wiki_window_tokens}: need at least 2 tokens per window")
        for name in ("wiki_max_chars", "wiki_doc_max_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: use None (whole articles) or a positive count")
        if self.capital_choices < 2:
            raise ValueError(f"capital_choices={self.capital_choices}: a multiple-choice question needs 2 or more")
        if not self.passkey_lengths or min(self.passkey_lengths) < 1:
            raise ValueError(f"passkey_lengths={self.passkey_lengths}: give positive token counts, e.g. 1024,2048")
        if not self.passkey_depths or not all(0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise ValueError(f"passkey_depths={self.passkey_depths}: each depth must lie in [0, 1]")
        if self.passkey_samples < 1:
            raise ValueError(f"passkey_samples={self.passkey_samples}: need at least 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capital_sections"] = list(self.capital_sections)
        d["passkey_lengths"] = list(self.passkey_lengths)
        d["passkey_depths"] = list(self.passkey_depths)
        return d


# A quick look (`--limit`) bounds the work per task, not only the documents: whole Wikipedia articles
# (up to ~40K tokens each) and 8K-token passkeys made `--limit 2` take over 10 minutes on CPU. With a
# limit on a task (and the field not set explicitly) these sizes apply: linearize_wiki's articles cut to
# ~500 tokens, passkeys of the shortest length of the default range only (linearize_wiki512 and
# linearize_capitals need nothing: a limit already bounds their work).
QUICK_LOOK = {"wiki_doc_max_chars": 2000, "passkey_lengths": (1024,)}
_QUICK_TASKS = {"wiki_doc_max_chars": WIKI, "passkey_lengths": PASSKEY}


def _has_limit(limit, task: str) -> bool:
    if isinstance(limit, dict):
        return task in limit or "*" in limit
    return limit is not None


def task_config_for(limit=None, **fields) -> OfflineTaskConfig:
    """The offline task settings for a run with ``limit`` (see ``runner.parse_limit``): defaults, or
    for the tasks with a limit the :data:`QUICK_LOOK` sizes; ``fields`` that are not None win."""
    chosen = {k: v for k, v in fields.items() if v is not None}
    for key, value in QUICK_LOOK.items():
        if key not in chosen and _has_limit(limit, _QUICK_TASKS[key]):
            chosen[key] = value
    return OfflineTaskConfig(**chosen)
