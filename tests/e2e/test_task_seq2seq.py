"""stage seq2seq end to end through the real CLI: a tiny T5 learns a word-for-word translation
(BLEU rising from near 0, scored on generations in every evaluation); BART with LoRA
predicts and exports to a plain AutoModelForSeq2SeqLM that generates the same text; a model
without a decoder and bad rows are one line."""

from __future__ import annotations

import json

from tests.conftest import as_overrides, run_cli
from tests.tiny_encoders import write_translation


def _args(model, data, run, **more) -> list[str]:
    return as_overrides({"stage": "seq2seq", "model_name_or_path": model, "dataset": "en_fr",
                         "eval_dataset": "en_fr_test", "dataset_dir": data, "output_dir": run,
                         "per_device_train_batch_size": 16, "learning_rate": 5e-3, "seed": 0,
                         "finetuning_type": "full", "max_new_tokens": 12, **more})


def test_a_tiny_t5_learns_a_mapping(tiny_t5, tmp_path):
    data = write_translation(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_t5, data, run, num_train_epochs=6, eval_strategy="steps", eval_steps=8,
                                metric_for_best_model="bleu-4", load_best_model_at_end=True,
                                save_strategy="steps", save_steps=8, save_total_limit=1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "T5ForConditionalGeneration" in r.stdout and "max_length" not in r.stderr
    log = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    bleu = [x["eval_bleu-4"] for x in log if "eval_bleu-4" in x]
    assert bleu[0] < 10 and max(bleu) >= max(20, 2.5 * bleu[0]), bleu  # generated in every evaluation
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["best_metric"] == max(bleu)  # the checkpoint was chosen by bleu-4


def test_bart_with_lora_predicts_and_exports(tiny_bart, tmp_path):
    data = write_translation(tmp_path / "data", n_train=64)
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_bart, data, run, finetuning_type="lora", max_steps=8, do_predict=True))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"source", "predict", "label", "origin"} <= set(rows[0])
    results = json.loads((run / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-l"} <= set(results)

    export = tmp_path / "export"
    r = run_cli("export", str(run), f"export_dir={export}")
    assert r.returncode == 0 and "Verification passed" in r.stdout, r.stderr[-2000:]
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        out = model.generate(**tok([x["source"] for x in rows[:4]], return_tensors="pt", padding=True,
                                   return_token_type_ids=False), max_length=13, do_sample=False, num_beams=1)
    assert [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)] == [x["predict"] for x in rows[:4]]


def test_alpaca_rows_and_refusals(tiny_t5, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "alpaca.json").write_text(json.dumps([{"instruction": "translate", "input": "red cat",
                                                    "output": "chat rouge"}] * 8))
    (data / "bad.json").write_text(json.dumps([{"source": "red", "target": "rouge"}, {"source": "cat"}]))
    (data / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "alpaca.json"},
                                                        "bad": {"file_name": "bad.json"}}))
    base = {"stage": "seq2seq", "dataset_dir": data, "max_steps": 1, "per_device_train_batch_size": 4}
    r = run_cli("train", *as_overrides({**base, "model_name_or_path": tiny_t5, "dataset": "alpaca",
                                         "output_dir": tmp_path / "ok", "source_prefix": "translate: "}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "    translate: translate\n    red cat\n    -> chat rouge" in r.stdout  # the prompt is the source

    def fails(**keys) -> str:
        r = run_cli("train", *as_overrides({**base, "output_dir": tmp_path / "no", **keys}))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists(), r.stderr
        return r.stderr

    assert "bad.json row 1: column 'target' (target) is missing" in fails(model_name_or_path=tiny_t5, dataset="bad")
    assert "stage seq2seq needs a model with a sequence-to-sequence (encoder-decoder) head, and llama has none" \
        in fails(model_name_or_path=tiny_model, dataset="alpaca")
    assert "source_prefix applies only to stage seq2seq" in \
        fails(model_name_or_path=tiny_t5, dataset="alpaca", stage="sft", source_prefix="x")
