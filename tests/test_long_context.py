"""The long-context study driver on a tiny model: documents, scores against full logits, the table."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_teacher
from tiny_tokenizer import byte_tokenizer

import linearize
from benchmarks import long_context as lc

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_multi_needle_document_holds_every_key_and_asks_one(tok):
    keys = [11111, 22222, 33333, 44444]
    prompt, answer = lc.multi_needle_doc(tok, 400, keys, asked=2, seed=0)
    text = tok.decode(prompt)
    assert len(prompt) + len(answer) <= 400 and len(prompt) + len(answer) >= 395
    positions = [text.index(f"locker is {k}.") for k in keys]
    assert positions == sorted(positions)  # spread in order through the filler
    assert text.endswith("what is the code of the green locker? Answer: the code of the green locker is")
    assert tok.decode(answer) == " 33333"
    assert "pass key" not in text  # not the eval's (nor the layer probe's) passkey format
    with pytest.raises(ValueError, match="too short"):
        lc.multi_needle_doc(tok, 100, keys, asked=0, seed=0)


def test_buckets_and_bucket_perplexity():
    assert lc.buckets(4096) == [(0, 1024), (1024, 2048), (2048, 4096)]
    assert lc.buckets(3000) == [(0, 1024), (1024, 2048), (2048, 3000)]
    nll = torch.cat([torch.full((1024,), 1.0), torch.full((1024,), 2.0), torch.full((2047,), 3.0)])  # T = 4096
    ppl = lc.bucket_perplexity(nll)
    assert list(ppl) == ["0-1024", "1024-2048", "2048-4096"]
    assert ppl["0-1024"] == pytest.approx(math.e) and ppl["2048-4096"] == pytest.approx(math.exp(3.0))


def test_scores_equal_the_full_logits(tok):
    model = tiny_teacher(max_positions=512)
    ids = torch.randint(0, 256, (200,)).tolist()
    logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
    want = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    torch.testing.assert_close(lc.next_token_nll(model, ids, chunk=64), want, rtol=1e-5, atol=1e-5)
    context = ids[:150]
    greedy = model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)[0, 150:].tolist()
    assert lc.greedy_hit(model, context, greedy)  # the model's own greedy continuation
    assert not lc.greedy_hit(model, context, [(greedy[0] + 1) % 256] + greedy[1:])


def test_study_runs_teacher_and_student_and_writes_table(tmp_path, tok):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher = tiny_teacher(max_positions=512)
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    linearize.save_converted(linearize.convert(teacher, linearize.ConversionConfig(window=16)), student_dir,
                             tokenizer=tok)
    out = tmp_path / "out"
    assert lc.main(["--model", f"teacher={teacher_dir}", "--model", f"student={student_dir}", "--lengths", "400,480",
                    "--depths", "0,1", "--needles", "2", "--out", str(out)]) == 0
    results = json.loads((out / "long_context.json").read_text())
    assert list(results["models"]) == ["teacher", "student"]
    for row in results["models"].values():
        assert set(row["passkey"]) == set(row["multi_needle"]) == {"400", "480"}
        assert all(v in (0.0, 0.5, 1.0) for v in [*row["passkey"].values(), *row["multi_needle"].values()])
        assert list(row["perplexity_by_position"]) == ["0-480"] and row["perplexity_by_position"]["0-480"] > 1
    table = (out / "long_context.md").read_text()
    assert "| student | multi_needle |" in table and "| teacher | 0-480 |" not in table and "| teacher |" in table
    with pytest.raises(SystemExit):
        lc.main(["--model", "nosource", "--out", str(out)])
    with pytest.raises(SystemExit):
        lc.main(["--model", f"t={teacher_dir}", "--depths", "2", "--out", str(out)])


def test_scaled_rope_on_the_softmax_layers_equals_a_model_built_with_it(tmp_path):
    from transformers import LlamaForCausalLM

    teacher = tiny_teacher(max_positions=64)
    ids = torch.randint(0, 256, (1, 150))
    plain = teacher(ids).logits
    config = teacher.config.to_dict()
    config["rope_parameters"] = {**teacher.config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    built = LlamaForCausalLM(type(teacher.config).from_dict(config)).eval()
    built.load_state_dict(teacher.state_dict())
    assert lc.scale_rope(teacher, "linear:2") == 2  # every layer of a teacher is a softmax layer
    torch.testing.assert_close(teacher(ids).logits, built(ids).logits)
    assert not torch.allclose(teacher(ids).logits, plain, atol=1e-3)
    dynamic = tiny_teacher(max_positions=64)
    assert lc.scale_rope(dynamic, "dynamic:4") == 2
    torch.testing.assert_close(dynamic(ids[:, :64]).logits, plain[:, :64])  # within the trained length: unchanged
    prompt = ids[:, :40]  # with a cache, token by token: the positions the decoder layers pass
    assert torch.equal(teacher.generate(prompt, max_new_tokens=30, do_sample=False),
                       built.generate(prompt, max_new_tokens=30, do_sample=False))


def test_scaled_rope_hooks_only_the_kept_layers_of_a_student(tmp_path, tok):
    student = linearize.convert(tiny_teacher(max_positions=64),
                                linearize.ConversionConfig(window=16, keep_softmax_layers=[1]))
    ids = torch.randint(0, 256, (1, 120))
    before = student(ids).logits
    assert lc.scale_rope(student, "linear:2", "kept") == 1
    after = student(ids).logits
    assert not torch.allclose(after, before, atol=1e-4)
    converted_only = linearize.convert(tiny_teacher(max_positions=64),
                                       linearize.ConversionConfig(window=16, keep_softmax_layers=[]))
    assert lc.scale_rope(converted_only, "linear:2", "kept") == 0
    assert lc.scale_rope(converted_only, "linear:2", "all") == 2
    with pytest.raises(SystemExit):
        lc.main(["--model", "t=x", "--rope-scaling", "dynamic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        lc.main(["--model", "t=x", "--rope-scaling", "nope:2", "--out", str(tmp_path)])


def test_tasks_choose_what_runs_and_the_keys_do_not_depend_on_them(tmp_path, tok):
    teacher_dir = tmp_path / "teacher"
    tiny_teacher(max_positions=512).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    for tasks, out in (("passkey", "a"), ("passkey,multi_needle,perplexity", "b")):
        assert lc.main(["--model", f"t={teacher_dir}", "--lengths", "400", "--depths", "0,1", "--needles", "2",
                        "--tasks", tasks, "--out", str(tmp_path / out)]) == 0
    only = json.loads((tmp_path / "a" / "long_context.json").read_text())["models"]["t"]
    full = json.loads((tmp_path / "b" / "long_context.json").read_text())["models"]["t"]
    assert only["passkey"] == full["passkey"] and only["multi_needle"] == {}
    assert "perplexity_by_position" not in only and "perplexity_by_position" in full
    table = (tmp_path / "a" / "long_context.md").read_text()
    assert "| t | passkey |" in table and "multi_needle" not in table and "0-400" not in table
    with pytest.raises(SystemExit):
        lc.main(["--model", f"t={teacher_dir}", "--tasks", "passkey,nope", "--out", str(tmp_path / "c")])
