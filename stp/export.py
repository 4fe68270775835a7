"""``python -m stp.export --model BASE [--adapter DIR] --out DIR``: a merged model in its checkpoint's own layout.

Training keeps the base frozen and writes a LoRA adapter (``runs/<preset>/adapter``). The field's tools do not read
adapters or this project's internal model class: LLaDA's ``generate.py`` and lm-evaluation-harness load LLaDA through
its own remote code (``AutoModel.from_pretrained(..., trust_remote_code=True)``), which expects LLaDA's parameter
names (``model.transformer.blocks.N.q_proj.weight`` ...) and LLaDA's config.json. So the export folds the adapter into
the weights (``stp.models.merge_adapter``) and writes them back under the base checkpoint's names:

- LLaDA base: the inverse of ``stp.models.llada``'s renaming (``llada_name``), the base's config.json unchanged
  except for its dtype field, and the base's remote-code ``*.py`` files when it has them;
- Dream base: Qwen2 names (Dream's own), the base's config.json and code files;
- the tiny model, ``pretrained:TASK`` and directories saved by this project: the transformers Llama/Qwen2 layout
  with the ``stp_*`` and mask-token fields in config.json, as ``DiffusionLM.save`` writes it;

plus the base's tokenizer files copied byte for byte (a tokenizer re-saved by another transformers version may not
load in an older one). Weights are safetensors: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards
of at most ``--max-shard-size`` with ``model.safetensors.index.json`` (transformers' naming). ``stp.models.load`` of
the result gives the same logits as the base with the adapter merged (tested).

The adapter is merged in float32 by default (``--merge-dtype``): W + scale * B A is rounded once, to the output dtype
(``--dtype``, by default the base checkpoint's stored dtype). An 8B base then needs ~32 GB of memory during the
export; ``--merge-dtype auto`` merges in the stored dtype (half that for bfloat16, one extra rounding).

Everything is written into a temporary directory next to ``--out`` and renamed into place at the end, so ``--out``
is either absent, the old content (``--overwrite``), or complete. Exit status: 0 written; 2 bad flags or inputs (the
message names the flag, the directory or the file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from stp.files import fsync_dir

__all__ = ["export", "ExportError", "main", "parse_size", "adapter_base", "record_adapter_base"]

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Tokenizer and generation files copied from the base directory when present (remote code: every top-level *.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class ExportError(ValueError):
    """A bad flag or input; the message names the flag, the directory or the file."""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123' (bytes) -> bytes."""
    m = _SIZE_RE.fullmatch(str(text))
    if m is None:
        raise ExportError(f"--max-shard-size {text!r}: not a size; allowed e.g. 5GB, 500MB, 2GiB or a byte count")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if value <= 0:
        raise ExportError(f"--max-shard-size {text!r}: must be positive")
    return value


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"stp.export: {message}", file=sys.stderr, flush=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------------------------------------------ checks


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _check_adapter(adapter: str | None) -> Path | None:
    if adapter is None:
        return None
    directory = Path(adapter).expanduser()
    if not directory.exists():
        raise ExportError(f"--adapter {adapter!r}: no such directory")
    if not directory.is_dir():
        raise ExportError(f"--adapter {adapter!r}: is a file; expected the 'adapter' directory of a "
                          f"`python -m stp.train` run (adapter_config.json + adapter_model.safetensors)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / name).is_file():
            raise ExportError(f"--adapter {adapter!r}: no {name} in that directory (expected the 'adapter' "
                              f"directory of a `python -m stp.train` run; only safetensors adapters are read)")
    return directory


def _check_out(out: str, overwrite: bool) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out {out!r}: exists and is a file; give a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(f"--out {out!r}: directory exists and is not empty; pass --overwrite to replace it")
    return path


def record_adapter_base(adapter_dir: Path, base: str) -> None:
    """Write the base model's name into an adapter's adapter_config.json (``base_model_name_or_path``: peft leaves
    it null for a model it did not load itself). Set after peft's save, whose vocabulary check would otherwise look
    the name up on the Hub; the file is replaced atomically."""
    from stp.files import write_atomic

    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    write_atomic(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter was trained from: its run's config.yaml (``model.name_or_path``, beside the
    adapter directory), else adapter_config.json's ``base_model_name_or_path``; None when neither names one."""
    config = adapter_dir.expanduser().resolve().parent / "config.yaml"
    if config.is_file():
        import yaml

        try:
            name = ((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model") or {}).get("name_or_path")
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise ExportError(f"{config}: the run's config.yaml could not be read ({e})") from e
        if isinstance(name, str) and name:
            return name
    try:
        name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def _check_not_adapter(model: str) -> None:
    """A LoRA adapter or a run directory given as --model: say which flag takes it."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ExportError(f"--model {model!r} is a LoRA adapter, not a model; pass it as --adapter {model} (the "
                              f"base then comes from its run's config.yaml, or give it as --model)")
        if (path / "adapter" / "adapter_config.json").is_file():
            raise ExportError(f"--model {model!r} is a training run's directory; pass --adapter {path / 'adapter'}")


def _base_directory(model: str) -> Path | None:
    """The directory `stp.models.load(model)` reads (None for the in-code tiny model)."""
    from stp.models.loading import resolve_directory

    if model == "tiny":
        return None
    if model.startswith("pretrained:"):
        from stp.pretrain import resolve_model_name

        return Path(resolve_model_name(model))
    return resolve_directory(model)


def _layout(base_dir: Path | None) -> tuple[str, dict | None]:
    """('llada' | 'dream' | 'transformers', the base's config.json or None)."""
    from stp.models import dream, llada
    from stp.models.base import read_config

    if base_dir is None:
        return "transformers", None
    config = read_config(base_dir)
    if llada.is_llada(config):
        return "llada", config
    if dream.is_dream(config):
        return "dream", config
    return "transformers", config


# ------------------------------------------------------------------------------------------------ tensors


def _checkpoint_keys(files: Sequence[Path]) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys.extend(f.keys())
    return keys


def layout_tensors(lm, layout: str, base_config: dict | None = None, base_dir: Path | None = None
                   ) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint layout's names (tied heads once, as the embedding).

    LLaDA: ``llada_name`` of every Llama parameter, with the base's own key prefix (``model.`` or none, read from the
    base checkpoint); the zero output-projection bias that the Llama form adds for ``include_qkv_bias`` without
    ``include_bias`` is dropped (it has no place in LLaDA, and must still be zero: LoRA does not train biases)."""
    from stp.models.base import weight_files
    from stp.models.llada import llada_name

    model = lm.model
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if layout != "llada":
        return state
    prefix = "model."
    if base_dir is not None:
        keys = _checkpoint_keys(weight_files(base_dir))
        prefix = "model." if any(k.startswith("model.transformer.") for k in keys) else ""
    has_out_bias = bool((base_config or {}).get("include_bias", False))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.o_proj\.bias", name) and not has_out_bias:
            if torch.count_nonzero(tensor):
                raise ExportError(f"{name} is not zero, but the LLaDA config (include_bias=False) has no output-"
                                  f"projection bias to hold it")
            continue
        out[llada_name(name, prefix=prefix)] = tensor
    return out


def _shard_plan(tensors: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Consecutive names grouped into shards of at most max_bytes (a larger single tensor gets a shard alone)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * item
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, *, dtype: torch.dtype, max_shard_bytes: int,
                  progress: bool = False) -> list[Path]:
    """safetensors files into `directory`: one ``model.safetensors``, or shards + ``model.safetensors.index.json``.
    Floating tensors are cast to `dtype` one shard at a time (peak extra memory: one shard)."""
    from safetensors.torch import save_file

    plan = _shard_plan(tensors, dtype, max_shard_bytes)
    n = len(plan)
    written, weight_map, total = [], {}, 0
    for i, names in enumerate(plan):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {}
        for key in names:
            t = tensors[key].detach()
            part[key] = (t.to(device="cpu", dtype=dtype) if t.is_floating_point() else t.cpu()).contiguous()
        size = sum(t.numel() * t.element_size() for t in part.values())
        _say(progress, f"writing {name} ({len(part)} tensors, {_gb(size)}){f' [{i + 1}/{n}]' if n > 1 else ''}")
        save_file(part, str(directory / name), metadata={"format": "pt"})
        _fsync_file(directory / name)
        written.append(directory / name)
        weight_map.update(dict.fromkeys(part, name))
        total += size
        del part
    if n > 1:
        index = directory / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        _fsync_file(index)
        written.append(index)
    return written


# ------------------------------------------------------------------------------------------ config, tokenizer


def _write_config(lm, base_config: dict | None, directory: Path, dtype: torch.dtype) -> None:
    """The base's config.json (its own field names) with the dtype field set; for the in-code tiny model, the
    transformers config that `DiffusionLM.save` would write."""
    if base_config is None:
        lm.model.config.save_pretrained(str(directory))
        config = json.loads((directory / "config.json").read_text())
    else:
        config = dict(base_config)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = DTYPE_NAMES[dtype]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _fsync_file(directory / "config.json")


def _copy_side_files(lm, base_dir: Path | None, base_config: dict | None, directory: Path, progress: bool) -> None:
    """Tokenizer, generation config and remote-code files of the base, copied as they are."""
    if base_dir is None:
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(directory))
        return
    copied = []
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, directory / name)
            copied.append(name)
    code = sorted(p.name for p in base_dir.glob("*.py") if p.is_file())
    for name in code:
        shutil.copyfile(base_dir / name, directory / name)
    if not any(n.startswith("tokenizer") or n == "vocab.json" for n in copied):
        _say(progress, f"note: {base_dir} has no tokenizer files; the export has none either")
    auto_map = (base_config or {}).get("auto_map") or {}
    wanted = sorted({str(v).split(".")[0] + ".py" for v in _flat(auto_map.values()) if "--" not in str(v)})
    missing = [n for n in wanted if not (directory / n).is_file()]
    if missing:
        print(f"stp.export: warning: config.json's auto_map names {missing}, which {base_dir} does not hold; "
              f"copy them from the original model repository into the export for trust_remote_code loaders "
              f"(LLaDA's generate.py, lm-evaluation-harness)", file=sys.stderr, flush=True)


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from (x for x in v if x)
        elif v:
            yield v


# ---------------------------------------------------------------------------------------------------- export


def export(model: str | None, out: str | os.PathLike, *, adapter: str | os.PathLike | None = None, dtype: str = "auto",
           merge_dtype: str = "float32", max_shard_size: str | int = "5GB", overwrite: bool = False,
           device: str = "cpu", progress: bool = True) -> Path:
    """Write `model` (+ the merged LoRA `adapter`) to `out` in the base checkpoint's own layout; returns `out`.

    `model`: what ``stp.models.load`` accepts ('tiny', 'pretrained:TASK', a directory, a Hub id); None: the base
    the adapter's run trained from (``adapter_base``). `dtype`: output
    dtype ('auto' = the base's stored dtype). `merge_dtype`: dtype the model is loaded and merged in. Raises
    ExportError (bad flags, paths) before any model loads, when it can be known then."""
    from stp import models

    for flag, value in (("--dtype", dtype), ("--merge-dtype", merge_dtype)):
        if value not in DTYPES:
            raise ExportError(f"{flag} {value!r}: allowed: {', '.join(DTYPES)}")
    max_bytes = parse_size(str(max_shard_size))
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"--device {device!r}: not a torch device ({e}); allowed e.g. cpu, cuda, cuda:1") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"--device {device!r}: CUDA is not available here; allowed: cpu")
    adapter_dir = _check_adapter(None if adapter is None else str(adapter))
    out_dir = _check_out(str(out), overwrite)
    if model is None:
        model = adapter_base(adapter_dir) if adapter_dir is not None else None
        if model is None:
            raise ExportError("--model is required (without it, --adapter must be the 'adapter' directory of a "
                              "`python -m stp.train` run, whose config.yaml or adapter_config.json names the base)")
        _say(progress, f"base model {model!r} (from the adapter's run)")
    _check_not_adapter(model)
    try:
        base_dir = _base_directory(model)
        layout, base_config = _layout(base_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"--model {model!r}: {e}") from e
    resolved_out = out_dir.resolve()
    for flag, path in (("--model", base_dir), ("--adapter", adapter_dir)):
        if path is not None and _inside(path.resolve(), resolved_out):
            raise ExportError(f"--out {str(out)!r} would replace {flag} {str(path)!r} (it is that directory or holds "
                              f"it); write the export elsewhere")

    from stp.models.base import stored_dtype, weight_files

    out_dtype = DTYPES[dtype] or (stored_dtype(weight_files(base_dir)) if base_dir is not None else torch.float32)
    load_dtype = DTYPES[merge_dtype] or out_dtype
    _say(progress, f"loading {model!r} ({layout} layout) in {DTYPE_NAMES[load_dtype]} on {dev}")
    try:  # the resolved directory: 'pretrained:TASK' is a name of this project, not of stp.models.load
        lm = models.load(model if base_dir is None else str(base_dir), dtype=load_dtype, device=dev)
    except (OSError, ValueError, NotImplementedError) as e:
        raise ExportError(f"--model {model!r}: {e}") from e
    if adapter_dir is not None:
        _say(progress, f"merging the adapter {str(adapter_dir)!r}")
        try:
            models.merge_adapter(lm, adapter_dir)
        except ValueError as e:
            raise ExportError(f"--adapter {str(adapter)!r}: {e}") from e
    tensors = layout_tensors(lm, layout, base_config, base_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.export-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_weights(tensors, tmp, dtype=out_dtype, max_shard_bytes=max_bytes, progress=progress)
        _write_config(lm, base_config, tmp, out_dtype)
        _copy_side_files(lm, base_dir, base_config, tmp, progress)
        fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.export-old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(t.numel() for t in tensors.values())
    _say(progress, f"wrote {len(tensors)} tensors ({total / 1e6:.1f} M parameters, {DTYPE_NAMES[out_dtype]}, "
                   f"{layout} layout) to {out_dir}")
    return out_dir


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stp.export",
        description="Merge a LoRA adapter into its base and write the model in the base checkpoint's own layout "
                    "(LLaDA's names and config for LLaDA, Dream's for Dream, transformers' for the tiny model) with "
                    "its tokenizer files, as safetensors, for LLaDA's generate.py, lm-evaluation-harness and "
                    "transformers.")
    p.add_argument("--model", default=None, help="the base: 'tiny', 'pretrained:TASK', a local model directory, "
                                                 "or a Hub id [the base the --adapter's run trained from]")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory to merge (the 'adapter' directory of a `python -m stp.train` run); "
                        "omit to export the base as it is")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (absent or empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--dtype", default="auto", help=f"output dtype, one of: {', '.join(DTYPES)} [auto = the base's]")
    p.add_argument("--merge-dtype", default="float32",
                   help=f"dtype the base is loaded and merged in, one of: {', '.join(DTYPES)} [float32: one "
                        f"rounding to the output dtype; auto = the output dtype, half the memory for bf16]")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB, 2GiB [5GB]")
    p.add_argument("--device", default="cpu", help="device the merge runs on [cpu]")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from stp.policy import quiet_known_warnings

    quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        export(args.model, args.out, adapter=args.adapter, dtype=args.dtype, merge_dtype=args.merge_dtype,
               max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=args.device,
               progress=not args.quiet)
    except ExportError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
