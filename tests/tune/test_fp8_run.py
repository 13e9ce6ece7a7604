"""`moetune run --dtype fp8_w8a8 [--block-shape BN,BK]`: the fp8 flags checked before any
work, and a tiny fp8 tune in the interpreter writing a table keyed by its quant mode."""

import json

import pytest

from moetune import get_config
from moetune.cli import main
from moetune.loader import clear_cache
from moetune.tables import read_record
from tests.tune.conftest import QUIET, TINY

FP8_TABLE = "E=4,N=32,K=64,topk=2,dtype=fp8_w8a8,block_shape=[32,32].json"


@pytest.mark.parametrize("args, words", [
    (["--block-shape", "32,32"], "--block-shape 32,32 needs --dtype fp8_w8a8"),
    (["--dtype", "fp16", "--block-shape", "32,32"], "needs --dtype fp8_w8a8"),
    (["--dtype", "fp8_w8a8", "--block-shape", "32"], "'32': expected two positive integers"),
    (["--dtype", "fp8_w8a8", "--block-shape", "32,-32"], "'32,-32'"),
    (["--dtype", "fp8_w8a8", "--block-shape", "32,48"], "powers of two >= 16"),
    (["--model", "Qwen3-30B-A3B", "--block-shape", "128,128"], "needs --dtype fp8_w8a8"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_fp8_flags_are_one_line_before_any_work(args, words, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["run", *([] if "--model" in args else TINY), *args, "--out-dir", str(out), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetune: error: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_an_fp8_preset_tunes_its_published_quant_mode_unless_flags_say_otherwise(tmp_path, monkeypatch):
    import moetune.tune as tune

    seen = []
    monkeypatch.setattr(tune, "tune", lambda settings, log=print, compiler=None: seen.append(settings) or [])
    for flags in ([], ["--block-shape", "64,64"], ["--dtype", "fp8_w8a8"], ["--dtype", "fp16"]):
        assert main(["run", "--model", "Qwen3-30B-A3B-FP8", *flags, "--out-dir", str(tmp_path), *QUIET]) == 0
    assert [str(settings.dtype) for settings in seen] == [
        "fp8_w8a8,block_shape=[128,128]", "fp8_w8a8,block_shape=[64,64]", "fp8_w8a8", "fp16"]
    assert seen[0].table_path(seen[0].shapes[0]).name == \
        "E=128,N=768,K=2048,topk=8,dtype=fp8_w8a8,block_shape=[128,128].json"
    # A Hugging Face config.json says so in its quantization_config, as the FP8 releases publish it.
    config = {"num_experts": 128, "num_experts_per_tok": 8, "hidden_size": 2048, "moe_intermediate_size": 768,
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["run", "--model-config", str(tmp_path / "config.json"), "--out-dir", str(tmp_path), *QUIET]) == 0
    assert str(seen[-1].dtype) == "fp8_w8a8,block_shape=[128,128]"


def test_a_tiny_fp8_tune_writes_a_block_fp8_table_the_layer_finds(tmp_path, monkeypatch, made_up_timings,
                                                                   isolated_loader):
    out = tmp_path / "tables"
    assert main(["run", *TINY, "--dtype", "fp8_w8a8", "--block-shape", "32,32", "--batch-sizes", "1",
                 "--trials", "2", "--out-dir", str(out), *QUIET]) == 0
    path = out / "cpu" / FP8_TABLE
    table = read_record(path)  # valid: every BLOCK_SIZE_K divides block_k 32
    assert (table.shape.dtype, table.shape.block_shape) == ("fp8_w8a8", (32, 32))
    assert set(table.batch_sizes[1].variants) == {"unfused", "fused"}
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(out))
    clear_cache()
    selection = get_config(4, 32, 64, 2, "fp8_w8a8", 1, block_shape=[32, 32])
    assert selection.source == str(path) and selection.batch_size == 1
