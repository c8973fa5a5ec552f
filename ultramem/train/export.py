"""Export a training checkpoint as one consolidated file for inference, and load it back.

    python -m ultramem.train.export --checkpoint outputs/debug/checkpoints/step_00000100 --out model.safetensors

The checkpoint may have been written by any number of ranks, FSDP-sharded or not: DCP
reassembles each tensor whole. The file holds the model's state dict (parameters and the memory
layers' persistent buffers: u, v, the permutation) and, in its metadata, the model config, so
`load_exported(path)` rebuilds the model with no other file. `.safetensors`, or `.pt` / `.pth`
(torch.save), by suffix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ultramem.config import ConfigError, ModelConfig
from ultramem.model import Transformer, build_model

from .checkpoint import _quiet_single_process, read_meta, reading, resolve_checkpoint
from .config import TrainConfig, _build

FORMAT = "ultramem-model/1"
SUFFIXES = (".safetensors", ".pt", ".pth")


def _unflatten(flat: dict) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def checkpoint_config(path: str | Path) -> TrainConfig:
    """The config a checkpoint was made with (from its config.json)."""
    meta_file = Path(path) / "config.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r}: no config.json (is it a checkpoint directory step_NNNNNNNN?)"
        )
    nested = _unflatten(read_meta(meta_file)["config"])
    return _build(TrainConfig, {k: v for k, v in nested.items() if k in TrainConfig.__dataclass_fields__}, "")


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, TrainConfig]:
    """The model of a training checkpoint, whole, on `device`, in eval mode."""
    path = resolve_checkpoint(path)
    cfg = checkpoint_config(path)
    model = build_model(cfg.model, device="cpu", seed=None)
    state = {"model": model.state_dict()}
    with _quiet_single_process(), reading("checkpoint", path):
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    model.init_buffers()
    return model.to(device).eval(), cfg


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    out = Path(out)
    if out.is_dir():
        example = str(out / "model.safetensors")
        raise ValueError(f"--out {str(out)!r} is a directory; give the file to write, e.g. {example!r}")
    _check_suffix(out, "--out")
    model, cfg = load_checkpoint_model(checkpoint)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = json.dumps(_model_config_dict(cfg.model))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": FORMAT, "model_config": config})
    else:
        torch.save({"format": FORMAT, "model_config": config, "state_dict": state}, tmp)
    tmp.replace(out)
    return out


def _check_suffix(path: Path, what: str) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(
            f"{what} {str(path)!r}: the suffix picks the format, one of {', '.join(SUFFIXES)} "
            f"(.pt and .pth: torch.save), got {path.suffix or 'none'!r}"
        )


def _model_config_dict(cfg: ModelConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the model an `export` file holds, in eval mode."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"exported model {str(path)!r} is a directory: a training checkpoint loads with "
            f"load_checkpoint_model, an export is one file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r}: no such file")
    _check_suffix(path, "exported model")
    with reading("exported model", path):
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            meta, state = (blob, blob.get("state_dict", {})) if isinstance(blob, dict) else ({}, {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an ultramem export (format {meta.get('format')!r}, want {FORMAT!r})")
    with reading("exported model", path):
        cfg = _build(ModelConfig, json.loads(meta["model_config"]), "model.")
    model = build_model(cfg, device="cpu", seed=None)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.init_buffers()
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ultramem.train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory (step_NNNNNNNN), or a run / checkpoints directory: its latest",
    )
    parser.add_argument("--out", required=True, help="output file: .safetensors, or .pt / .pth for torch.save")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="floating-point tensors are written in this dtype (default float32)",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, getattr(torch, args.dtype))
    except (FileNotFoundError, ConfigError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
