"""A pruned model through the real lm-evaluation-harness CLI, on the shipped offline task definitions."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("lm_eval")

from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the model of the german legal text is pruned", "a neuron in a layer of the expert is a row or a column"]


def cli(module, *args, **kw):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    tiny_model("llama", seed=7, layers=2).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": t * 2}) + "\n" for t in TEXTS))
    assert cli("cusprun.score", "--model", root / "model", "--corpus", f"c={root / 'calib.jsonl'}", "--out",
               root / "scores", "--quiet").returncode == 0
    res = cli("cusprun.prune", "--model", root / "model", "--scores", root / "scores/c.safetensors", "--ratio", "0.2",
              "--out", root / "expert", "--quiet")
    assert res.returncode == 0, res.stderr
    return root / "expert"


def rolling_loglikelihood(model, tokenizer, text):
    """What lm-eval's loglikelihood_rolling scores: every token of the text, the first after the BOS token."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return logp.gather(1, ids[0, 1:, None]).sum().item()


def test_lm_eval_runs_shipped_and_tiny_tasks_on_a_pruned_model(expert, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shipped = ROOT / "lm_eval_tasks" / "cusprun_heldout_de.yaml"
    shutil.copy(shipped, tasks)
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tasks / "tiny.yaml").write_text(shipped.read_text().replace("task: cusprun_heldout_de", "task: cusprun_tiny")
                                     .replace("data/heldout/de.jsonl", str(tmp_path / "tiny.jsonl")))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    res = subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={expert},trust_remote_code=True",
                          "--include_path", str(tasks), "--tasks", "cusprun_heldout_de,cusprun_tiny", "--limit", "2",
                          "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert math.isfinite(results["cusprun_heldout_de"]["word_perplexity,none"])
    model = AutoModelForCausalLM.from_pretrained(expert, trust_remote_code=True).eval()
    tokenizer = tiny_tokenizer()
    ll = sum(rolling_loglikelihood(model, tokenizer, t) for t in TEXTS)
    words = sum(len(t.split()) for t in TEXTS)
    assert results["cusprun_tiny"]["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
