"""Fold rules on small integer matrices that can be checked by hand, and their invariants."""

import pytest
import torch

from foldkit.adapter import ModuleAdapter
from foldkit.fold import FOLD_RULES, fold_ia3, fold_lora

# W is (out_features=2, in_features=3): non-square, so a transposed rule cannot pass by accident.
W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
B = torch.tensor([1.0, -1.0])


def test_ia3_output_scaling_by_hand():
    weight, bias = fold_ia3(W, torch.tensor([[2.0], [3.0]]), feedforward=False, bias=B)

    assert torch.equal(weight, torch.tensor([[2.0, 4.0, 6.0], [12.0, 15.0, 18.0]]))
    assert torch.equal(bias, torch.tensor([2.0, -3.0]))


def test_ia3_input_scaling_by_hand():
    weight, bias = fold_ia3(W, torch.tensor([[1.0, 2.0, 3.0]]), feedforward=True, bias=B)

    assert torch.equal(weight, torch.tensor([[1.0, 4.0, 9.0], [4.0, 10.0, 18.0]]))
    assert torch.equal(bias, B)


def test_lora_by_hand():
    lora_A = torch.tensor([[1.0, 0.0, 1.0]])  # (r=1, in=3)
    lora_B = torch.tensor([[1.0], [2.0]])  # (out=2, r=1)

    weight, bias = fold_lora(W, lora_A, lora_B, 2.0, bias=B, lora_B_bias=torch.tensor([1.0, 1.0]))

    assert torch.equal(weight, torch.tensor([[3.0, 2.0, 5.0], [8.0, 5.0, 10.0]]))
    assert torch.equal(bias, torch.tensor([3.0, 1.0]))


def test_lora_bias_without_base_bias():
    _, bias = fold_lora(W, torch.ones(1, 3), torch.ones(2, 1), 0.5, lora_B_bias=torch.tensor([2.0, 4.0]))

    assert torch.equal(bias, torch.tensor([1.0, 2.0]))


def test_conv1d_layout_is_transposed():
    lora_A, lora_B = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0], [2.0]])
    linear_lora, _ = fold_lora(W, lora_A, lora_B, 2.0)
    conv_lora, _ = fold_lora(W.T, lora_A, lora_B, 2.0, fan_in_fan_out=True)
    assert torch.equal(conv_lora, linear_lora.T)

    for feedforward, ia3_l in ((False, torch.tensor([[2.0], [3.0]])), (True, torch.tensor([[1.0, 2.0, 3.0]]))):
        linear_ia3, _ = fold_ia3(W, ia3_l, feedforward=feedforward)
        conv_ia3, _ = fold_ia3(W.T, ia3_l, feedforward=feedforward, fan_in_fan_out=True)
        assert torch.equal(conv_ia3, linear_ia3.T)


def test_rules_leave_inputs_unchanged():
    weight, bias = W.clone(), B.clone()
    ia3_l, lora_A, lora_B = torch.tensor([[2.0], [3.0]]), torch.ones(1, 3), torch.ones(2, 1)

    fold_ia3(weight, ia3_l, feedforward=False, bias=bias)
    fold_lora(weight, lora_A, lora_B, 3.0, bias=bias)

    assert torch.equal(weight, W)
    assert torch.equal(bias, B)
    assert torch.equal(ia3_l, torch.tensor([[2.0], [3.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rules_compute_in_float32(dtype):
    weight, bias = fold_lora(W.to(dtype), torch.ones(1, 3, dtype=dtype), torch.ones(2, 1, dtype=dtype), 0.1,
                             bias=B.to(dtype))

    assert weight.dtype == torch.float32
    assert bias.dtype == torch.float32


def test_rules_keep_float64():
    weight, _ = fold_ia3(W.double(), torch.tensor([[2.0], [3.0]]), feedforward=False)

    assert weight.dtype == torch.float64


def test_lora_fold_is_exact_where_bfloat16_would_round():
    # 256 + 1 is not representable in bfloat16; folding in float32 keeps it until the final cast.
    weight = torch.full((1, 1), 256.0, dtype=torch.bfloat16)

    folded, _ = fold_lora(weight, torch.ones(1, 1, dtype=torch.bfloat16), torch.ones(1, 1, dtype=torch.bfloat16), 1.0)

    assert folded.item() == 257.0


def test_registry_has_one_rule_per_kind():
    assert set(FOLD_RULES) == {"lora", "ia3"}


def test_registry_rules_match_functions():
    ia3 = ModuleAdapter("m", "ia3", {"ia3_l": torch.tensor([[1.0, 2.0, 3.0]])}, feedforward=True)
    lora = ModuleAdapter("m", "lora", {"lora_A": torch.ones(1, 3), "lora_B": torch.ones(2, 1)}, scaling=2.0)

    ia3_weight, _ = FOLD_RULES["ia3"](W, B, ia3, False)
    lora_weight, _ = FOLD_RULES["lora"](W, B, lora, False)

    assert torch.equal(ia3_weight, fold_ia3(W, ia3.tensors["ia3_l"], feedforward=True)[0])
    assert torch.equal(lora_weight, W + 2.0)
