"""Shapes: presets, Hugging Face configs, tensor parallelism and the `moetune run` shape flags."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetune.errors import UsageError
from moetune.shapes import (
    DEFAULT_BATCH_SIZES,
    MAX_BATCH_SIZE,
    MoEShape,
    from_hf_config,
    get_preset,
    load_presets,
    parse_batch_sizes,
    presets_matching,
    resolve_shapes,
)

# name: (E, topk, hidden, intermediate, renormalize, MoE layers), from the published configs
EXPECTED_PRESETS = {
    "Mixtral-8x7B": (8, 2, 4096, 14336, True, 32),
    "Qwen1.5-MoE-A2.7B": (60, 4, 2048, 1408, False, 24),
    "Qwen2-57B-A14B": (64, 8, 3584, 2560, False, 28),
    "Qwen3-30B-A3B": (128, 8, 2048, 768, True, 48),
    "Qwen3-235B-A22B": (128, 8, 4096, 1536, True, 94),
    "DeepSeek-V2-Lite": (64, 6, 2048, 1408, False, 26),
    "DeepSeek-V3": (256, 8, 7168, 2048, True, 58),
    "OLMoE-1B-7B": (64, 8, 2048, 1024, False, 16),
}
# FP8 releases: their model's shape, published with 128 x 128 block fp8 weights.
EXPECTED_FP8_PRESETS = {"Qwen3-30B-A3B-FP8": "Qwen3-30B-A3B", "Qwen3-235B-A22B-FP8": "Qwen3-235B-A22B",
                        "DeepSeek-V3-FP8": "DeepSeek-V3"}

MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "model_type": "mixtral",
}

QWEN2_MOE_CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "model_type": "qwen2_moe",
}

DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "model_type": "deepseek_v3",
}


def write_config(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


# ---------------------------------------------------------------- MoEShape


def test_table_name_and_describe():
    shape = MoEShape(E=128, N=768, K=2048, topk=8, name="Qwen3-30B-A3B")
    assert shape.table_name("bf16") == "E=128,N=768,K=2048,topk=8,dtype=bf16.json"
    assert shape.describe() == "Qwen3-30B-A3B (E=128, top-k=8, hidden=2048, intermediate=768)"
    assert MoEShape(8, 512, 1024, 2).describe() == "custom (E=8, top-k=2, hidden=1024, intermediate=512)"


def test_shape_defaults_and_positional_order():
    shape = MoEShape(8, 14336, 4096, 2)
    assert (shape.E, shape.N, shape.K, shape.topk) == (8, 14336, 4096, 2)
    assert shape.name is None and shape.renormalize is True and shape.num_layers is None


@pytest.mark.parametrize("fields", [dict(E=0, N=1, K=1, topk=1), dict(E=4, N=1, K=1, topk=8), dict(E=2, N=1.5, K=1, topk=1)])
def test_shape_rejects_impossible_values(fields):
    with pytest.raises(ValueError):
        MoEShape(**fields)


# ---------------------------------------------------------------- presets


def test_every_preset_value():
    presets = load_presets()
    assert set(presets) == set(EXPECTED_PRESETS) | set(EXPECTED_FP8_PRESETS)
    for name, (E, topk, hidden, intermediate, renormalize, layers) in EXPECTED_PRESETS.items():
        assert presets[name] == MoEShape(
            E=E, N=intermediate, K=hidden, topk=topk, name=name, renormalize=renormalize, num_layers=layers
        ), name
    for name, model in EXPECTED_FP8_PRESETS.items():
        expected = dataclasses.replace(presets[model], name=name, dtype="fp8_w8a8", block_shape=(128, 128))
        assert presets[name] == expected, name


def test_load_presets_returns_a_fresh_dict():
    load_presets().clear()
    assert len(load_presets()) == len(EXPECTED_PRESETS) + len(EXPECTED_FP8_PRESETS)


@pytest.mark.parametrize("spelling", ["qwen3-30b-a3b", "QWEN3-30B-A3B", "Qwen3-30B-A3B", " qwen3-30B-a3b "])
def test_get_preset_is_case_insensitive(spelling):
    shape = get_preset(spelling)
    assert shape.name == "Qwen3-30B-A3B"
    assert (shape.E, shape.N, shape.K, shape.topk) == (128, 768, 2048, 8)


def test_unknown_preset_lists_known_names_in_one_line():
    with pytest.raises(UsageError) as info:
        get_preset("Llama-3-8B")
    message = str(info.value)
    assert "Llama-3-8B" in message and "\n" not in message
    for name in EXPECTED_PRESETS:
        assert name in message


def test_presets_matching():
    assert [shape.name for shape in presets_matching(64, 8)] == ["OLMoE-1B-7B", "Qwen2-57B-A14B"]
    assert [shape.name for shape in presets_matching(128, 8)] == ["Qwen3-235B-A22B", "Qwen3-30B-A3B"]
    assert [shape.name for shape in presets_matching(64, 6)] == ["DeepSeek-V2-Lite"]
    assert presets_matching(64, 2) == []


# ---------------------------------------------------------------- tensor parallelism


def test_tp_divides_intermediate_only():
    shape = get_preset("Mixtral-8x7B", tp_size=8)
    assert (shape.E, shape.N, shape.K, shape.topk) == (8, 1792, 4096, 2)
    assert shape.name == "Mixtral-8x7B" and shape.num_layers == 32
    assert get_preset("DeepSeek-V3", tp_size=4).N == 512


def test_tp_that_does_not_divide_names_both_numbers():
    with pytest.raises(UsageError) as info:
        get_preset("Qwen1.5-MoE-A2.7B", tp_size=3)
    assert str(info.value) == "intermediate size 1408 is not divisible by tensor-parallel size 3"


@pytest.mark.parametrize("tp_size", [0, -2, True, 2.0])
def test_tp_must_be_a_positive_int(tp_size):
    with pytest.raises(UsageError, match="tensor-parallel size"):
        get_preset("Mixtral-8x7B", tp_size=tp_size)


# ---------------------------------------------------------------- Hugging Face configs


def test_mixtral_style_config(tmp_path):
    shape = from_hf_config(write_config(tmp_path, MIXTRAL_CONFIG))
    assert (shape.E, shape.N, shape.K, shape.topk) == (8, 14336, 4096, 2)
    assert shape.renormalize is True  # no norm_topk_prob: Mixtral renormalizes
    assert shape.num_layers == 32


def test_qwen2_moe_style_config_prefers_moe_intermediate(tmp_path):
    shape = from_hf_config(str(write_config(tmp_path, QWEN2_MOE_CONFIG)))
    assert (shape.E, shape.N, shape.K, shape.topk) == (60, 1408, 2048, 4)
    assert shape.renormalize is False
    assert shape.num_layers == 24


def test_deepseek_style_config_counts_moe_layers_only(tmp_path):
    shape = from_hf_config(write_config(tmp_path, DEEPSEEK_CONFIG), tp_size=8)
    assert (shape.E, shape.N, shape.K, shape.topk) == (256, 256, 7168, 8)
    assert shape.renormalize is True
    assert shape.num_layers == 58


def test_config_folder_is_accepted(tmp_path):
    write_config(tmp_path, QWEN2_MOE_CONFIG)
    assert from_hf_config(tmp_path).N == 1408


def test_config_name_comes_from_name_or_path(tmp_path):
    path = write_config(tmp_path, {**MIXTRAL_CONFIG, "_name_or_path": "mistralai/Mixtral-8x7B-v0.1"})
    assert from_hf_config(path).name == "Mixtral-8x7B-v0.1"
    assert from_hf_config(write_config(tmp_path, MIXTRAL_CONFIG)).name is None


def test_config_without_layer_count(tmp_path):
    config = {key: value for key, value in MIXTRAL_CONFIG.items() if key != "num_hidden_layers"}
    assert from_hf_config(write_config(tmp_path, config)).num_layers is None


def test_missing_config_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(UsageError, match="nowhere"):
        from_hf_config(path)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="broken.json.*not valid JSON"):
        from_hf_config(path)


def test_non_object_json_is_rejected(tmp_path):
    with pytest.raises(UsageError, match="list.json"):
        from_hf_config(write_config(tmp_path, [1, 2], name="list.json"))  # type: ignore[arg-type]


def test_dense_config_names_the_missing_expert_field(tmp_path):
    dense = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
    with pytest.raises(UsageError) as info:
        from_hf_config(write_config(tmp_path, dense, name="dense.json"))
    message = str(info.value)
    assert "dense.json" in message and "num_local_experts" in message and "n_routed_experts" in message


@pytest.mark.parametrize("field", ["num_experts_per_tok", "hidden_size", "intermediate_size"])
def test_config_missing_field_is_named(tmp_path, field):
    config = {key: value for key, value in MIXTRAL_CONFIG.items() if key != field}
    with pytest.raises(UsageError, match=field):
        from_hf_config(write_config(tmp_path, config))


def test_config_with_bad_field_value(tmp_path):
    with pytest.raises(UsageError, match="num_experts_per_tok"):
        from_hf_config(write_config(tmp_path, {**MIXTRAL_CONFIG, "num_experts_per_tok": "2"}))


def test_config_tp_that_does_not_divide(tmp_path):
    with pytest.raises(UsageError, match="14336.*5"):
        from_hf_config(write_config(tmp_path, MIXTRAL_CONFIG), tp_size=5)


# ---------------------------------------------------------------- resolve_shapes


def test_resolve_model():
    (shape,) = resolve_shapes(model="deepseek-v2-lite")
    assert shape == get_preset("DeepSeek-V2-Lite")


def test_resolve_model_with_agreeing_numbers_and_tp():
    (shape,) = resolve_shapes(model="Qwen3-30B-A3B", E=128, topk=8, hidden=2048, intermediate=768, tp_size=2)
    assert (shape.E, shape.N, shape.K, shape.topk, shape.name) == (128, 384, 2048, 8, "Qwen3-30B-A3B")


@pytest.mark.parametrize(
    "flags, wrong",
    [(dict(E=64), "--E=64"), (dict(topk=4), "--topk=4"), (dict(hidden=4096), "--hidden=4096"), (dict(intermediate=1), "--intermediate=1")],
)
def test_resolve_model_with_disagreeing_numbers(flags, wrong):
    with pytest.raises(UsageError, match=wrong):
        resolve_shapes(model="Qwen3-30B-A3B", **flags)


def test_resolve_model_config(tmp_path):
    path = write_config(tmp_path, DEEPSEEK_CONFIG)
    (shape,) = resolve_shapes(model_config=path, E=256, topk=8, tp_size=2)
    assert (shape.E, shape.N, shape.K, shape.topk, shape.num_layers) == (256, 1024, 7168, 8, 58)


def test_resolve_model_config_with_disagreeing_topk(tmp_path):
    path = write_config(tmp_path, DEEPSEEK_CONFIG)
    with pytest.raises(UsageError, match="--topk=6"):
        resolve_shapes(model_config=path, topk=6)


def test_resolve_model_and_model_config_are_exclusive(tmp_path):
    path = write_config(tmp_path, MIXTRAL_CONFIG)
    with pytest.raises(UsageError, match="--model and --model-config"):
        resolve_shapes(model="Mixtral-8x7B", model_config=path)


def test_resolve_unknown_model():
    with pytest.raises(UsageError, match="unknown model"):
        resolve_shapes(model="nope")


def test_resolve_custom_shape():
    (shape,) = resolve_shapes(E=16, topk=4, hidden=1024, intermediate=512, tp_size=2)
    assert shape == MoEShape(E=16, N=256, K=1024, topk=4)
    assert shape.name is None


def test_resolve_custom_shape_matching_a_preset_stays_custom():
    (shape,) = resolve_shapes(E=8, topk=2, hidden=4096, intermediate=14336)
    assert shape.name is None and shape.N == 14336


def test_resolve_presets_by_e_and_topk():
    shapes = resolve_shapes(E=64, topk=8)
    assert [shape.name for shape in shapes] == ["OLMoE-1B-7B", "Qwen2-57B-A14B"]
    assert [(shape.N, shape.K) for shape in shapes] == [(1024, 2048), (2560, 3584)]


def test_resolve_presets_by_e_and_topk_with_tp():
    shapes = resolve_shapes(E=64, topk=8, tp_size=4)
    assert [shape.N for shape in shapes] == [256, 640]


def test_resolve_presets_by_e_and_topk_tp_error_names_both_numbers():
    with pytest.raises(UsageError, match="1024.*3"):
        resolve_shapes(E=64, topk=8, tp_size=3)


def test_resolve_no_matching_preset():
    with pytest.raises(UsageError) as info:
        resolve_shapes(E=32, topk=4)
    assert str(info.value) == "no built-in preset has E=32 and top-k=4; pass --hidden and --intermediate"


@pytest.mark.parametrize("flags, message", [(dict(hidden=1024), "--hidden needs --intermediate"), (dict(intermediate=512), "--intermediate needs --hidden")])
def test_resolve_only_one_size(flags, message):
    with pytest.raises(UsageError, match=message):
        resolve_shapes(E=16, topk=4, **flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(E=16, topk=4, hidden=0, intermediate=512), "--hidden must be a positive integer, got 0"),
        (dict(E=16, topk=4, hidden=1024, intermediate=-8), "--intermediate must be a positive integer, got -8"),
        (dict(E=0, topk=4), "--E must be a positive integer, got 0"),
        (dict(E=16, topk=0), "--topk must be a positive integer, got 0"),
        (dict(E=4, topk=8), r"--E \(4\) must be at least --topk \(8\)"),
    ],
)
def test_resolve_bad_numbers(flags, message):
    with pytest.raises(UsageError, match=message):
        resolve_shapes(**flags)


@pytest.mark.parametrize("flags", [dict(), dict(E=8), dict(topk=2), dict(hidden=1024, intermediate=512)])
def test_resolve_needs_a_source(flags):
    with pytest.raises(UsageError, match="pass --model, --model-config, or --E and --topk"):
        resolve_shapes(**flags)


def test_resolve_errors_are_one_line():
    for flags in (dict(E=32, topk=4), dict(E=4, topk=8), dict(model="x"), dict(E=16, topk=4, hidden=3)):
        with pytest.raises(UsageError) as info:
            resolve_shapes(**flags)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- batch sizes


@pytest.mark.parametrize(
    "text, expected",
    [("1,2,4", [1, 2, 4]), ("64", [64]), ("16, 1,8 ,1", [1, 8, 16]), ("4096,1024,4096", [1024, 4096])],
)
def test_parse_batch_sizes(text, expected):
    assert parse_batch_sizes(text) == expected


@pytest.mark.parametrize("text, bad", [("1,x", "'x'"), ("0", "'0'"), ("-4", "'-4'"), ("1,,2", "''"), ("1,2,", "''"), ("1.5", "'1.5'"), ("1_0", "'1_0'")])
def test_parse_batch_sizes_names_the_bad_item(text, bad):
    with pytest.raises(UsageError) as info:
        parse_batch_sizes(text)
    assert f"bad batch size {bad}" in str(info.value)


def test_parse_batch_sizes_has_a_maximum():
    assert parse_batch_sizes(f"1,{MAX_BATCH_SIZE}") == [1, MAX_BATCH_SIZE]
    with pytest.raises(UsageError, match=f"batch size {MAX_BATCH_SIZE + 1} is above the maximum, {MAX_BATCH_SIZE}"):
        parse_batch_sizes(f"1,{MAX_BATCH_SIZE + 1}")


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_batch_sizes_empty(text):
    with pytest.raises(UsageError, match="no batch sizes given"):
        parse_batch_sizes(text)


def test_default_batch_sizes_are_sorted_unique_and_round_trip():
    assert DEFAULT_BATCH_SIZES == sorted(set(DEFAULT_BATCH_SIZES))
    assert DEFAULT_BATCH_SIZES[0] == 1 and DEFAULT_BATCH_SIZES[-1] == 16384 and len(DEFAULT_BATCH_SIZES) == 20
    assert parse_batch_sizes(",".join(map(str, DEFAULT_BATCH_SIZES))) == DEFAULT_BATCH_SIZES


def test_the_packaging_script_names_a_deployment_tp_size_for_every_preset():
    script = Path(__file__).resolve().parent.parent / "scripts" / "package_tables.py"
    result = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tp = {line.split("--model ")[1].split()[0]: int(line.split("--tp-size ")[1].split()[0])
          for line in result.stdout.splitlines()}
    assert sorted(tp) == sorted(load_presets())
    assert tp["Qwen3-30B-A3B"] == 1 and tp["Qwen3-235B-A22B"] == 4 and tp["DeepSeek-V3"] == 8
    assert tp["DeepSeek-V3-FP8"] == 8 and tp["Qwen3-235B-A22B-FP8"] == 4  # as the fp8 tables are packaged
