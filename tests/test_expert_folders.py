"""Every format's expert folder holds a config that is true of it: nothing inherited from a quantized GGUF source
(its ``quantization_config``, its name as the expert's own), shapes that match the saved tensors, its modeling
code and tokenizer beside it; pruning.json names the source instead."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import cusprun
from cusprun.prune import main as prune_main

pytest.importorskip("gguf")

FORMATS = ("dense", "sliced", "masked", "stock")


@pytest.fixture(scope="module")
def smollm2_scores(tmp_path_factory):
    """Local-measure score files of the embedded default (a Q4_1 GGUF) on two short corpora."""
    from cusprun.core.models import load_model

    root = tmp_path_factory.mktemp("smollm2")
    model, tokenizer, _ = load_model("smollm2-135m", quiet=True)
    assert model.config.quantization_config is not None  # the case under test: a quantized source
    texts = {"de": ["Der schnelle braune Fuchs springt über den faulen Hund.", "Ein Gesetz regelt die Haftung."],
             "med": ["Patients received metformin for twelve weeks.", "The trial measured blood pressure."]}
    paths = []
    for name, docs in texts.items():
        ids = [tokenizer(t)["input_ids"] for t in docs]
        scores = cusprun.score(model, ids, corpus=name, measure="local", progress=False)
        paths.append(scores.save(root / f"{name}.safetensors"))
    return root, paths


def saved_tensors(folder):
    shapes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_config_is_true_of_the_folder(smollm2_scores, tmp_path, fmt):
    root, paths = smollm2_scores
    out = tmp_path / fmt
    extra = ["--neurons", "all"] if fmt == "stock" else []
    args = ["--model", "smollm2-135m", *[a for p in paths for a in ("--scores", str(p))], "--ratio", "0.2",
            "--format", fmt, "--out", str(out), "--quiet", "--no-compensate", *extra]
    assert prune_main(args) == 0
    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw, "the expert is plain floats; the source's GGUF file is not here"
    assert "_model_name_or_path" not in raw and not raw.get("_name_or_path")
    report = json.loads((out / "pruning.json").read_text())
    assert report["model"] == "smollm2-135m"
    assert report["source"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # the file names the source; transformers' "loaded from GGUF" marker is not recorded (a streamed prune reads
    # the file without transformers' loader and must record the same source)
    assert report["source"]["quantization_config"] is None
    for name in raw.get("auto_map", {}).values():
        assert (out / f"{name.split('.')[0]}.py").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    # the config's shapes are the saved tensors' shapes: every tensor is used, none missing, none resized
    config = AutoConfig.from_pretrained(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert getattr(config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    held = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = saved_tensors(out)
    assert {k: held[k] for k in saved} == saved
    assert sum(torch.Size(s).numel() for s in saved.values()) > 0
