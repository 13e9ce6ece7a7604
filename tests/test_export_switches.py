"""`moetune export` of tables whose layers run kernel switches: USE_TMA where the winner is
SGLang's TMA path, the fastest layer each framework runs where it is not, a note per batch
size written otherwise."""

import json

from moetune.switch_candidates import SGLANG_TMA, LayerCandidate
from moetune.types import OFF, LaunchConfig, Switches, Variant
from tests.test_export import read_like_vllm_and_sglang, run_cli, write
from tests.test_tables import config, make_table, timed

TMA = SGLANG_TMA.to_json()


def switched(gemm1: dict, gemm2: dict, switches: dict, layer_us: float = 25.0) -> dict:
    return {**timed(gemm1, gemm2, layer_us), "switches": switches}


def candidate(variant: str, switches: Switches, gemm1: dict, gemm2: dict, layer_us: float | None,
              status: str = "measured") -> dict:
    return LayerCandidate(Variant(variant), switches, LaunchConfig.from_json(gemm1), LaunchConfig.from_json(gemm2),
                          layer_us, status).to_json()


A, B, C = config(n=32), config(n=128), config(m=32, n=64, k=128)
SPLIT = Switches(split_k=4)


def switch_table() -> dict:
    """M=1: split-K wins; SGLang's TMA path (fused) and the plain layers were measured, and a
    faster sorted-rows layer that failed the check.
    M=64: the TMA path wins. M=256: the fused SiLU wins, no candidates recorded. M=512: all off."""
    return make_table(batch_sizes={
        1: {"unfused": switched(A, A, {"split_k": 4}, 20.0), "fused": switched(B, B, {}, 28.0), "winner": "unfused",
            "switch_candidates": [
                candidate("unfused", OFF, B, A, 30.0), candidate("unfused", SPLIT, A, A, 20.0),
                candidate("fused", OFF, B, B, 28.0), candidate("fused", SGLANG_TMA, C, C, 25.0),
                candidate("fused", Switches(sorted_rows=True), A, A, None, "wrong_result")]},
        64: {"unfused": switched(B, B, {}, 30.0), "fused": switched(C, C, TMA, 24.0), "winner": "fused"},
        256: {"unfused": switched(A, B, {"fuse_activation": True}), "winner": "unfused"},
        512: {"unfused": switched(B, A, {}), "winner": "unfused"},
    })


def test_sglang_gets_use_tma_for_the_tma_path_and_the_fastest_layer_it_runs_otherwise(tmp_path, monkeypatch, capsys):
    table_file = write(tmp_path / "tables", switch_table())
    status, stdout, err = run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--out", tmp_path / "out",
                                  "--table", table_file)
    assert status == 0, err
    folder = tmp_path / "out" / "triton_3_6_0"
    up = read_like_vllm_and_sglang(folder / "E=128,N=768,device_name=NVIDIA_H200.json")
    down = read_like_vllm_and_sglang(folder / "E=128,N=768,device_name=NVIDIA_H200_down.json")
    assert up == {1: C, 64: C, 256: A, 512: B}
    assert down == {1: {**C, "USE_TMA": True}, 64: {**C, "USE_TMA": True}, 256: B, 512: A}
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 2
    assert notes[0] == (f"note: {table_file}: M=1: the tuned layer runs split_k=4, which SGLang cannot: wrote the "
                        f"fastest layer SGLang runs that the tune measured (fused, sorted_rows, tma_weights, "
                        f"tma_activations: 25.0 us against 20.0 us)")
    assert "M=256: the tuned layer runs fuse_activation, which SGLang cannot, and no layer SGLang runs was measured" \
        in notes[1]


def test_vllm_gets_the_fastest_all_off_layer_of_the_unfused_variant(tmp_path, monkeypatch, capsys):
    table_file = write(tmp_path / "tables", switch_table())
    status, stdout, err = run_cli(monkeypatch, capsys, "export", "--format", "vllm", "--out", tmp_path / "out",
                                  "--table", table_file)
    assert status == 0, err
    configs = read_like_vllm_and_sglang(tmp_path / "out" / "E=128,N=768,device_name=NVIDIA_H200.json")
    assert configs == {1: B, 64: B, 256: A, 512: B}  # M=1: the plain unfused layer measured, not split-K's
    assert all("USE_TMA" not in value for value in configs.values())
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert [note.split(": ")[2] for note in notes] == ["M=1", "M=256"]


def test_a_bad_switch_candidate_is_named_with_file_and_key_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    table = switch_table()
    table["batch_sizes"][1]["switch_candidates"][2]["switches"] = {"split_k": 3}
    table_file = write(tmp_path / "tables", table)
    assert json.loads(table_file.read_text())["batch_sizes"]["1"]["switch_candidates"][2]["switches"]
    status, _, err = run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--out", tmp_path / "out",
                             "--table", table_file)
    assert status == 2 and err.count("\n") == 1
    assert f"bad table {table_file}: batch_sizes[1].switch_candidates[2].switches: split_k must be one of" in err
    assert not (tmp_path / "out").exists()


def test_the_ablation_script_reads_what_each_switch_earned_from_the_candidates(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation", script)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    table_file = write(tmp_path / "tables", switch_table())
    monkeypatch.setattr(sys, "argv", ["ablation.py", str(tmp_path / "tables"), "--json", str(tmp_path / "a.json")])
    assert ablation.main() == 0
    result = json.loads((tmp_path / "a.json").read_text())["tables"][0]
    assert result["table"] == str(table_file)
    # Only M=1 records candidates: split-K's 20 us against 25 us for the fastest layer without it.
    assert list(result["batch_sizes"]) == ["1"]
    assert result["bands"]["split_k"] == {"1-8": {"ratio": 1.25, "batch_sizes": 1}}
    assert result["bands"]["sorted_rows"]["1-8"]["ratio"] == 1.0
    assert "| E=128,N=768,K=2048,topk=8,bf16 | split_k | 1.250 (1) | - | - | - |" in capsys.readouterr().out
