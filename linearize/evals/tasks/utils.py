"""Per-document scoring for the offline tasks (referenced by ``!function`` in the base YAMLs).

lm-eval imports this file by path, next to the YAML that names it; keep it dependency-free.
"""

from __future__ import annotations

import re


def wiki_process_results(doc: dict, results: list) -> dict:
    """Rolling loglikelihood of a whole article -> (loglikelihood, count) pairs per unit.

    Words are whitespace-separated pieces and bytes are UTF-8 bytes of the article, as in lm-eval's
    ``wikitext`` task.
    """
    (loglikelihood,) = results
    text = doc["text"]
    words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def window_process_results(doc: dict, results: list) -> dict:
    """Rolling loglikelihood of one token window -> (loglikelihood, tokens scored)."""
    (loglikelihood,) = results
    return {"token_perplexity": (loglikelihood, doc["n_tokens"])}


def passkey_process_results(doc: dict, results: list) -> dict:
    """1 if greedy decoding reproduces the whole key, else 0."""
    ((_loglikelihood, is_greedy),) = results
    return {"acc": float(is_greedy)}
