"""QLoRA wiring: the config reaches ``from_pretrained`` as a BitsAndBytesConfig (4-bit loading
itself needs CUDA and bitsandbytes, so it is not run here)."""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dpo_lightning.models.loading import load_causal_lm
from tests.conftest import compose, make_tiny_model


def test_qlora_experiment_composes_adapter_reference_and_4bit(tmp_path):
    cfg = compose(["experiment=qlora", "model=hf", "model.name_or_path=some/model"], tmp_path)
    assert cfg.reference._target_.endswith("AdapterReference") and cfg.model.lora.r == 8
    assert cfg.model.quantization.load_in_4bit and cfg.model.quantization.bnb_4bit_quant_type == "nf4"


def test_quantization_reaches_from_pretrained(tokenizer, monkeypatch):
    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        return make_tiny_model(len(tokenizer))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    load_causal_lm("some/model", quantization=quant)
    config = seen["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
    seen.clear()
    load_causal_lm("some/model")
    assert "quantization_config" not in seen
