"""`calibration_dtype: bfloat16`: the layer-wise steps' calibration forwards run under bf16 autocast; the Hessians
of their (bf16-rounded) inputs are still float32 sums of float32 products, so they stay positive semi-definite."""

import pytest
import torch

from effspec.config import ConfigError
from effspec.layerwise import solve_layerwise
from effspec.models import load_model
from effspec.registry import get_step
from effspec.surgery import linear_layers

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def hessians(dtype: str, diagonal: bool = False) -> dict[str, torch.Tensor]:
    model = load_model("tiny-llama").model
    targets = {n: model.get_submodule(n) for n in linear_layers(model, ("*",), ("lm_head",))}
    seen: dict[str, torch.Tensor] = {}

    def record(block, names, H):
        seen[f"{id(block)}.{names[0]}"] = H.clone()

    solve_layerwise(model, CALIB, targets, record, True, dtype, diagonal=diagonal)
    return seen


@pytest.mark.parametrize("diagonal", [False, True])
def test_bfloat16_hessians_are_close_to_float32_and_positive_semidefinite(diagonal):
    exact, fast = hessians("float32", diagonal), hessians("bfloat16", diagonal)
    assert len(exact) == len(fast) == 8  # 2 blocks x (q/k/v, o, gate/up, down)
    differ = 0
    for (name, H), F in zip(exact.items(), fast.values()):
        assert H.dtype == F.dtype == torch.float32
        if not diagonal:
            assert torch.linalg.eigvalsh(F.double()).min() > -1e-6 * F.diagonal().mean(), name
        differ += not torch.equal(H, F)
        rel = (H - F).norm() / H.norm()
        assert rel < 0.05, (name, rel.item())  # bf16 keeps 8 significant bits of every input
    # it did run in bf16: every input differs except block 0's first (a norm of the embeddings, before any matmul)
    assert differ == len(exact) - 1


@pytest.mark.parametrize("step,fields", [("gptq", {"bits": 3, "group_size": 32}), ("sparsegpt", {"sparsity": 0.5}),
                                         ("wanda", {"sparsity": 0.5}), ("wanda", {"sparsity": 0.5, "allocation": "owl"})])
def test_bfloat16_calibration_stays_close_to_float32(step, fields):
    """The compressed model from bf16 calibration is about as far from the float model as float32 calibration's."""
    info = get_step(step)
    reference = load_model("tiny-llama").model
    with torch.no_grad():
        base = reference(CALIB).logits
    error = {}
    for dtype in ("float32", "bfloat16"):
        model = info.apply(load_model("tiny-llama").model, info.config(**fields, calibration_dtype=dtype), CALIB)
        with torch.no_grad():
            error[dtype] = (model(CALIB).logits - base).pow(2).mean().item()
    assert error["bfloat16"] < 1.5 * error["float32"] + 1e-6, error


@pytest.mark.parametrize("step", ["gptq", "sparsegpt", "wanda"])
def test_unknown_calibration_dtype_is_a_config_error(step):
    with pytest.raises(ConfigError, match="calibration_dtype"):
        get_step(step).config(calibration_dtype="float16")
