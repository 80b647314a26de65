"""Offline evaluation tasks through lm-eval, checked against scores computed here directly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("lm_eval")
pytest.importorskip("gensim")

from linearize.evals.config import CAPITALS, PASSKEY, PYDOC, WIKI, WIKI_WINDOWS, OfflineTaskConfig  # noqa: E402
from linearize.evals.data import PASSKEY_NEEDLE, PASSKEY_QUESTION, passkey_doc, prepare_tasks  # noqa: E402
from linearize.evals.report import build_report, render_markdown, write_report  # noqa: E402
from linearize.evals.runner import evaluate, parse_limit, split_tasks  # noqa: E402
from linearize.offline_text import WIKI_HELDOUT_ARTICLES, capital_analogies, python_docs, wiki_articles  # noqa: E402
from tiny_tokenizer import byte_tokenizer  # noqa: E402

# Tiny shapes: byte tokens, passkey documents of a few hundred tokens.
TASK_CONFIG = OfflineTaskConfig(wiki_max_chars=300, wiki_window_tokens=48, passkey_lengths=(560, 800),
                                passkey_depths=(0.0, 0.5, 1.0))
LIMIT = 4


def tiny_llama(vocab: int, seed: int = 0, positions: int = 1024) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=positions,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, tok):
    return prepare_tasks(tmp_path_factory.mktemp("tasks"), tok, TASK_CONFIG)


def read_docs(tasks_dir, task, n=None):
    with open(tasks_dir / "data" / f"{task}.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    return docs[:n] if n else docs


# ---- independent scores (plain forward passes, no lm-eval) ----

@torch.no_grad()
def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)  # [T-1, V]
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))


@torch.no_grad()
def text_logprob(model, tok, text: str) -> float:
    """log p(text) predicted from the end-of-text token, in one window (the text is short)."""
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))


def mc_accuracy(model, tok, docs) -> float:
    right = 0
    for doc in docs:
        scores = [continuation_logprob(model, tok, doc["context"], " " + c) for c in doc["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return right / len(docs)


# ---- offline text and task data ----

def test_wiki_split_is_fixed_and_disjoint():
    all_, train, heldout = wiki_articles("all"), wiki_articles("train"), wiki_articles("heldout")
    assert len(heldout) == WIKI_HELDOUT_ARTICLES and len(all_) > 100
    assert train + heldout == all_ and heldout == all_[-WIKI_HELDOUT_ARTICLES:]
    assert not {a.title for a in train} & {a.title for a in heldout}
    assert all("'''" not in a.text and len(a.text.split()) >= 50 for a in all_)
    with pytest.raises(ValueError, match="split"):
        wiki_articles("test")


def test_capital_questions(tasks_dir):
    analogies = capital_analogies()
    assert {a.section for a in analogies} == {"capital-common-countries", "capital-world"}
    answers = {(a.a, a.b, a.c): a.d for a in analogies}
    docs = read_docs(tasks_dir, CAPITALS)
    assert len(docs) == len(set(answers))
    for doc in docs[:200]:
        a, rest = doc["context"].split(" is to ", 1)
        b, c = rest.removesuffix(" is to").split(" as ")
        assert doc["choices"][doc["label"]] == answers[(a, b, c)]
        assert len(set(doc["choices"])) == TASK_CONFIG.capital_choices and b not in doc["choices"]


def test_passkey_documents(tok):
    for length in TASK_CONFIG.passkey_lengths:
        docs = {d: passkey_doc(tok, length, d, key=12345) for d in (0.0, 0.5, 1.0)}
        for depth, doc in docs.items():
            assert doc["n_tokens"] <= length and doc["target"] == " 12345"
            assert doc["context"].endswith(PASSKEY_QUESTION)
            assert len(tok(doc["context"] + " 12345")["input_ids"]) == doc["n_tokens"]
        # the key moves from the start of the filler to its end
        where = {d: doc["context"].index(PASSKEY_NEEDLE.format(key=12345)) for d, doc in docs.items()}
        assert where[0.0] < where[0.5] < where[1.0]
        assert docs[1.0]["context"].endswith(PASSKEY_NEEDLE.format(key=12345) + PASSKEY_QUESTION)
    with pytest.raises(ValueError, match="too short"):
        passkey_doc(tok, 100, 0.5, key=12345)


def test_windows_are_token_spans(tasks_dir, tok):
    docs = read_docs(tasks_dir, WIKI_WINDOWS)
    heldout = {a.title: a.text[: TASK_CONFIG.wiki_max_chars] for a in wiki_articles("heldout")}
    assert docs
    for d in docs:  # n_tokens is what lm-eval scores; a window cut inside a multi-byte character grows a little
        assert d["n_tokens"] == len(tok(d["text"], add_special_tokens=False)["input_ids"])
        assert abs(d["n_tokens"] - TASK_CONFIG.wiki_window_tokens) <= 6
    assert all(d["text"] in heldout[d["title"]] for d in docs)


def test_parse_limit():
    assert parse_limit("20") == 20 and parse_limit("0.25") == 0.25 and parse_limit(None) is None
    assert parse_limit("8, linearize_capitals=100") == {"*": 8, CAPITALS: 100}
    for bad in ("x", "2.5", "0", "a=b"):
        with pytest.raises(ValueError, match="--limit"):
            parse_limit(bad)


def test_split_tasks():
    assert split_tasks("piqa,linearize_offline,piqa") == ([WIKI, WIKI_WINDOWS, CAPITALS, PASSKEY, PYDOC], ["piqa"])
    with pytest.raises(ValueError, match="no tasks"):
        split_tasks(" , ")


# ---- lm-eval runs ----

def test_offline_tasks_through_lm_eval_match_direct_scores(model, tok, tasks_dir):
    tasks = [WIKI, WIKI_WINDOWS, CAPITALS]
    limit = {"*": LIMIT, CAPITALS: LIMIT + 2}  # per-task limits: two lm-eval calls, merged
    results = evaluate(model, tok, tasks, limit=limit, batch_size=4, task_config=TASK_CONFIG, include_path=tasks_dir)
    got = results["results"]
    assert {t: results["n-samples"][t]["effective"] for t in tasks} == {WIKI: LIMIT, WIKI_WINDOWS: LIMIT,
                                                                        CAPITALS: LIMIT + 2}

    docs = read_docs(tasks_dir, CAPITALS, LIMIT + 2)
    assert got[CAPITALS]["acc,none"] == pytest.approx(mc_accuracy(model, tok, docs))

    docs = read_docs(tasks_dir, WIKI, LIMIT)
    ll = sum(text_logprob(model, tok, d["text"]) for d in docs)
    words = sum(len(d["text"].split()) for d in docs)
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    assert got[WIKI]["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert got[WIKI]["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)

    docs = read_docs(tasks_dir, WIKI_WINDOWS, LIMIT)
    ll = sum(text_logprob(model, tok, d["text"]) for d in docs)
    n_tokens = sum(d["n_tokens"] for d in docs)
    assert got[WIKI_WINDOWS]["token_perplexity,none"] == pytest.approx(math.exp(-ll / n_tokens), rel=1e-4)


def test_out_of_domain_task_scores_python_docs(tok, tasks_dir):
    """linearize_pydoc: Python's documentation prose, no Wikipedia in it, scored like linearize_wiki
    (a model whose context holds a whole 2,000-byte document: one window, scored here directly)."""
    model = tiny_llama(len(tok), positions=2048)
    docs = read_docs(tasks_dir, PYDOC)
    assert [d["title"] for d in docs] == sorted(d["title"] for d in docs) and len(docs) >= 50
    assert max(len(d["text"]) for d in docs) <= 2000 and min(len(d["text"]) for d in docs) > 0
    assert {d["text"] for d in docs} == {a.text for a in python_docs()}
    wiki_text = "\n".join(a.text for a in wiki_articles("all"))
    assert not any(d["text"][:200] in wiki_text for d in docs), "out-of-domain text must not be in the training data"
    results = evaluate(model, tok, [PYDOC], limit=2, batch_size=4, task_config=TASK_CONFIG, include_path=tasks_dir)
    first = docs[:2]
    ll = sum(text_logprob(model, tok, d["text"]) for d in first)
    words = sum(len(d["text"].split()) for d in first)
    assert results["results"][PYDOC]["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-4)


def induction_logits(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """A model that knows nothing but copying: at each position predict the token that followed the
    longest earlier match of the current suffix (an ideal induction head). [B, T] -> [B, T, V]."""
    B, T = ids.shape
    logits = torch.zeros(B, T, vocab)
    for b in range(B):
        x = ids[b]
        eq = (x[:, None] == x[None, :]).long()  # [T, T]
        match = torch.zeros(T, T, dtype=torch.long)  # match[t, j]: common suffix length of x[:t+1], x[:j+1]
        match[0] = eq[0]
        for t in range(1, T):
            match[t, 1:] = eq[t, 1:] * (1 + match[t - 1, :-1])
            match[t, 0] = eq[t, 0]
        match = match.tril(-1)  # only earlier positions j < t
        best = match.argmax(dim=1)  # first (earliest) longest match
        for t in range(1, T):
            if match[t, best[t]] > 0:
                logits[b, t, x[best[t] + 1]] = 30.0
    return logits


def test_passkey_retrieval_scores_one_for_a_retriever_and_zero_for_a_random_model(model, tok, tasks_dir):
    from lm_eval.models.huggingface import HFLM

    class InductionLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            return induction_logits(inps, len(tok))

    n_docs = len(read_docs(tasks_dir, PASSKEY))
    oracle = InductionLM(pretrained=model, tokenizer=tok, batch_size=2)
    results = evaluate(None, tok, [PASSKEY], task_config=TASK_CONFIG, include_path=tasks_dir, lm=oracle)
    assert results["n-samples"][PASSKEY]["effective"] == n_docs == 6
    assert results["results"][PASSKEY]["acc,none"] == 1.0

    results = evaluate(model, tok, [PASSKEY], batch_size=2, task_config=TASK_CONFIG, include_path=tasks_dir)
    assert results["results"][PASSKEY]["acc,none"] <= 1 / n_docs


def test_passkey_longer_than_the_model_is_refused(model, tok, tasks_dir):
    config = OfflineTaskConfig(passkey_lengths=(2048,))
    with pytest.raises(ValueError, match="max length"):
        evaluate(model, tok, [PASSKEY], task_config=config, include_path=tasks_dir)


# ---- report ----

def _results(task_values: dict, n: int = 10) -> dict:
    hib = {"acc": True, "acc_norm": True, "word_perplexity": False, "token_perplexity": False}
    return {
        "results": {t: {"alias": t, **{f"{m},none": v for m, v in mv.items()}, **{f"{m}_stderr,none": "N/A" for m in mv}}
                    for t, mv in task_values.items()},
        "higher_is_better": {t: {m: hib[m] for m in mv} for t, mv in task_values.items()},
        "n-samples": {t: {"original": 100, "effective": n} for t in task_values},
    }


def test_report_rows_average_and_files(tmp_path):
    teacher = _results({CAPITALS: {"acc": 0.5, "acc_norm": 0.4}, WIKI: {"word_perplexity": 20.0},
                        "arc_challenge": {"acc": 0.3, "acc_norm": 0.4}})
    student = _results({CAPITALS: {"acc": 0.25, "acc_norm": 0.3}, WIKI: {"word_perplexity": 40.0},
                        "arc_challenge": {"acc": 0.2, "acc_norm": 0.3}})
    tasks = [CAPITALS, WIKI, "arc_challenge"]
    report = build_report(teacher, student, tasks, teacher="T", student="S", settings={"limit": 10})
    rows = {r["task"]: r for r in report["tasks"]}
    assert rows[CAPITALS]["metric"] == "acc" and rows[CAPITALS]["recovery"] == pytest.approx(0.5)
    assert rows[WIKI]["metric"] == "word_perplexity" and not rows[WIKI]["higher_is_better"]
    assert rows[WIKI]["recovery"] == pytest.approx(0.5)  # teacher/student for perplexity
    assert rows["arc_challenge"]["metric"] == "acc_norm" and rows["arc_challenge"]["recovery"] == pytest.approx(0.75)
    assert rows[CAPITALS]["student_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 9))
    assert report["average"]["teacher"] == pytest.approx(0.45) and report["average"]["student"] == pytest.approx(0.275)
    assert report["average"]["recovery"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)

    md = render_markdown(report)
    assert "| linearize_capitals | acc ↑ | 10 | 0.5000 ± 0.1667 | 0.2500 ± 0.1443 | 0.5000 |" in md
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    paths = write_report(report, tmp_path / "out", checkpoint_dir=ckpt)
    assert json.loads((ckpt / "eval_report.json").read_text()) == json.loads(paths["json"].read_text())
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_linearize_eval_cli_on_a_converted_checkpoint(tmp_path, model, tok, capsys):
    linearize = pytest.importorskip("linearize")
    from linearize import cli

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    student = linearize.convert(tiny_llama(len(tok)))
    linearize.save_converted(student, student_dir, tok)
    code = cli.main(["eval", str(student_dir), "--teacher", str(teacher_dir), "--tasks", CAPITALS, "--limit", "4",
                     "--batch-size", "4"])
    assert code == 0
    report = json.loads((student_dir / "eval_report.json").read_text())
    assert report == json.loads((student_dir / "eval" / "report.json").read_text())
    (row,) = report["tasks"]
    docs = read_docs(student_dir / "eval" / "tasks", CAPITALS, 4)
    assert row["n"] == 4
    assert row["teacher"] == pytest.approx(mc_accuracy(model, tok, docs))
    assert row["student"] == pytest.approx(mc_accuracy(student, tok, docs))
    assert "| linearize_capitals | acc ↑ | 4 |" in capsys.readouterr().out
    assert (student_dir / "eval" / "report.png").is_file() and (student_dir / "eval" / "report.md").is_file()


def test_teacher_cache_answers_the_next_evaluation(tmp_path, model, tok):
    linearize = pytest.importorskip("linearize")
    from linearize import cli

    teacher_dir, student_dir, cache = tmp_path / "teacher", tmp_path / "student", tmp_path / "cache"
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    linearize.save_converted(linearize.convert(tiny_llama(len(tok))), student_dir, tok)
    args = ["eval", str(student_dir), "--teacher", str(teacher_dir), "--tasks", WIKI, "--limit", "2",
            "--batch-size", "2", "--teacher-cache", str(cache)]

    def teacher_score(argv):
        assert cli.main(argv) == 0
        return json.loads((student_dir / "eval_report.json").read_text())["tasks"][0]["teacher"]

    first = teacher_score(args)
    assert len(list(cache.glob("*.db"))) == 1
    # New teacher weights behind the cache's back: the cached answers are still what it reports ...
    tiny_llama(len(tok), seed=5).save_pretrained(teacher_dir)
    assert teacher_score(args) == first
    # ... and without the cache the new weights are evaluated.
    assert teacher_score(args[:-2]) != pytest.approx(first)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["hf", "linearize"])
def test_lm_eval_command_line_on_a_converted_folder(tmp_path, tok, command):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` and `python -m linearize.evals run
    --model linearize` both evaluate a converted folder (slow: lm-eval indexes its ~15K task files)."""
    import subprocess
    import sys

    linearize = pytest.importorskip("linearize")
    folder = linearize.save_converted(linearize.convert(tiny_llama(len(tok))), tmp_path / "ckpt", tok)
    tasks = prepare_tasks(tmp_path / "tasks", tok, TASK_CONFIG, [CAPITALS])
    if command == "hf":
        head = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                f"pretrained={folder},trust_remote_code=True,dtype=float32"]
    else:
        head = [sys.executable, "-m", "linearize.evals", "run", "--model", "linearize", "--model_args", f"pretrained={folder}"]
    run = subprocess.run(head + ["--tasks", CAPITALS, "--include_path", str(tasks), "--limit", "3", "--device", "cpu",
                                 "--batch_size", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert CAPITALS in run.stdout and "acc" in run.stdout
