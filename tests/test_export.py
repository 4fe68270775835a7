"""stp.export: merged LoRA models written in the base checkpoint's own layout (tiny / LLaDA / Dream), read back by
``stp.models.load`` with the same logits and, for LLaDA and Dream, by the independent float64 forward of
tests/_models_reference.py under the checkpoint's own key names; sharding, atomic writes and the error messages."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stp import export as ex
from stp.models import build_tiny, load, merge_adapter
from stp.models.base import weight_files
from stp.models.llada import llada_key, llada_name

from ._compare import assert_close
from ._models_reference import (
    DREAM_CONFIG,
    LLADA_CONFIG,
    dream_weights,
    llada_weights,
    reference_logits,
    write_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def _adapter(lm, directory: Path, seed: int, targets: list[str]) -> Path:
    """A LoRA adapter on `lm` with random, non-zero A and B (peft's default B = 0 would merge to nothing)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias="none"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(directory))
    return directory


def _ids(seed: int, bsz: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (bsz, length), generator=torch.Generator().manual_seed(seed))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in weight_files(directory):
        out.update(_tensors_of(file))
    return out


def _merged_logits(model: str, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    lm = merge_adapter(load(model, dtype=torch.float32), adapter)
    with torch.no_grad():
        return lm.logits(ids)


# ----------------------------------------------------------------------------------------------------- round trips


def test_tiny_round_trip(tmp_path: Path, seed: int) -> None:
    adapter = _adapter(build_tiny(seed=0), tmp_path / "adapter", seed, ["q_proj", "v_proj", "down_proj"])
    ids = _ids(seed, 2, 12, 100)
    want = _merged_logits("tiny", adapter, ids)
    with torch.no_grad():
        base = load("tiny").logits(ids)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the model: the test can tell a missed merge

    out = tmp_path / "export"
    assert ex.main(["--model", "tiny", "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["stp_family"] == "tiny" and config["mask_token_id"] == 2
    lm = load(str(out))
    assert lm.family == "tiny" and lm.dtype == torch.float32 and lm.tokenizer is not None
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.tokenizer("12+7=").input_ids == load("tiny").tokenizer("12+7=").input_ids
    with torch.no_grad():
        assert torch.equal(lm.logits(ids), want)  # float32 written, float32 read: bit for bit


@pytest.mark.parametrize("variant", ["release", "tied-unprefixed-qkv-bias"])
def test_llada_layout_round_trip(tmp_path: Path, seed: int, variant: str) -> None:
    cfg = dict(LLADA_CONFIG, torch_dtype="float32", auto_map={"AutoModel": "modeling_llada.LLaDAModelLM"})
    weights = llada_weights(cfg, seed)
    if variant != "release":  # GSAI-ML's keys start with "model."; a same-layout checkpoint may not
        cfg |= dict(weight_tying=True, include_qkv_bias=True)
        weights = {k.removeprefix("model."): v for k, v in weights.items() if k != "model.transformer.ff_out.weight"}
        g = torch.Generator().manual_seed(seed + 1)
        for i in range(cfg["n_layers"]):
            for proj, rows in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16)):
                weights[f"transformer.blocks.{i}.{proj}.bias"] = torch.randn(rows, generator=g) * 0.1
    base = write_checkpoint(tmp_path / "llada", cfg, weights, shards=2)
    (base / "modeling_llada.py").write_text("# the checkpoint's remote code\n")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = _adapter(load(str(base)), tmp_path / "adapter", seed, targets)
    ids = _ids(seed, 2, 13, cfg["vocab_size"])
    want = _merged_logits(str(base), adapter, ids)

    out = tmp_path / "export"
    assert ex.main(["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--max-shard-size", "40KB",
                    "--quiet"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    for s in shards:
        sizes = [t.numel() * t.element_size() for t in _tensors_of(out / s).values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1, (s, sizes)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(out).values())
    got = _tensors(out)
    assert set(got) == set(weights)  # LLaDA's own names, nothing more, nothing less
    assert json.loads((out / "config.json").read_text()) == cfg  # the base's config.json, field for field
    assert (out / "modeling_llada.py").read_text() == "# the checkpoint's remote code\n"
    for key in weights:  # the adapter reached the projections and nothing else
        changed = not torch.equal(got[key], weights[key])
        assert changed == any(f".{p}.weight" in key for p in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj",
                                                              "up_proj", "blocks.0.ff_out", "blocks.1.ff_out")), key

    lm = load(str(out))
    assert lm.family == "llada"
    with torch.no_grad():
        assert_close(lm.logits(ids), want, atol=1e-5, rtol=1e-5, what="LLaDA export reloaded vs merged")
    ref = reference_logits(got, layout="llada", cfg=cfg, ids=ids) if variant == "release" else None
    if ref is not None:  # the independent forward reads LLaDA's names (no qkv bias, no tying in the reference)
        assert_close(want, ref, atol=1e-4, rtol=1e-4, what="merged model vs reference forward of the export")


def _tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_llada_names_invert(tmp_path: Path) -> None:
    lm = load(str(write_checkpoint(tmp_path / "llada", LLADA_CONFIG, llada_weights(LLADA_CONFIG, 0))))
    for name, _ in lm.model.named_parameters():
        assert llada_key(llada_name(name)) == name
        assert llada_key(llada_name(name, prefix="")) == name
    with pytest.raises(ValueError, match="no place in a LLaDA checkpoint"):
        llada_name("model.layers.0.self_attn.rotary.weight")


def test_dream_round_trip_bf16(tmp_path: Path, seed: int) -> None:
    cfg = dict(DREAM_CONFIG, torch_dtype="bfloat16")
    weights = {k: v.to(torch.bfloat16) for k, v in dream_weights(cfg, seed).items()}
    base = write_checkpoint(tmp_path / "dream", cfg, weights)
    adapter = _adapter(load(str(base), dtype=torch.float32), tmp_path / "adapter", seed, ["q_proj", "up_proj"])
    ids = _ids(seed, 2, 11, cfg["vocab_size"])
    merged = merge_adapter(load(str(base), dtype=torch.float32), adapter)

    out = tmp_path / "export"
    assert ex.main(["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    got = _tensors(out)
    assert set(got) == set(weights) and all(t.dtype == torch.bfloat16 for t in got.values())
    # one rounding of the float32 merge to bf16 (the stored dtype)
    for name, p in merged.model.state_dict().items():
        assert torch.equal(got[name], p.to(torch.bfloat16)), name
    lm = load(str(out))
    assert lm.family == "dream" and lm.shift_logits and lm.dtype == torch.bfloat16
    ref = reference_logits(got, layout="dream", cfg=cfg, ids=ids)
    with torch.no_grad():
        assert_close(load(str(out), dtype=torch.float32).logits(ids), ref, atol=1e-4, rtol=1e-4,
                     what="Dream export vs reference forward (shifted logits)")
    assert json.loads((out / "config.json").read_text()) == cfg


def test_base_without_adapter_and_dtype(tmp_path: Path, seed: int) -> None:
    weights = llada_weights(LLADA_CONFIG, seed)
    base = write_checkpoint(tmp_path / "llada", LLADA_CONFIG, weights)
    out = tmp_path / "export"
    ex.export(str(base), out, dtype="bfloat16", progress=False)
    got = _tensors(out)
    assert set(got) == set(weights)
    assert all(torch.equal(got[k], weights[k].to(torch.bfloat16)) for k in weights)
    assert json.loads((out / "config.json").read_text()) == dict(LLADA_CONFIG, torch_dtype="bfloat16")


def test_saved_directory_round_trip(tmp_path: Path, seed: int) -> None:
    """A directory this project saved (as `pretrained:TASK` resolves to): transformers layout, config and tokenizer
    files copied from it."""
    base = tmp_path / "saved"
    build_tiny(seed=seed % 1000).save(base)
    adapter = _adapter(load(str(base)), tmp_path / "adapter", seed, ["k_proj", "gate_proj"])
    ids = _ids(seed, 2, 9, 100)
    want = _merged_logits(str(base), adapter, ids)
    out = tmp_path / "export"
    ex.export(str(base), out, adapter=adapter, progress=False)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    with torch.no_grad():
        assert torch.equal(load(str(out)).logits(ids), want)


def test_progress_messages_and_missing_code_warning(tmp_path: Path, capsys) -> None:
    cfg = dict(LLADA_CONFIG, auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                                       "AutoModel": "modeling_llada.LLaDAModelLM"})
    base = write_checkpoint(tmp_path / "llada", cfg, llada_weights(cfg, 0))
    ex.export(str(base), tmp_path / "export", max_shard_size="100KB")
    err = capsys.readouterr().err
    assert "loading" in err and "[1/" in err and "wrote" in err and "llada layout" in err
    assert "auto_map names ['configuration_llada.py', 'modeling_llada.py']" in err


# --------------------------------------------------------------------------------------------- writes and errors


def test_overwrite_and_atomic_failure(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ex.ExportError, match="not empty; pass --overwrite"):
        ex.export("tiny", out, progress=False)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        ex.export("tiny", out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # temporary directory removed
    monkeypatch.undo()
    ex.export("tiny", out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    (tmp_path / "empty").mkdir()
    ex.export("tiny", tmp_path / "empty", progress=False)  # an empty directory needs no --overwrite
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_errors_name_the_flag_and_path(tmp_path: Path, capsys) -> None:
    base = write_checkpoint(tmp_path / "llada", LLADA_CONFIG, llada_weights(LLADA_CONFIG, 0))
    out = str(tmp_path / "out")
    (tmp_path / "empty_adapter").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [
        (["--model", "tiny", "--adapter", str(tmp_path / "nope"), "--out", out], "--adapter .*nope.*no such directory"),
        (["--model", "tiny", "--adapter", str(tmp_path / "empty_adapter"), "--out", out],
         "empty_adapter.*no adapter_config.json"),
        (["--model", "tiny", "--adapter", str(tmp_path / "file"), "--out", out], "--adapter .*file.*is a file"),
        (["--model", "tiny", "--out", str(tmp_path / "file")], "--out .*file.*is a file"),
        (["--model", str(tmp_path / "missing"), "--out", out], "--model .*missing.*no such directory"),
        (["--model", str(base), "--out", str(base), "--overwrite"], "would replace --model"),
        (["--model", str(base), "--out", str(tmp_path), "--overwrite"], "would replace --model"),
        (["--model", "tiny", "--out", out, "--dtype", "int8"], "--dtype 'int8': allowed: auto, float32"),
        (["--model", "tiny", "--out", out, "--merge-dtype", "half"], "--merge-dtype 'half'"),
        (["--model", "tiny", "--out", out, "--max-shard-size", "5 parsecs"], "--max-shard-size '5 parsecs'"),
        (["--model", "tiny", "--out", out, "--max-shard-size", "0"], "must be positive"),
    ]
    for argv, pattern in cases:
        with pytest.raises(SystemExit) as e:
            ex.main([*argv, "--quiet"])
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert re.search(pattern, err), (argv, err)
    assert not Path(out).exists() and (base / "model.safetensors").is_file()


def test_adapter_of_another_model_names_the_directory(tmp_path: Path, capsys) -> None:
    adapter = _adapter(build_tiny(seed=0, hidden_size=64, intermediate_size=96), tmp_path / "adapter", 0,
                       ["q_proj"])
    with pytest.raises(SystemExit):
        ex.main(["--model", "tiny", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert f"--adapter '{adapter}'" in err and "does not fit the model" in err
    assert not (tmp_path / "out").exists()


def test_parse_size() -> None:
    assert ex.parse_size("5GB") == 5 * 10**9
    assert ex.parse_size("2GiB") == 2 * 2**30
    assert ex.parse_size("1.5 MB") == 1_500_000
    assert ex.parse_size("123") == 123


def test_help_exits_zero() -> None:
    res = subprocess.run([sys.executable, "-m", "stp.export", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--adapter" in res.stdout and "--max-shard-size" in res.stdout
