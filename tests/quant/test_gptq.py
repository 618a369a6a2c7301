"""GPTQ: on the inputs a layer really sees, its int4 codes reproduce the layer's outputs better than rounding each
weight to nearest, in the very same storage format."""

from __future__ import annotations

import pytest
import torch
from model_zoo import random_model, tiny_config

from camelid.quant import Int4Linear, quantize_model, select_linears
from camelid.quantize import quantize_folder
from camelid.quant.gptq import gptq_quantizer, input_hessians

CONFIG = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def output_error(weight: torch.Tensor, layer: Int4Linear, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the mean squared change of the layer's outputs on the calibration inputs."""
    delta = weight - layer.dequantize(torch.float32)
    return torch.einsum("oi,ij,oj->", delta, hessian, delta).item()


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_round_to_nearest_on_every_layer(group_size):
    model = random_model(tiny_config(**CONFIG))
    ids = torch.randint(0, 128, (8 * 64,), generator=torch.Generator().manual_seed(0))
    names = list(select_linears(model))
    hessians = input_hessians(model, ids, 64, names)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    rtn = {n: Int4Linear.from_linear(model.get_submodule(n), group_size=group_size) for n in names}
    quantize_model(model, "int4", group_size=group_size, quantizer=gptq_quantizer(model, ids, 64, group_size))
    for n in names:
        gptq_err = output_error(weights[n], model.get_submodule(n), hessians[n])
        rtn_err = output_error(weights[n], rtn[n], hessians[n])
        assert gptq_err < 0.9 * rtn_err, (n, gptq_err, rtn_err)


def test_gptq_folder_within_the_int4_bound(trained_model, tmp_path):
    report = quantize_folder(trained_model.folder, tmp_path / "gptq", "int4", eval_text=trained_model.heldout,
                             eval_tokens=8192, calibration=trained_model.heldout.parent / "in" / "train.txt",
                             calibration_tokens=4096)
    print("\n".join(report.lines()))
    assert report.ppl_after <= report.ppl_before * 1.05
