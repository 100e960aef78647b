"""`lathe api` on task models: /v1/embeddings for an embedding run (through the official
client) and /v1/classify for a classifier, each checked against the model loaded with plain
transformers; a route for another kind of model is a 400 that says which kind it serves."""

from __future__ import annotations

import json

import pytest

from tests.conftest import as_overrides, run_cli
from tests.e2e.test_api_server import httpx, start, stop
from tests.tiny_encoders import pair_rows, sentiment_rows, write_pairs

openai = pytest.importorskip("openai")


def test_embeddings_of_an_embedding_run(tiny_bert, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    data = write_pairs(tmp_path / "data")
    run = tmp_path / "embed"
    r = run_cli("train", *as_overrides({"stage": "embed", "model_name_or_path": tiny_bert, "dataset": "pairs",
                                        "dataset_dir": data, "output_dir": run, "per_device_train_batch_size": 16,
                                        "learning_rate": 2e-3, "max_steps": 4, "finetuning_type": "full",
                                        "seed": 0}))
    assert r.returncode == 0, r.stderr[-2000:]
    proc, url = start(str(run), tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        texts = [pair_rows(2, 7)[0]["anchor"], pair_rows(2, 7)[1]["positive"]]
        got = client.embeddings.create(model="lathe", input=texts)
        assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 4
        ours = torch.tensor([d.embedding for d in got.data])

        tok, model = AutoTokenizer.from_pretrained(run), AutoModel.from_pretrained(run).eval()
        x = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**x).last_hidden_state
        mask = x["attention_mask"].unsqueeze(-1).float()
        theirs = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        assert torch.allclose(ours, theirs, atol=1e-5)  # mean pooling, unit length

        import base64

        import numpy as np

        b64 = client.embeddings.create(model="lathe", input=texts[0], encoding_format="base64")
        raw = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
        assert torch.allclose(torch.from_numpy(raw.copy()), ours[0], atol=1e-6)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="lathe", messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "unsupported_model"
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="lathe", input=[""])
    finally:
        stop(proc)


def test_classify_with_a_classifier_run(tiny_bert, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "data"
    data.mkdir()
    (data / "sentiment.json").write_text(json.dumps(sentiment_rows(64)))
    (data / "dataset_info.json").write_text(json.dumps({"sentiment": {"file_name": "sentiment.json"}}))
    run = tmp_path / "cls"
    r = run_cli("train", *as_overrides({"stage": "cls", "model_name_or_path": tiny_bert, "dataset": "sentiment",
                                        "dataset_dir": data, "output_dir": run, "per_device_train_batch_size": 16,
                                        "learning_rate": 5e-3, "max_steps": 8, "finetuning_type": "full",
                                        "seed": 0}))
    assert r.returncode == 0, r.stderr[-2000:]
    proc, url = start(str(run), tmp_path / "server.log", "api_key=k")
    try:
        texts = ["this film was great", "my phone is broken"]
        got = httpx.post(url + "/v1/classify", json={"model": "lathe", "input": texts},
                         headers={"Authorization": "Bearer k"}, timeout=60)
        assert got.status_code == 200, got.text
        rows = got.json()["data"]
        tok = AutoTokenizer.from_pretrained(run)
        model = AutoModelForSequenceClassification.from_pretrained(run).eval()
        with torch.no_grad():
            probs = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
        for row, p in zip(rows, probs):
            names = [model.config.id2label[i] for i in range(len(p))]
            assert row["label"] == names[int(p.argmax())]
            assert [row["probabilities"][n] for n in names] == pytest.approx(p.tolist(), abs=1e-5)
        assert httpx.post(url + "/v1/classify", json={"model": "lathe", "input": texts}).status_code == 401
        wrong = httpx.post(url + "/v1/embeddings", json={"model": "lathe", "input": "x"},
                           headers={"Authorization": "Bearer k"})
        assert wrong.status_code == 400 and "classifiers" not in wrong.json()["error"]["message"]
        assert "seq_cls" in wrong.json()["error"]["message"]
    finally:
        stop(proc)


def test_score_with_a_reward_model(tiny_model, tmp_path):
    """An rm LoRA run (scored at each conversation's last token): the served scores are the ones
    `lathe.model.reward` computes in process, and the preferred reply scores higher."""
    import torch
    from transformers import AutoTokenizer

    from lathe.data.templates import get_template
    from lathe.infer.messages import scored_conversation
    from lathe.model.reward import load_reward_model, reward_scores
    from tests.conftest import write_pref_pairs

    data = write_pref_pairs(tmp_path / "data")
    run = tmp_path / "rm"
    r = run_cli("train", *as_overrides({"stage": "rm", "model_name_or_path": tiny_model, "dataset": "pairs",
                                        "dataset_dir": data, "template": "chatml", "cutoff_len": 64,
                                        "per_device_train_batch_size": 8, "max_steps": 10, "learning_rate": 1e-2,
                                        "output_dir": run, "seed": 0, "save_steps": 1000}))
    assert r.returncode == 0, r.stderr[-2000:]
    ask = {"role": "user", "content": "Say something nice about tea."}
    convs = [[ask, {"role": "assistant", "content": "It is lovely."}], [ask, {"role": "assistant", "content": "No."}]]
    proc, url = start(str(run), tmp_path / "server.log")
    try:
        got = httpx.post(url + "/v1/score", json={"model": "lathe", "conversations": convs}, timeout=60)
        assert got.status_code == 200, got.text
        served = [row["score"] for row in got.json()["data"]]
        bad = httpx.post(url + "/v1/score", json={"model": "lathe", "messages": [ask]}, timeout=60)
        assert bad.status_code == 400 and "assistant's reply" in bad.json()["error"]["message"]
    finally:
        stop(proc)
    tok = AutoTokenizer.from_pretrained(run)
    model = load_reward_model(str(run), torch.float32, tok)
    template = get_template("chatml")
    for conv, value in zip(convs, served):
        ids = [t for p, rep in template.encode_turns(scored_conversation(conv), tok) for t in p + rep]
        x = torch.tensor([ids])
        with torch.no_grad():
            assert reward_scores(model, x, torch.ones_like(x)).item() == pytest.approx(value, abs=1e-4)
    assert served[0] > served[1]
