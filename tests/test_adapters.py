"""shared.adapters: the merge both sides agree on equals PEFT's own merge; bad adapters are named."""

import pytest
import torch

from shared import adapters
from shared.messages import LoraSpec


@pytest.fixture(scope="module")
def peft_student(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.tiny import build_model

    path = build_model(tmp_path_factory.mktemp("m") / "student", num_layers=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # B starts at zero; make the adapter do something
    return path, peft_model


def _spec(peft_model) -> LoraSpec:
    c = peft_model.peft_config["default"]
    return LoraSpec(r=c.r, lora_alpha=c.lora_alpha, target_modules=sorted(c.target_modules))


def test_merge_equals_peft_merge(peft_student):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    path, peft_model = peft_student
    blob = adapters.pack(get_peft_model_state_dict(peft_model))
    pairs = adapters.lora_pairs(adapters.unpack(blob))
    base = load_file(str(path / "model.safetensors"))
    spec = _spec(peft_model)
    adapters.validate_pairs(pairs, {k: tuple(v.shape) for k, v in base.items()}, spec, max_rank=64)
    ours = adapters.merge_lora(base, pairs, adapters.scale_of(spec), torch.float32)

    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert len(ours) == 7 * 2  # q k v o gate up down, two layers
    for name, w in ours.items():
        torch.testing.assert_close(w, merged[name], rtol=0, atol=1e-6)
        assert not torch.equal(w, base[name])


def test_bad_adapters_are_named(peft_student):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    path, peft_model = peft_student
    sd = get_peft_model_state_dict(peft_model)
    base_shapes = {k: tuple(v.shape) for k, v in load_file(str(path / "model.safetensors")).items()}
    spec = _spec(peft_model)

    with pytest.raises(adapters.AdapterError, match="max_lora_rank"):
        adapters.validate_pairs(adapters.lora_pairs(sd), base_shapes, spec, max_rank=2)

    wrong = dict(sd)
    key = next(k for k in wrong if "q_proj.lora_A" in k)
    wrong[key] = torch.zeros(4, 7)
    with pytest.raises(adapters.AdapterError, match="expected A"):
        adapters.validate_pairs(adapters.lora_pairs(wrong), base_shapes, spec, max_rank=64)

    unknown = {k.replace("q_proj", "nope_proj"): v for k, v in sd.items()}
    with pytest.raises(adapters.AdapterError, match="does not have"):
        adapters.validate_pairs(adapters.lora_pairs(unknown), base_shapes, spec, max_rank=64)

    half = {k: v for k, v in sd.items() if "lora_B" not in k}
    with pytest.raises(adapters.AdapterError, match="lacks lora_B"):
        adapters.lora_pairs(half)

    with pytest.raises(adapters.AdapterError, match="not valid safetensors"):
        adapters.unpack(b"\x80\x04garbage")
