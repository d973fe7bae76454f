"""PEFT adapter files: one scaling rule for every reader, equal to PEFT's own."""

import json

import pytest
import torch

from emis_interp.adapters import lora_scaling, read_adapter
from emis_interp.models import load_model


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scaling_is_pefts_rule(tiny_dir, tmp_path, rslora):
    """Every module's scaling equals the live PEFT layer's, with rank and alpha patterns and rsLoRA. The pattern key
    ``"down"`` is a substring of ``down_proj`` but not a dotted suffix: PEFT does not apply it (a ``re.search`` rule
    did), while ``"mlp.up_proj"`` and ``"o_proj"`` apply; ``read_adapter`` (used by the weight dynamics and the LoRA
    bank) gives the same numbers from the saved checkpoint."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(tiny_dir)
    cfg = LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 4},
        alpha_pattern={"down": 16, "mlp.up_proj": 5},
        use_rslora=rslora,
    )
    peft = get_peft_model(model, cfg)
    for module in peft.base_model.model.modules():  # a non-zero B, so the saved adapter is a real one
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    live = {
        name.removeprefix("base_model.model."): m.scaling["default"]
        for name, m in peft.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }
    saved = json.loads(json.dumps(cfg.to_dict(), default=list))
    assert live and all(lora_scaling(saved, name) == pytest.approx(s) for name, s in live.items())
    assert {round(s, 6) for s in live.values()} == (
        {round(v, 6) for v in (3 / 2**0.5, 3 / 2, 5 / 2**0.5)} if rslora else {1.5, 0.75, 2.5}
    )
    peft.save_pretrained(tmp_path / "ckpt")
    read = {m: s for m, (_, _, s) in read_adapter(tmp_path / "ckpt").items()}
    assert set(read) == set(live) and all(read[m] == pytest.approx(s) for m, s in live.items())
