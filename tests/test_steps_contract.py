"""Contract over the registry: every registered step runs on a tiny model and keeps its promises."""

import pytest
import torch
import yaml

from effspec.config import config_from_dict, config_to_dict
from effspec.models import fingerprint, load_model
from effspec.registry import STAGES, all_steps

STEPS = sorted(all_steps())
# fields a 2-block model needs (default n=4 blocks cannot go from 2)
TUNE_FIELDS = {"steps": 2, "seqlen": 16, "batch_size": 2, "warmup": 0}  # a few optimizer steps on the calibration rows
TINY_FIELDS = {"drop-layers": {"n": 1, "keep_first": False}, "finetune": TUNE_FIELDS, "distill": TUNE_FIELDS,
               "lora": TUNE_FIELDS}
# output SNR floors below the default 10 dB where the random tiny model, not the step, sets the loss: random
# weights have flat singular spectra (svd/asvd keep 80% of parameters but lose ~20% of the energy), and
# dropping one of two random blocks removes half the network
SNR_FLOOR_DB = {"svd": 5.0, "asvd": 5.0, "drop-layers": 4.0}


@pytest.mark.parametrize("name", STEPS)
def test_step_contract(name):
    info = all_steps()[name]
    assert info.stage in STAGES and info.summary
    cfg = info.config(**TINY_FIELDS.get(name, {}))
    # configs are frozen and round-trip through YAML
    with pytest.raises(Exception):
        cfg.bits = 1  # type: ignore[misc]
    assert config_from_dict(info.config, yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg
    loaded = load_model("tiny-llama")
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    calib = ids if info.needs_calibration else None
    with torch.no_grad():
        before = loaded.model(ids).logits
    model = info.apply(loaded.model, cfg, calib)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    # signal-to-noise of the output against the float model stays usable at default settings
    snr_db = 10 * torch.log10(before.var() / (after - before).var())
    assert snr_db > SNR_FLOOR_DB.get(name, 10.0), f"{name}: output SNR {snr_db:.1f} dB"
    # deterministic: the same step on the same model gives the same weights
    again = info.apply(load_model("tiny-llama").model, cfg, calib)
    assert fingerprint(again) == fingerprint(model)
