"""foldkit's merge against PEFT as the oracle, on tiny Llama, Gemma, GPT-2, OPT and BERT models.

Each case makes a non-identity LoRA or IA3 adapter with PEFT and merges it with foldkit. The tests
compare the merged tensors with PEFT's merge_and_unload() state dict, and the merged model's outputs
(loaded with transformers alone) with the unmerged PeftModel. They also check that the merge changed
the base and that the output keeps the base checkpoint's layout. A case's merge and models are
computed once and shared by its tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel
from safetensors import safe_open
from typer.testing import CliRunner

from foldkit.cli import app
from foldkit.merge import MergeOptions, merge
from tiny_models import (
    TinyBase,
    checkpoint_files,
    load_base,
    model_outputs,
    probe_input_ids,
    read_checkpoint,
    read_safetensors,
    save_peft_adapter,
    save_tiny_base,
)

ADAPTER_SEED = 2024
PROBE_SEED = 7

# Merged float32 tensors against PEFT's merged float32 tensors: the same arithmetic, so only rounding
# differences are allowed. ATOL covers entries near zero, where a relative bound means nothing.
WEIGHT_RTOL = 1e-6
WEIGHT_ATOL = 1e-7
# A bfloat16 tensor against PEFT's float32 result rounded to bfloat16: at most one bfloat16 step apart
# (8 significant bits, so a relative step of 2**-7).
BF16_WEIGHT_RTOL = 2.0**-7

# Merged float32 model outputs against the unmerged PeftModel's outputs.
OUTPUT_TOL = 1e-4
# A bfloat16 merge rounds every weight to 8 significant bits, so its outputs are compared with a bound
# relative to max|reference|.
BF16_OUTPUT_REL_TOL = 0.05
# The adapter must move the outputs by far more than the tolerances above, or matching proves nothing:
# at least MIN_OUTPUT_EFFECT (100 times OUTPUT_TOL) and EFFECT_FACTOR times the case's own tolerance.
MIN_OUTPUT_EFFECT = 100 * OUTPUT_TOL
EFFECT_FACTOR = 5
MIN_WEIGHT_CHANGE = 1e-3

# Files that foldkit copies from the base directory when present.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")

ADAPTER_KEY_MARKERS = ("lora_", "ia3_", "base_layer", "base_model.model")

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(**settings) -> Callable[[], LoraConfig]:
    """LoRA with random lora_A and lora_B (init_lora_weights=False) and lora_alpha != r."""
    options = dict(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False)
    options.update(settings)
    return lambda: LoraConfig(**options)


def ia3(**settings) -> Callable[[], IA3Config]:
    """IA3 with random ia3_l vectors (init_ia3_weights=False) instead of ones."""
    options = dict(init_ia3_weights=False)
    options.update(settings)
    return lambda: IA3Config(**options)


@dataclass(frozen=True)
class MergeCase:
    """One adapter on one base, and how foldkit is run on it."""

    id: str
    base: str  # name of the conftest fixture that saves the base model
    make_config: Callable[[], PeftConfig]
    dtype: str | None = None  # foldkit's --dtype; None keeps the base's float32
    via_cli: bool = False  # run `foldkit merge` through typer's CliRunner instead of the library call
    save_embedding_layers: bool | str = False
    # Tensors the merge adds to the base's names (a lm_head weight split off from a tied embedding).
    added_tensors: tuple[str, ...] = ()
    # PEFT 0.21.2's merge_and_unload() is wrong for a LoRA on a tied lm_head, so those cases are not
    # compared with it tensor by tensor.
    peft_merge_is_oracle: bool = True


CASES = [
    MergeCase("llama-lora", "llama_base", lora(target_modules=LLAMA_LINEAR)),
    MergeCase("llama-ia3", "llama_base",
              ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    # Rank-stabilized scaling is lora_alpha / sqrt(r), with v_proj's own rank from rank_pattern.
    MergeCase("llama-lora-rslora", "llama_base",
              lora(target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True, rank_pattern={"v_proj": 16})),
    # Per-module ranks and alphas, with alphas that do not follow the ranks. For layer 1's k_proj and
    # down_proj two keys match, and PEFT takes the first in dict order (r=8, lora_alpha=7). PEFT writes
    # adapter_config.json with sorted keys, so the keys are sorted here to keep that order after a reload.
    MergeCase("llama-lora-patterns", "llama_base", lora(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.k_proj": 8, "q_proj": 2, "self_attn.k_proj": 6},
        alpha_pattern={"layers.1.mlp.down_proj": 7, "mlp.down_proj": 5, "o_proj": 40, "v_proj": 3},
    )),
    MergeCase("llama-lora-bias", "llama_bias_base",
              lora(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_bias=True)),
    # Regular expressions, matched by PEFT against the whole module name. Only layer 0's down_proj
    # scales its input; layer 1's down_proj scales its output.
    MergeCase("llama-ia3-regex", "llama_base", ia3(
        target_modules=r".*\.(k_proj|v_proj|up_proj|down_proj)",
        feedforward_modules=r"model\.layers\.0\.mlp\.down_proj|.*\.up_proj",
    )),
    # PEFT's list rule for feedforward_modules is a plain suffix test: "n_proj" selects down_proj but not
    # up_proj or k_proj. PEFT requires feedforward_modules to be a subset of target_modules, hence "n_proj" there.
    MergeCase("llama-ia3-suffix", "llama_base", ia3(
        target_modules=["k_proj", "up_proj", "down_proj", "n_proj"], feedforward_modules=["n_proj"],
    )),
    MergeCase("llama-lora-regex", "llama_base",
              lora(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj|.*\.mlp\.gate_proj")),
    MergeCase("llama-lora-bf16", "llama_base", lora(target_modules=LLAMA_LINEAR), dtype="bfloat16"),
    MergeCase("llama-lora-sharded", "llama_sharded_base", lora(target_modules=LLAMA_LINEAR)),
    MergeCase("llama-ia3-cli", "llama_base",
              ia3(target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
              via_cli=True),
    MergeCase("gemma-lora", "gemma_base", lora(target_modules=LLAMA_LINEAR)),
    MergeCase("gemma-ia3", "gemma_base",
              ia3(target_modules=["k_proj", "v_proj", "gate_proj", "down_proj"], feedforward_modules=["down_proj"])),
    # LoRA on the lm_head that shares its weight with the input embedding.
    MergeCase("gemma-lora-lm-head", "gemma_base", lora(target_modules=["q_proj", "lm_head"]),
              added_tensors=("lm_head.weight",), peft_merge_is_oracle=False),
    # GPT-2's Conv1D stores (in, out) weights: PEFT needs fan_in_fan_out=True for LoRA and sets it for IA3.
    MergeCase("gpt2-lora", "gpt2_base", lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    MergeCase("gpt2-ia3", "gpt2_base",
              ia3(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["c_fc"], fan_in_fan_out=True)),
    MergeCase("gpt2-lora-bf16-cli", "gpt2_base",
              lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), dtype="bfloat16", via_cli=True),
    MergeCase("opt-lora", "opt_base",
              lora(target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])),
    MergeCase("opt-lora-bias", "opt_base", lora(target_modules=["k_proj", "out_proj", "fc1"], lora_bias=True)),
    MergeCase("opt-ia3", "opt_base", ia3(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])),
    MergeCase("bert-lora", "bert_base", lora(target_modules=["query", "key", "value", "dense"])),
    # PEFT's feedforward rule is a plain suffix test, so "output.dense" also makes attention.output.dense
    # scale its input.
    MergeCase("bert-ia3", "bert_base",
              ia3(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
]
# The same tied-lm_head LoRA as gemma-lora-lm-head, saved with PEFT's default save_embedding_layers="auto",
# which also stores lm_head.base_layer.weight (a copy of the base weight). Used by one test only.
DEFAULT_SAVE_CASE = MergeCase("gemma-lora-lm-head-default-save", "gemma_base", lora(target_modules=["q_proj", "lm_head"]),
                              save_embedding_layers="auto", added_tensors=("lm_head.weight",),
                              peft_merge_is_oracle=False)
CASES_BY_ID = {case.id: case for case in [*CASES, DEFAULT_SAVE_CASE]}
ALL_IDS = [case.id for case in CASES]
PEFT_ORACLE_IDS = [case.id for case in CASES if case.peft_merge_is_oracle]


@dataclass
class CaseRun:
    """Everything one case produced: the adapter, foldkit's output, and the reference outputs."""

    case: MergeCase
    base: TinyBase
    adapter_dir: Path
    out_dir: Path
    adapter_modules: set[str]
    base_tensors: dict[str, torch.Tensor]
    merged_tensors: dict[str, torch.Tensor]
    peft_merged_state: dict[str, torch.Tensor]
    base_outputs: torch.Tensor
    peft_outputs: torch.Tensor  # the unmerged PeftModel
    merged_outputs: torch.Tensor  # foldkit's output loaded with the base's transformers class
    loading_info: dict
    merged_input_embedding: torch.Tensor
    ties_loaded_embeddings: bool  # the loaded merged model shares one tensor for input and output embeddings
    report: dict
    config: dict
    cli_exit_code: int | None = None
    cli_stdout: str | None = None


def adapter_module_names(adapter_dir: Path) -> set[str]:
    """Return the module names that the saved adapter has LoRA or IA3 tensors for."""
    names = set()
    for key in read_safetensors(adapter_dir / "adapter_model.safetensors"):
        for suffix in (".lora_A.weight", ".ia3_l"):
            if key.endswith(suffix):
                names.add(key.removeprefix("base_model.model.").removesuffix(suffix))
    return names


def merge_with_cli(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str | None) -> tuple[int, str]:
    """Run `foldkit merge --json` in process; restore the logging state the command changes."""
    args = ["merge", str(base_dir), str(adapter_dir), str(out_dir), "--json", "--quiet"]
    if dtype is not None:
        args += ["--dtype", dtype]

    foldkit_logger = logging.getLogger("foldkit")
    handlers, level, propagate = foldkit_logger.handlers[:], foldkit_logger.level, foldkit_logger.propagate
    verbosity = transformers.utils.logging.get_verbosity()
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    try:
        result = CliRunner().invoke(app, args)
    finally:
        foldkit_logger.handlers[:] = handlers
        foldkit_logger.setLevel(level)
        foldkit_logger.propagate = propagate
        transformers.utils.logging.set_verbosity(verbosity)
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def run_case(case: MergeCase, base: TinyBase, workdir: Path) -> CaseRun:
    adapter_dir = save_peft_adapter(base, case.make_config(), workdir / "adapter", ADAPTER_SEED,
                                    save_embedding_layers=case.save_embedding_layers)
    out_dir = workdir / "merged"
    cli_exit_code = cli_stdout = None
    if case.via_cli:
        cli_exit_code, cli_stdout = merge_with_cli(base.directory, adapter_dir, out_dir, case.dtype)
        if cli_exit_code != 0:
            raise AssertionError(f"foldkit merge exited with code {cli_exit_code}. Its stdout:\n{cli_stdout}")
    else:
        merge(base.directory, adapter_dir, out_dir, MergeOptions(dtype=case.dtype, progress=False))

    input_ids = probe_input_ids(PROBE_SEED)
    model = load_base(base)
    base_outputs = model_outputs(model, input_ids)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    peft_outputs = model_outputs(peft_model, input_ids)
    peft_merged = peft_model.merge_and_unload()
    peft_merged_state = {name: tensor.detach().clone() for name, tensor in peft_merged.state_dict().items()}

    merged_model, loading_info = base.model_class.from_pretrained(str(out_dir), dtype=torch.float32,
                                                                  output_loading_info=True)
    merged_model.eval()
    output_embedding = merged_model.get_output_embeddings()
    input_embedding = merged_model.get_input_embeddings().weight
    ties_loaded = output_embedding is not None and output_embedding.weight.data_ptr() == input_embedding.data_ptr()

    return CaseRun(
        case=case,
        base=base,
        adapter_dir=adapter_dir,
        out_dir=out_dir,
        adapter_modules=adapter_module_names(adapter_dir),
        base_tensors=read_checkpoint(base.directory),
        merged_tensors=read_checkpoint(out_dir),
        peft_merged_state=peft_merged_state,
        base_outputs=base_outputs,
        peft_outputs=peft_outputs,
        merged_outputs=model_outputs(merged_model, input_ids),
        loading_info=loading_info,
        merged_input_embedding=input_embedding.detach().clone(),
        ties_loaded_embeddings=ties_loaded,
        report=json.loads((out_dir / "foldkit_report.json").read_text(encoding="utf-8")),
        config=json.loads((out_dir / "config.json").read_text(encoding="utf-8")),
        cli_exit_code=cli_exit_code,
        cli_stdout=cli_stdout,
    )


class CaseRunner:
    """Run each case at most once per module and share the result (or the error) with its tests."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp_path_factory = tmp_path_factory
        self._runs: dict[str, CaseRun] = {}
        self._errors: dict[str, Exception] = {}

    def get(self, case_id: str, request: pytest.FixtureRequest) -> CaseRun:
        if case_id in self._errors:
            raise self._errors[case_id]
        if case_id not in self._runs:
            case = CASES_BY_ID[case_id]
            base = request.getfixturevalue(case.base)
            try:
                self._runs[case_id] = run_case(case, base, self._tmp_path_factory.mktemp(case_id))
            except Exception as error:
                self._errors[case_id] = error
                raise
        return self._runs[case_id]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> CaseRunner:
    return CaseRunner(tmp_path_factory)


@pytest.fixture
def run(request, runner) -> CaseRun:
    return runner.get(request.param, request)


def output_atol(case: MergeCase, reference: torch.Tensor) -> float:
    """Absolute tolerance for merged outputs: OUTPUT_TOL in float32, relative to max|reference| in bfloat16."""
    if case.dtype == "bfloat16":
        return BF16_OUTPUT_REL_TOL * reference.abs().max().item()
    return OUTPUT_TOL


@pytest.mark.parametrize("run", PEFT_ORACLE_IDS, indirect=True)
def test_weights_match_peft_merge(run: CaseRun):
    missing = sorted(set(run.merged_tensors) - set(run.peft_merged_state))
    assert not missing, f"merged tensors absent from PEFT's merged state dict: {missing}"

    mismatched = []
    for name, merged in run.merged_tensors.items():
        expected = run.peft_merged_state[name]
        if run.case.dtype is None:
            close = torch.allclose(merged, expected, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
        else:
            rounded = expected.to(merged.dtype).float()
            close = torch.allclose(merged.float(), rounded, rtol=BF16_WEIGHT_RTOL, atol=WEIGHT_ATOL)
        if not close:
            difference = (merged.float() - expected.float()).abs().max().item()
            mismatched.append(f"{name} (max abs diff {difference:.3g})")
    assert not mismatched, f"merged tensors differ from PEFT's merge_and_unload(): {mismatched}"


@pytest.mark.parametrize("run", ALL_IDS, indirect=True)
def test_outputs_match_unmerged_peft(run: CaseRun):
    atol = output_atol(run.case, run.peft_outputs)
    torch.testing.assert_close(run.merged_outputs, run.peft_outputs, rtol=OUTPUT_TOL, atol=atol)


@pytest.mark.parametrize("run", ALL_IDS, indirect=True)
def test_merge_changes_base(run: CaseRun):
    min_effect = max(MIN_OUTPUT_EFFECT, EFFECT_FACTOR * output_atol(run.case, run.peft_outputs))
    adapter_effect = (run.peft_outputs - run.base_outputs).abs().max().item()
    merged_effect = (run.merged_outputs - run.base_outputs).abs().max().item()
    assert adapter_effect > min_effect, f"the adapter moves the outputs by only {adapter_effect:.3g}"
    assert merged_effect > min_effect, f"the merged model moves the outputs by only {merged_effect:.3g}"

    unchanged = []
    for folded in run.report["folded"]:
        merged = run.merged_tensors[folded["weight"]].float()
        base = run.base_tensors[folded["source_weight"]].float()
        if (merged - base).abs().max().item() <= MIN_WEIGHT_CHANGE:
            unchanged.append(folded["weight"])
    assert not unchanged, f"folded weights equal to the base: {unchanged}"


@pytest.mark.parametrize("run", ALL_IDS, indirect=True)
def test_output_layout_matches_base(run: CaseRun):
    expected_names = set(run.base_tensors) | set(run.case.added_tensors)
    assert set(run.merged_tensors) == expected_names

    adapter_keys = [name for name in run.merged_tensors if any(marker in name for marker in ADAPTER_KEY_MARKERS)]
    assert not adapter_keys, f"adapter keys in the output: {adapter_keys}"

    wrong_shapes = [name for name in run.base_tensors if run.merged_tensors[name].shape != run.base_tensors[name].shape]
    assert not wrong_shapes, f"tensors whose shape changed: {wrong_shapes}"

    expected_dtype = getattr(torch, run.case.dtype) if run.case.dtype else torch.float32
    wrong_dtypes = {name: str(tensor.dtype) for name, tensor in run.merged_tensors.items() if tensor.dtype != expected_dtype}
    assert not wrong_dtypes, f"tensors not in {expected_dtype}: {wrong_dtypes}"

    assert (run.out_dir / "config.json").is_file()
    assert (run.out_dir / "foldkit_report.json").is_file()
    assert not (run.out_dir / "adapter_config.json").exists()
    missing_side_files = [name for name in SIDE_FILES
                          if (run.base.directory / name).is_file() and not (run.out_dir / name).is_file()]
    assert not missing_side_files, f"files not copied from the base: {missing_side_files}"


@pytest.mark.parametrize("run", ALL_IDS, indirect=True)
def test_output_loads_all_weights(run: CaseRun):
    assert not run.loading_info["missing_keys"]
    assert not run.loading_info["unexpected_keys"]
    assert not run.loading_info["mismatched_keys"]
    assert run.config["architectures"] == json.loads((run.base.directory / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("run", ALL_IDS, indirect=True)
def test_report_status_passed(run: CaseRun):
    report = run.report
    assert report["status"] == "PASSED"
    assert report["verification"]["passed"] is True
    assert report["peft_type"] == run.case.make_config().peft_type.value
    assert {folded["module"] for folded in report["folded"]} == run.adapter_modules
    assert report["output_dtype"] == run.case.dtype


def test_tied_lm_head_keeps_input_embedding(runner, request):
    run = runner.get("gemma-lora-lm-head", request)
    embedding = "model.embed_tokens.weight"

    assert torch.equal(run.merged_tensors[embedding], run.base_tensors[embedding])
    assert torch.equal(run.merged_input_embedding, run.base_tensors[embedding])
    assert not run.ties_loaded_embeddings


def test_tied_lm_head_unties_config(runner, request):
    run = runner.get("gemma-lora-lm-head", request)
    base_config = json.loads((run.base.directory / "config.json").read_text(encoding="utf-8"))

    assert base_config["tie_word_embeddings"] is True
    assert run.config["tie_word_embeddings"] is False
    assert run.report["untied_embeddings"] is True


def test_tied_lm_head_matches_peft_head(runner, request):
    """The merged lm_head and every other non-embedding tensor equal PEFT's merge.

    PEFT 0.21.2's merge_and_unload() adds the lm_head delta to the weight that lm_head shares with
    embed_tokens, so its input embedding changes too and tie_word_embeddings stays true. Its lm_head is
    still right; its embed_tokens is not, and is checked against the base instead.
    """
    run = runner.get("gemma-lora-lm-head", request)

    torch.testing.assert_close(run.merged_tensors["lm_head.weight"], run.peft_merged_state["lm_head.weight"],
                               rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    mismatched = [
        name for name, merged in run.merged_tensors.items()
        if name != "model.embed_tokens.weight"
        and not torch.allclose(merged, run.peft_merged_state[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    ]
    assert not mismatched, f"merged tensors differ from PEFT's merge_and_unload(): {mismatched}"


def test_tied_lm_head_default_save_merges(runner, request):
    """An adapter saved with PEFT's defaults (which add lm_head.base_layer.weight) merges like one without it."""
    run = runner.get(DEFAULT_SAVE_CASE.id, request)
    lean_run = runner.get("gemma-lora-lm-head", request)

    torch.testing.assert_close(run.merged_outputs, run.peft_outputs, rtol=OUTPUT_TOL, atol=OUTPUT_TOL)
    assert torch.equal(run.merged_tensors["model.embed_tokens.weight"], run.base_tensors["model.embed_tokens.weight"])
    assert torch.equal(run.merged_tensors["lm_head.weight"], lean_run.merged_tensors["lm_head.weight"])
    assert run.report["status"] == "PASSED"


def test_peft_default_save_stores_lm_head(runner, request):
    """PEFT's default save does store the lm_head base weight, so the test above covers that layout."""
    run = runner.get("gemma-lora-lm-head", request)
    directory = run.adapter_dir.parent / "default-save-layout"
    save_peft_adapter(run.base, DEFAULT_SAVE_CASE.make_config(), directory, ADAPTER_SEED, save_embedding_layers="auto")

    keys = set(read_safetensors(directory / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.weight" in keys


def test_sharded_output_index_consistent(runner, request):
    run = runner.get("llama-lora-sharded", request)
    base_index_path = run.base.directory / "model.safetensors.index.json"
    out_index_path = run.out_dir / "model.safetensors.index.json"

    assert base_index_path.is_file(), "the sharded base fixture was saved as a single file"
    assert len(checkpoint_files(run.base.directory)) >= 2
    assert out_index_path.is_file()
    assert not (run.out_dir / "model.safetensors").exists()

    index = json.loads(out_index_path.read_text(encoding="utf-8"))
    weight_map = index["weight_map"]
    shard_files = sorted(path.name for path in run.out_dir.glob("*.safetensors"))
    assert sorted(set(weight_map.values())) == shard_files
    assert shard_files == checkpoint_files(run.base.directory)

    total_bytes = 0
    for file in shard_files:
        with safe_open(str(run.out_dir / file), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            total_bytes += sum(handle.get_tensor(name).nbytes for name in names)
        mapped = {name for name, mapped_file in weight_map.items() if mapped_file == file}
        assert names == mapped, f"{file} holds {sorted(names ^ mapped)} against the index"
    assert index["metadata"]["total_size"] == total_bytes
    assert set(weight_map) == set(run.base_tensors)


@pytest.mark.parametrize("case_id", ["llama-lora-bf16", "gpt2-lora-bf16-cli"])
def test_dtype_bf16_config_and_report(runner, request, case_id):
    run = runner.get(case_id, request)

    assert run.config["dtype"] == "bfloat16"
    assert run.report["output_dtype"] == "bfloat16"
    assert run.report["status"] == "PASSED"


@pytest.mark.parametrize("case_id", ["llama-ia3-cli", "gpt2-lora-bf16-cli"])
def test_cli_merge_prints_json_report(runner, request, case_id):
    run = runner.get(case_id, request)
    printed = json.loads(run.cli_stdout)

    assert run.cli_exit_code == 0
    assert printed["status"] == "PASSED"
    assert printed == run.report


@pytest.mark.parametrize("architecture, target", [("gpt2", "c_attn"), ("opt", "v_proj")])
def test_merge_base_without_tokenizer(tmp_path, architecture, target):
    """A base directory with only config.json and weights (no tokenizer files) merges and verifies."""
    base = save_tiny_base(architecture, tmp_path / "base", seed=21)
    adapter_dir = save_peft_adapter(base, ia3(target_modules=[target], feedforward_modules=[])(), tmp_path / "adapter",
                                    ADAPTER_SEED)

    assert not (base.directory / "tokenizer.json").exists()
    report = merge(base.directory, adapter_dir, tmp_path / "merged", MergeOptions(progress=False))
    assert report.status == "PASSED"
