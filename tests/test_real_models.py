"""Merges of real models shipped by PyPI packages: SmolLM2-135M-Instruct and all-MiniLM-L6-v2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from foldkit.merge import MergeOptions, merge
from foldkit.tolerances import TOLERANCES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import minilm_directory, prepare_smollm2  # noqa: E402

pytestmark = pytest.mark.real_model

FP32 = TOLERANCES[torch.float32]


@pytest.fixture(scope="module")
def smollm2():
    return prepare_smollm2()


def make_adapter(base: Path, model_class, config, out: Path) -> None:
    torch.manual_seed(0)
    model = model_class.from_pretrained(str(base), dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(str(out))


def peft_merged(base: Path, model_class, adapter: Path):
    from peft import PeftModel

    model = model_class.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def peft_unmerged(base: Path, model_class, adapter: Path):
    from peft import PeftModel

    model = model_class.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def outputs(model, input_ids):
    with torch.no_grad():
        result = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state


def assert_weights_match_peft(merged_dir: Path, reference_model, dtype: torch.dtype, rtol: float):
    merged = load_file(str(merged_dir / "model.safetensors"))
    # Non-persistent buffers (BERT's position_ids) may be in the checkpoint but not in the state dict.
    for name, expected in reference_model.state_dict().items():
        if name == "lm_head.weight" and name not in merged:
            continue  # tied to the input embedding, which is compared under its own name
        tensor = merged[name]
        assert tensor.dtype == dtype or not tensor.is_floating_point(), name
        torch.testing.assert_close(tensor.float(), expected.to(dtype).float(), rtol=rtol, atol=1e-6,
                                   msg=lambda message: f"{name}: {message}")


SMOLLM2_ADAPTERS = {
    "lora_all_linear": LoraConfig(r=8, lora_alpha=24, target_modules="all-linear", init_lora_weights=False),
    "ia3_kv_down": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
}


@pytest.mark.parametrize("adapter_name", sorted(SMOLLM2_ADAPTERS))
def test_smollm2_merge_matches_peft(tmp_path, smollm2, adapter_name):
    adapter = tmp_path / "adapter"
    make_adapter(smollm2, AutoModelForCausalLM, SMOLLM2_ADAPTERS[adapter_name], adapter)
    merged_bf16, merged_fp32 = tmp_path / "merged", tmp_path / "merged-fp32"

    report = merge(smollm2, adapter, merged_bf16, MergeOptions(progress=False))
    report_fp32 = merge(smollm2, adapter, merged_fp32, MergeOptions(dtype="float32", progress=False, verify="modules"))

    assert report.status == "PASSED"
    assert report.verification["logits"]["passed"]
    assert report.verification["modules"]["passed"]
    assert report_fp32.status == "PASSED"

    reference = peft_merged(smollm2, AutoModelForCausalLM, adapter)
    assert_weights_match_peft(merged_fp32, reference, torch.float32, rtol=1e-6)
    # One rounding of the same float32 sum, computed in another order, may land one bfloat16 step apart.
    assert_weights_match_peft(merged_bf16, reference, torch.bfloat16, rtol=2 ** -7)

    input_ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged_fp32), dtype=torch.float32).eval()
    expected = outputs(reference, input_ids)
    actual = outputs(merged_model, input_ids)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= FP32.atol + FP32.rtol * scale

    base_model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    assert (outputs(base_model, input_ids) - actual).abs().max().item() > 0.1 * scale


def test_smollm2_merged_dir_loads_alone(tmp_path, smollm2):
    adapter = tmp_path / "adapter"
    make_adapter(smollm2, AutoModelForCausalLM, SMOLLM2_ADAPTERS["ia3_kv_down"], adapter)
    merged = tmp_path / "merged"
    merge(smollm2, adapter, merged, MergeOptions(progress=False, verify="modules"))

    base_tensors = load_file(str(smollm2 / "model.safetensors"))
    merged_tensors = load_file(str(merged / "model.safetensors"))
    assert merged_tensors.keys() == base_tensors.keys()
    for name, tensor in merged_tensors.items():
        assert tensor.shape == base_tensors[name].shape, name
        assert tensor.dtype == base_tensors[name].dtype, name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "foldkit_report.json"):
        assert (merged / name).is_file(), name
    assert json.loads((merged / "config.json").read_text()) == json.loads((smollm2 / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert model.dtype == torch.bfloat16
    assert not any("ia3" in name or "lora" in name for name, _ in model.named_parameters())


def test_smollm2_merged_loads_without_peft(tmp_path, smollm2):
    adapter = tmp_path / "adapter"
    make_adapter(smollm2, AutoModelForCausalLM, SMOLLM2_ADAPTERS["lora_all_linear"], adapter)
    merged = tmp_path / "merged"
    merge(smollm2, adapter, merged, MergeOptions(progress=False, verify="modules"))
    # A fresh interpreter that makes `import peft` fail: loading and running the merged model must not need it.
    script = (
        "import sys, importlib.abc, importlib.util\n"
        "class Blocked(importlib.abc.Loader):\n"
        "    def create_module(self, spec):\n"
        "        return None\n"
        "    def exec_module(self, module):\n"
        "        raise ImportError('peft is blocked in this test')\n"
        "class NoPeft(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'peft' or name.startswith('peft.'):\n"
        "            return importlib.util.spec_from_loader(name, Blocked())\n"
        "sys.meta_path.insert(0, NoPeft())\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        "logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits\n"
        "assert torch.isfinite(logits).all()\n"
        "assert 'peft' not in sys.modules\n"
        "print('loaded without peft')\n"
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded without peft" in result.stdout


MINILM_ADAPTERS = {
    "lora_bias": LoraConfig(r=4, lora_alpha=10, target_modules=["query", "key", "value", "dense"],
                            init_lora_weights=False, lora_bias=True),
    "ia3": IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                     init_ia3_weights=False),
}


@pytest.mark.parametrize("adapter_name", sorted(MINILM_ADAPTERS))
def test_minilm_merge_matches_peft(tmp_path, adapter_name):
    base = minilm_directory()
    adapter = tmp_path / "adapter"
    make_adapter(base, AutoModel, MINILM_ADAPTERS[adapter_name], adapter)
    merged = tmp_path / "merged"

    report = merge(base, adapter, merged, MergeOptions(progress=False))

    assert report.status == "PASSED"
    assert report.verification["logits"]["compared"] == "last_hidden_state"
    # sentence-transformers' pipeline (pooling, normalisation) comes along with the merged encoder.
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (merged / name).is_file(), name
    reference = peft_merged(base, AutoModel, adapter)
    assert_weights_match_peft(merged, reference, torch.float32, rtol=1e-6)

    input_ids = torch.randint(0, 30522, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = outputs(peft_unmerged(base, AutoModel, adapter), input_ids)
    actual = outputs(AutoModel.from_pretrained(str(merged)).eval(), input_ids)
    torch.testing.assert_close(actual, expected, atol=FP32.atol, rtol=FP32.rtol)
    base_output = outputs(AutoModel.from_pretrained(str(base)).eval(), input_ids)
    assert (base_output - actual).abs().max().item() > 0.1
