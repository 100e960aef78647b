"""stage embed end to end through the real CLI: a tiny BERT learns paraphrase retrieval (recall@1
rising), loads with sentence-transformers to the same vectors; a decoder with LoRA (last-token
pooling) exports to a plain AutoModel + sentence-transformers folder; scored pairs train a
cosine loss; mixed pairs are one line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import as_overrides, run_cli
from tests.tiny_encoders import pair_rows, write_pairs


def _args(model, data, run, **more) -> list[str]:
    return as_overrides({"stage": "embed", "model_name_or_path": model, "dataset": "pairs",
                         "eval_dataset": "pairs_test", "dataset_dir": data, "output_dir": run,
                         "per_device_train_batch_size": 16, "learning_rate": 3e-3, "seed": 0,
                         "finetuning_type": "full", **more})


def test_a_tiny_bert_learns_retrieval_and_loads_in_sentence_transformers(tiny_bert, tmp_path):
    data = write_pairs(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_bert, data, run, max_steps=40, eval_strategy="steps", eval_steps=2,
                                learning_rate=2e-3, do_predict=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean pooling; contrastive loss, in-batch negatives" in r.stdout
    assert "[transformers]" not in r.stderr
    log = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    recall = [x["eval_recall@1"] for x in log if "eval_recall@1" in x]
    assert recall[0] < 0.5 and recall[-1] >= 0.8, recall  # 32 candidates: chance is 1/32
    rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and rows[0]["top"][0]["similarity"] >= rows[0]["top"][1]["similarity"]

    st = pytest.importorskip("sentence_transformers")
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [pair_rows(1, 7)[0]["anchor"], pair_rows(1, 7)[0]["positive"]]
    theirs = st.SentenceTransformer(str(run), device="cpu").encode(texts, convert_to_tensor=True)
    tok, model = AutoTokenizer.from_pretrained(run), AutoModel.from_pretrained(run).eval()
    x = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**x).last_hidden_state
    mask = x["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose((hidden * mask).sum(1) / mask.sum(1), theirs, atol=1e-5)


def test_a_decoder_embeds_with_lora_and_exports(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "data", n_train=64, n_test=16)
    run = tmp_path / "run"
    r = run_cli("train", *_args(tiny_model, data, run, finetuning_type="lora", max_steps=6))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlamaModel + LORA adapter" in r.stdout and "last pooling" in r.stdout
    export = tmp_path / "export"
    r = run_cli("export", str(run), f"export_dir={export}")
    assert r.returncode == 0 and "Verification passed" in r.stdout, r.stderr[-2000:]
    pooling = json.loads((export / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True
    r = run_cli("predict", str(export), "eval_dataset=pairs_test", f"dataset_dir={data}")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((export / "predict" / "predict_results.json").read_text())
    assert again["predict_mrr"] == pytest.approx(json.loads((run / "eval_results.json").read_text())["eval_mrr"],
                                                 abs=1e-5)


def test_scored_pairs_and_mixed_pairs(tiny_bert, tmp_path):
    data = write_pairs(tmp_path / "data", n_train=32, n_test=8)
    scored = [{"anchor": r["anchor"], "positive": r["positive"], "score": 1.0 if i % 2 else 0.2}
              for i, r in enumerate(pair_rows(32, 3))]
    (data / "scored.json").write_text(json.dumps(scored))
    (data / "mixed.json").write_text(json.dumps(scored[:2] + [{"anchor": "a b", "positive": "b a"}]))
    info = json.loads((data / "dataset_info.json").read_text())
    info.update(scored={"file_name": "scored.json"}, mixed={"file_name": "mixed.json"})
    (data / "dataset_info.json").write_text(json.dumps(info))
    r = run_cli("train", *_args(tiny_bert, data, tmp_path / "run", dataset="scored", eval_dataset="scored",
                                max_steps=4))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cosine loss against the scores" in r.stdout
    assert "eval_spearman" in json.loads((tmp_path / "run" / "eval_results.json").read_text())
    r = run_cli("train", *_args(tiny_bert, data, tmp_path / "no", dataset="mixed", eval_dataset=None, max_steps=1))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "mixed.json row 2 has no score but" in r.stderr and "mixed.json row 0 has one" in r.stderr
