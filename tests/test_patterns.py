"""foldkit's module-name matching agrees with the installed PEFT's own functions."""

from types import SimpleNamespace

import pytest
from peft import LoraConfig
from peft.tuners.ia3.model import IA3Model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from foldkit.patterns import is_feedforward, matches_module_list, pattern_value

NAMES = [
    "model.layers.0.self_attn.k_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.gate_proj",
    "lm_head",
    "transformer.h.0.attn.c_attn",
    "xk_proj",
]
TARGETS = [["k_proj", "down_proj"], r".*\.(v_proj|gate_proj)", ["lm_head"], ["c_attn"], r".*mlp\..*"]


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("name", NAMES)
def test_target_matching_agrees_with_peft(name, targets):
    config = LoraConfig(target_modules=targets)

    assert matches_module_list(name, targets) == bool(check_target_module_exists(config, name))


FEEDFORWARD = [["down_proj"], ["proj"], r".*\.down_proj", r"down_proj"]


@pytest.mark.parametrize("feedforward", FEEDFORWARD)
@pytest.mark.parametrize("name", NAMES)
def test_feedforward_agrees_with_peft(name, feedforward):
    # IA3Config would reject feedforward entries outside target_modules; PEFT's check reads only this field.
    config = SimpleNamespace(feedforward_modules=feedforward)
    expected = IA3Model._check_target_module_feedforward(config, name)

    assert is_feedforward(name, feedforward) == expected


PATTERNS = [
    {"k_proj": 4, "layers.1.mlp.down_proj": 8},
    {r"layers\.1\..*": 2, "down_proj": 16},
    {"down_proj": 16, r"layers\.1\..*": 2},
    {"proj": 3},
]


@pytest.mark.parametrize("patterns", PATTERNS)
@pytest.mark.parametrize("name", NAMES)
def test_pattern_value_agrees_with_peft(name, patterns):
    key = get_pattern_key(list(patterns), name)
    expected = patterns.get(key, 99)

    assert pattern_value(name, patterns, 99) == expected


def test_pattern_value_first_key_wins():
    patterns = {"down_proj": 16, r"layers\.1\..*": 2}

    assert pattern_value("model.layers.1.mlp.down_proj", patterns, 8) == 16
