"""`lathe eval` pieces: benchmark folders in three layouts, prompts, letter-logit answers,
aggregation, and every bad-input error (one line naming file and row)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lathe.data.templates import get_template
from lathe.errors import DataError, ModelError, OutputError
from lathe.eval.bench import (
    Prompter,
    check_save_dir,
    choice_logits,
    choice_tokens,
    format_question,
    format_table,
    score_subject,
    summarize,
    system_text,
)
from lathe.eval.bench_data import LETTERS, Benchmark, Question, Subject, load_benchmark, resolve_task

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "evaluation"

ROWS = [  # question, A, B, C, D, answer
    ["What is 1 + 1?", "1", "2", "3", "4", "B"],
    ["Pick the vowel, please:\nwhich one?", "b", "c", "e", "d", "C"],  # a cell spanning two lines
    ["Which is largest?", "10", "20", "30", "40", "D"],
]
DEV = [[f"Q dev {i}?", "w", "x", "y", "z", LETTERS[i % 4]] for i in range(5)]


def _write(path: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def make_mmlu(root: Path, name: str = "bench", rows=ROWS, subject: str = "algebra") -> Path:
    _write(root / name / "test" / f"{subject}_test.csv", rows)
    _write(root / name / "dev" / f"{subject}_dev.csv", DEV)
    return root


def make_ceval(root: Path) -> Path:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    body = [[str(i), *r, "because"] for i, r in enumerate(ROWS)]
    _write(root / "ceval" / "val" / "algebra_val.csv", body, header)
    _write(root / "ceval" / "dev" / "algebra_dev.csv", [[str(i), *r, ""] for i, r in enumerate(DEV)], header)
    return root


def make_cmmlu(root: Path) -> Path:
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    _write(root / "cmmlu" / "test" / "algebra.csv", [[str(i), *r] for i, r in enumerate(ROWS)], header)
    _write(root / "cmmlu" / "dev" / "algebra.csv", [[str(i), *r] for i, r in enumerate(DEV)], header)
    return root


# --- layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("make,task,layout", [(make_mmlu, "bench_test", "mmlu"),
                                              (make_ceval, "ceval_val", "header"),
                                              (make_cmmlu, "cmmlu_test", "header")])
def test_three_layouts_read_the_same_questions(tmp_path, make, task, layout):
    make(tmp_path)
    bench = load_benchmark(task, str(tmp_path), n_shot=2)
    (s,) = bench.subjects
    assert s.key == "algebra" and s.layout == layout and s.category == "other" and s.name == "algebra"
    assert [(q.question, q.choices, q.answer) for q in s.questions] == [(r[0], tuple(r[1:5]), r[5]) for r in ROWS]
    assert [q.question for q in s.shots] == ["Q dev 0?", "Q dev 1?"]  # the first n_shot dev rows
    # rows are counted as records (a header is row 1), not as lines: the 2-line cell is one row
    assert s.questions[2].where.endswith(f"row {4 if layout == 'header' else 3}")


def test_mapping_gives_names_and_categories(tmp_path):
    make_mmlu(tmp_path)
    make_mmlu(tmp_path, subject="zoology_basics")
    (tmp_path / "bench" / "mapping.json").write_text(json.dumps({"algebra": {"name": "abstract algebra",
                                                                             "category": "STEM"}}))
    by_key = {s.key: s for s in load_benchmark("bench_test", str(tmp_path), 0).subjects}
    assert (by_key["algebra"].name, by_key["algebra"].category) == ("abstract algebra", "STEM")
    # not in mapping.json: the file stem (underscores read as spaces in the prompt), category "other"
    assert (by_key["zoology_basics"].name, by_key["zoology_basics"].category) == ("zoology basics", "other")
    assert by_key["algebra"].shots == []


def test_task_names_folder_and_split(tmp_path):
    make_mmlu(tmp_path, name="my_bench")
    assert resolve_task("my_bench_test", str(tmp_path)) == (tmp_path / "my_bench", "test")
    assert resolve_task("my_bench", str(tmp_path)) == (tmp_path / "my_bench", "test")  # a folder as is
    assert resolve_task("my_bench_dev", str(tmp_path)) == (tmp_path / "my_bench", "dev")


def test_bundled_benchmark_is_complete():
    bench = load_benchmark("lathe_bench_test", str(BUNDLED), n_shot=5)
    assert sorted(s.key for s in bench.subjects) == ["animals", "arithmetic", "capitals", "colours"]
    assert len({s.category for s in bench.subjects}) == 2
    for s in bench.subjects:
        assert len(s.shots) == 5 and 10 <= len(s.questions) <= 15
        assert len({q.question for q in s.questions}) == len(s.questions)  # no duplicated question
        assert {q.answer for q in s.questions} == set(LETTERS)  # every letter is right somewhere


# --- prompts ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _subject(shots: int = 3, n: int = 3) -> Subject:
    bench = load_benchmark("lathe_bench_test", str(BUNDLED), n_shot=shots)
    s = next(s for s in bench.subjects if s.key == "capitals")
    return Subject(s.key, s.name, s.category, s.questions[:n], s.shots, s.layout)


def test_prompt_is_the_training_template_with_shots_as_turns(tokenizer):
    template = get_template("chatml")
    s = _subject(shots=2)
    q = s.questions[0]
    ids = Prompter.build(template, tokenizer, "en", 1024).prompt_ids(s, q)
    history = [(format_question(x), x.answer) for x in s.shots]
    # the same ids the template gives a two-turn chat (what training and `lathe chat` see)
    assert ids == template.encode_prompt(history, format_question(q), tokenizer, system=system_text(s))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nThe following are multiple choice questions (with answers) "
                           "about world capitals.<|im_end|>")
    first, second = s.shots
    assert f"{first.question}\nA. {first.choices[0]}\nB. " in text
    assert (f"Answer:<|im_end|>\n<|im_start|>assistant\n{first.answer}<|im_end|>\n<|im_start|>user\n"
            f"{second.question}") in text
    assert text.endswith("What is the capital of France?\nA. Lyon\nB. Paris\nC. Marseille\nD. Nice\n"
                         "Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert text.index("Portugal") < text.index("Ireland") < text.index("France")  # dev order kept


def test_chinese_wording(tokenizer):
    s = _subject(shots=0)
    text = tokenizer.decode(Prompter.build(get_template("chatml"), tokenizer, "zh", 1024).prompt_ids(s, s.questions[0]))
    assert "以下是中国关于world capitals考试的单项选择题，请选出其中的正确答案。" in text
    assert "\n答案：<|im_end|>" in text


def test_earliest_shots_are_dropped_to_fit_cutoff_len(tokenizer):
    template, s = get_template("chatml"), _subject(shots=3)
    q = s.questions[0]
    full = len(Prompter.build(template, tokenizer, "en", 4096).prompt_ids(s, q))
    p = Prompter.build(template, tokenizer, "en", full - 1)  # one token short of all three shots
    text = tokenizer.decode(p.prompt_ids(s, q))
    assert "Portugal" not in text and "Ireland" in text and "Greece" in text  # the first shot went
    assert p.stats.shots_dropped == 1 and p.stats.cut == 0
    tight = Prompter.build(template, tokenizer, "en", 20)  # not even the question fits: cut from the left
    ids = tight.prompt_ids(s, q)
    assert len(ids) == 20 and tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert tight.stats.as_dict() == {"prompts": 1, "shots_dropped": 3, "cut": 1}


def test_choice_tokens_are_how_the_template_starts_a_reply():
    from lathe.demo.build import build_tokenizer

    tokenizer = build_tokenizer(1000)  # " A" .. " D" are single tokens in this vocabulary

    def shown(ids):
        return tokenizer.convert_ids_to_tokens(ids)

    lead, ids, exact = choice_tokens(get_template("chatml"), tokenizer)
    assert lead == [] and shown(ids) == list(LETTERS) and exact
    lead, ids, exact = choice_tokens(get_template("default"), tokenizer)  # "Assistant:" then " {content}"
    assert lead == [] and shown(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"] and exact
    lead, ids, exact = choice_tokens(get_template("qwen3"), tokenizer)  # every last reply opens a think block
    assert tokenizer.decode(lead) == "<think>\n\n</think>\n\n" and shown(ids) == list(LETTERS) and exact


def test_uneven_letter_tokens_fall_back_to_bare_letters(tokenizer):
    """The tiny vocabulary has " A" as one token but " B" as two: the space joins the prompt."""
    assert [len(tokenizer.encode(" " + x, add_special_tokens=False)) for x in LETTERS] == [1, 2, 2, 2]
    lead, ids, exact = choice_tokens(get_template("default"), tokenizer)
    assert not exact and tokenizer.decode(lead) == " " and tokenizer.convert_ids_to_tokens(ids) == list(LETTERS)


# --- answers from logits ------------------------------------------------------------------

class Oracle:
    """A fake causal LM that knows each prompt's answer: its last-position logits favour it.

    It sees the prompts through left padding and in the length order batches use, so a
    perfect score also proves that picks go back to the right questions."""

    def __init__(self, answers: dict[tuple[int, ...], int], vocab: int):
        self.answers, self.vocab, self.device, self.calls = answers, vocab, "cpu", 0

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, use_cache=None):
        import torch

        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            assert mask[0] == 0 or mask.all()  # padding is on the left
            logits[row, -1, self.answers[tuple(ids[mask.bool()].tolist())]] = 1.0
        return SimpleNamespace(logits=logits)

    __call__ = forward


def test_the_letter_with_the_highest_logit_is_the_answer(tokenizer):
    s = _subject(shots=2, n=12)
    prompter = Prompter.build(get_template("chatml"), tokenizer, "en", 1024)
    ids = {q.where: prompter.prompt_ids(s, q) for q in s.questions}
    oracle = Oracle({tuple(ids[q.where]): prompter.choice_ids[LETTERS.index(q.answer)] for q in s.questions},
                    len(tokenizer))
    picks = score_subject(oracle, prompter, s, batch_size=5)
    assert picks == [q.answer for q in s.questions] and oracle.calls == 3  # one forward per batch of 5


def test_a_model_biased_to_c_scores_the_share_of_c_answers(tiny_model, tokenizer):
    """No model can score other than by the letter logits: push "C" up and every pick is C."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompter = Prompter.build(get_template("chatml"), tokenizer, "en", 256)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[prompter.choice_ids[2]] = 1e4
    model.lm_head = biased
    bench = load_benchmark("lathe_bench_test", str(BUNDLED), n_shot=1)
    picks = {s.key: score_subject(model, prompter, s, batch_size=8) for s in bench.subjects}
    results = summarize(bench, picks)
    assert results["predicted"] == {"A": 0, "B": 0, "C": bench.total, "D": 0}
    for s in bench.subjects:
        share_of_c = sum(q.answer == "C" for q in s.questions) / len(s.questions)
        assert results["subjects"][s.key]["accuracy"] == pytest.approx(share_of_c)


def test_left_padded_batch_scores_like_each_prompt_alone(tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompter = Prompter.build(get_template("chatml"), tokenizer, "en", 256)
    s = _subject(shots=3, n=4)
    prompts = [prompter.prompt_ids(Subject(s.key, s.name, s.category, [], s.shots[:k]), q)
               for k, q in zip(range(4), s.questions)]  # 0..3 shots: four different lengths
    assert len({len(p) for p in prompts}) == 4
    batched = choice_logits(model, prompts, prompter.choice_ids, tokenizer.pad_token_id)
    alone = torch.cat([choice_logits(model, [p], prompter.choice_ids, tokenizer.pad_token_id) for p in prompts])
    assert batched.shape == (4, 4)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


# --- aggregation --------------------------------------------------------------------------

def test_accuracy_per_subject_category_and_average():
    def subject(key, category, answers):
        return Subject(key, key, category, [Question(f"{key} {i}", ("a", "b", "c", "d"), a)
                                            for i, a in enumerate(answers)])

    bench = Benchmark("b", "test", Path("b"), [subject("s1", "X", "ABCD"), subject("s2", "X", "AA"),
                                                subject("s3", "Y", "DDDDDD")])
    r = summarize(bench, {"s1": list("AAAA"), "s2": list("AB"), "s3": list("DDDAAA")})
    assert r["subjects"]["s1"] == {"name": "s1", "category": "X", "accuracy": 0.25, "correct": 1, "total": 4}
    assert r["subjects"]["s2"]["accuracy"] == 0.5
    # a category and the average weigh each question alike (2/6 and 5/12), not each subject
    assert r["categories"] == {"X": {"accuracy": 2 / 6, "correct": 2, "total": 6},
                               "Y": {"accuracy": 0.5, "correct": 3, "total": 6}}
    assert r["average"] == {"accuracy": 5 / 12, "correct": 5, "total": 12}
    assert r["predicted"] == {"A": 8, "B": 1, "C": 0, "D": 3}
    table = format_table(r, per_subject=True)
    assert "Average" in table and "41.67" in table and "s3" in table
    assert "s3" not in format_table(r, per_subject=False)


# --- bad input: one line naming the file (and row), exit 2 in the CLI ----------------------

def _error(fn, *args, kind=DataError) -> str:
    with pytest.raises(kind) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_task_folder_lists_what_exists(tmp_path):
    make_mmlu(tmp_path, name="mmlu")
    msg = _error(load_benchmark, "cmmlu_test", str(tmp_path), 0)
    assert f"no benchmark folder {tmp_path / 'cmmlu'}" in msg and "holds: mmlu" in msg
    assert "does not exist" in _error(load_benchmark, "mmlu_test", str(tmp_path / "nope"), 0)


def test_missing_split_names_it_and_the_ones_there(tmp_path):
    make_mmlu(tmp_path)
    msg = _error(load_benchmark, "bench_validation", str(tmp_path), 0)
    assert "has no validation split folder (it has: dev, test)" in msg


def test_missing_dev_split_suggests_zero_shot(tmp_path):
    _write(tmp_path / "bench" / "test" / "algebra_test.csv", ROWS)
    assert "set n_shot: 0" in _error(load_benchmark, "bench_test", str(tmp_path), 3)
    assert load_benchmark("bench_test", str(tmp_path), 0).total == 3  # zero-shot needs no dev split
    _write(tmp_path / "bench" / "dev" / "other_dev.csv", DEV)
    msg = _error(load_benchmark, "bench_test", str(tmp_path), 3)
    assert "no algebra_dev.csv" in msg and "set n_shot: 0" in msg


@pytest.mark.parametrize("row,why", [
    (["Q?", "a", "b", "c", "D"], "5 columns, expected 6 (question, A, B, C, D, answer)"),
    (["  ", "a", "b", "c", "d", "A"], "the question is empty"),
    (["Q?", "a", "b", "c", "d", "E"], "answer 'E' is not one of A, B, C, D"),
    (["Q?", "a", "b", "c", "d", ""], "answer '' is not one of A, B, C, D"),
])
def test_malformed_row_names_file_and_row(tmp_path, row, why):
    make_mmlu(tmp_path, rows=ROWS[:1] + [["x?", "a", "b", "c", "d", "A"]] * 5 + [row])
    path = tmp_path / "bench" / "test" / "algebra_test.csv"
    assert _error(load_benchmark, "bench_test", str(tmp_path), 0) == f"DataError: {path} row 7: {why}"


def test_header_rows_are_checked_against_the_header(tmp_path):
    make_cmmlu(tmp_path)
    path = tmp_path / "cmmlu" / "test" / "algebra.csv"
    with open(path, "a", encoding="utf-8") as f:
        f.write("9,Q?,a,b,c\n")
    msg = _error(load_benchmark, "cmmlu_test", str(tmp_path), 0)
    assert msg == f"DataError: {path} row 5: 5 columns, expected 7 (like the header ,Question,A,B,C,D,Answer)"


def test_header_without_answers_points_at_the_val_split(tmp_path):
    _write(tmp_path / "ceval" / "test" / "law_test.csv", [["0", "Q?", "a", "b", "c", "d"]],
           ["id", "question", "A", "B", "C", "D"])
    msg = _error(load_benchmark, "ceval_test", str(tmp_path), 0)
    assert "law_test.csv row 1: the header" in msg and "task: ceval_val" in msg


def test_bad_mapping_is_one_line(tmp_path):
    make_mmlu(tmp_path)
    (tmp_path / "bench" / "mapping.json").write_text("{not json")
    assert "mapping.json: not valid JSON" in _error(load_benchmark, "bench_test", str(tmp_path), 0)


def test_save_dir_must_be_new_or_empty(tmp_path):
    assert check_save_dir(None) is None
    assert check_save_dir(str(tmp_path / "new")) == tmp_path / "new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text("{}")
    assert "already holds files (results.json)" in _error(check_save_dir, str(tmp_path / "full"), kind=OutputError)


def test_a_template_whose_replies_do_not_differ_by_letter_is_refused(tokenizer):
    from lathe.data.templates import Template

    deaf = Template(name="deaf", user="{content}\n", assistant="OK{eos}")  # every reply renders alike
    msg = _error(choice_tokens, deaf, tokenizer, kind=ModelError)
    assert "template deaf" in msg and "one distinct token per letter" in msg
