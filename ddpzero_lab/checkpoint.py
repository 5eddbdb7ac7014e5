"""Sharded checkpoints: each rank writes what it holds, one manifest commits the whole.

This module owns `save_checkpoint`, `load_checkpoint` and `consolidate_checkpoint`. A checkpoint
is stored as pieces of *logical* tensors: element ranges [start, end) of each flattened
parameter (its fp32 value: the master weights under bf16-mixed) and of each optimizer state
tensor (Adam's exp_avg, ...), as the ranks hold them. Replicated tensors are written once, by
rank 0; sharded ones by their owners. So a checkpoint does not depend on the world size or the
strategy that wrote it: loading assembles each logical tensor from its pieces and every rank
takes the slices it owns (reshard on load).

Atomicity: every rank writes its file into a hidden directory `.partial-<name>/`; after a
barrier rank 0 writes `manifest.json` (sizes and SHA-256 of every file) into it, renames the
directory to `<name>/` and then points `latest` at it (written to a temporary file and renamed).
A save that dies half-way leaves only a `.partial-` directory, which loading never reads; the
previous checkpoint and `latest` are untouched. Files load with `torch.load(weights_only=True)`:
no pickled code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .parallel.flat import FlatLayout
from .parallel.strategy import strategy_of
from .parallel.zero import ZeroShardedOptimizer

FORMAT = "ddpzero_lab-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or from another model."""


@dataclass
class _Group:
    """Parameters laid out in one flat buffer of which this rank holds [lo, hi)."""

    names: list[str]
    layout: FlatLayout
    lo: int
    hi: int
    values: torch.Tensor  # the authoritative (fp32) values of [lo, hi)
    copies: list[torch.Tensor]  # compute-dtype tensors to refresh from `values` after a load
    state_keys: list[Any]  # per tensor, the optimizer's key for its state (None: no state):
    # for sharded strategies the leaf of this rank's piece of it
    writer: bool  # whether this rank writes the group (replicated groups: rank 0 only)
    full_target: torch.Tensor | None = None  # a whole flat buffer every rank holds (ZeRO-1/2)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _refuse_hybrid_sharding(model: nn.Module, optimizer) -> None:
    record = strategy_of(model)
    for owner in (optimizer, record.engine if record is not None else None):
        reducer = getattr(owner, "reducer", None)
        if getattr(reducer, "replicate_group", None) is not None:
            raise CheckpointError(
                "checkpoints of hybrid sharding (replicate_group=) are not written here: "
                "every replica holds the same shards, and the format has one writer per "
                "piece; save dzl.full_state_dict(model) from one rank instead"
            )


def _groups(model: nn.Module, optimizer) -> list[_Group]:
    module = getattr(model, "module", model)
    names = {id(p): n for n, p in module.named_parameters()}
    rank, _ = _rank_world()
    record = strategy_of(model)
    engine = record.engine if record is not None else None
    if engine is not None:  # ZeRO-3: every unit's flats
        return [
            _Group(
                [n for n, _ in f.params],
                f.layout,
                f.lo,
                f.hi,
                f.master,
                [f.local] if f.local is not f.master else [],
                list(f.leaves) if f.trainable else [None] * len(f.params),
                True,
            )
            for u in engine.units
            for f in u.flats
        ]
    groups = []
    covered: set[int] = set()
    if isinstance(optimizer, ZeroShardedOptimizer):  # ZeRO-1/2
        for (bucket, leaves), shard in zip(optimizer.sharded(), optimizer.shards, strict=True):
            groups.append(
                _Group(
                    [n for n, _ in bucket.params],
                    bucket.layout,
                    bucket.lo,
                    bucket.hi,
                    shard,
                    [],
                    leaves,
                    True,
                    bucket.data,  # the parameters are views into it: all of it is loaded
                )
            )
            covered.update(id(p) for _, p in bucket.params)
    # bf16-mixed replicated strategies: the optimizer steps fp32 masters of the parameters
    masters = {}
    if hasattr(optimizer, "masters"):
        masters = dict(zip(map(id, optimizer.params), optimizer.masters, strict=True))
    frozen = record.frozen_masters if record is not None else {}
    for p in module.parameters():  # replicated: one group per parameter, written by rank 0
        if id(p) in covered:
            continue
        master = masters.get(id(p), frozen.get(id(p)))
        values = (master if master is not None else p).detach().view(-1)
        layout = FlatLayout.of([p])
        key = master if master is not None and p.requires_grad else p
        groups.append(
            _Group(
                [names[id(p)]],
                layout,
                0,
                p.numel(),
                values,
                [p.detach().view(-1)] if master is not None else [],
                [key if p.requires_grad else None],
                rank == 0,
            )
        )
    return groups


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


# -- saving -----------------------------------------------------------------------------------
def _pieces(groups: list[_Group], optimizer) -> dict[str, list]:
    """{logical key: [(start, end, tensor)]} of what this rank writes."""
    inner = _inner(optimizer)
    state = inner.state if inner is not None else {}
    out: dict[str, list] = {}
    for g in groups:
        if not g.writer:
            continue
        for index, name in enumerate(g.names):
            span = g.layout.overlap(index, g.lo, g.hi)
            if span is None:
                continue
            key_tensor = g.state_keys[index]
            param_state = state.get(key_tensor, {}) if key_tensor is not None else {}
            begin = g.layout.offsets[index]
            a, b = span[0] - g.lo, span[1] - g.lo
            where = (span[0] - begin, span[1] - begin)
            out.setdefault(f"param/{name}", []).append((*where, g.values.detach()[a:b].clone()))
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # one value per element
                    piece = value.detach().reshape(-1).clone()  # this rank's piece of it
                    out.setdefault(f"optim/{name}/{key}", []).append((*where, piece))
                else:  # a counter such as Adam's step
                    scalar = value.item() if isinstance(value, torch.Tensor) else value
                    out.setdefault(f"scalar/{name}/{key}", []).append(scalar)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_shard(pieces: dict, path: Path) -> None:
    """Write one rank's file: a temporary name first, then rename (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(pieces, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        from . import comm

        comm.barrier(tag="checkpoint")


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer=None,
    step: int | None = None,
    scaler=None,
    **extra,
) -> Path:
    """Save model and optimizer state under `directory` (call on every rank alike); returns
    the checkpoint's directory. `scaler`: a dzl.GradScaler (or torch's) whose loss scale and
    growth schedule are saved too (fp16 resumes with the scale it had). `extra`: small JSON
    values kept in the manifest."""
    directory = Path(directory)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    json.dumps(extra)  # refuse what the manifest cannot hold, before writing anything
    _refuse_hybrid_sharding(model, optimizer)
    rank, world_size = _rank_world()
    module = getattr(model, "module", model)
    name = f"step-{step:08d}" if step is not None else "checkpoint"
    partial, final = directory / f".partial-{name}", directory / name
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by a save that died: never read, safe to drop
        partial.mkdir()
    _barrier()
    groups = _groups(model, optimizer)
    pieces = _pieces(groups, optimizer)
    if rank == 0:
        pieces["buffer"] = {k: v.detach().clone() for k, v in module.named_buffers()}
    _write_shard(pieces, partial / f"rank-{rank:05d}.pt")
    _barrier()
    if rank == 0:
        files = sorted(p.name for p in partial.glob("rank-*.pt"))
        if len(files) != world_size:
            raise CheckpointError(f"expected {world_size} shard files, found {len(files)}")
        # shapes from the layouts, the authority for every strategy's flat buffers
        params = {
            name: {"shape": list(shape)}
            for g in groups
            for name, shape in zip(g.names, g.layout.shapes, strict=True)
        }
        aliases = {n: first for n, first in _aliases(module).items() if n != first}
        inner = _inner(optimizer)
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": world_size,
            "files": {
                f: {"bytes": (partial / f).stat().st_size, "sha256": _sha256(partial / f)}
                for f in files
            },
            "params": params,
            "aliases": aliases,
            "optimizer": type(inner).__name__ if inner is not None else None,
            "param_groups": _hyperparameters(inner),
            "scaler": _scaler_state(scaler),
            "extra": extra,
        }
        tmp = partial / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, partial / "manifest.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        latest = directory / "latest.tmp"
        latest.write_text(name)
        os.replace(latest, directory / "latest")
    _barrier()
    return final


def _logical_params(module: nn.Module):
    return list(module.named_parameters())  # tied weights: once, under their first name


def _aliases(module: nn.Module) -> dict[str, str]:
    first = {id(p): n for n, p in module.named_parameters()}
    return {n: first[id(p)] for n, p in module.named_parameters(remove_duplicate=False)}


def _hyperparameters(inner) -> list[dict]:
    if inner is None or not hasattr(inner, "param_groups"):
        return []
    out = []
    for group in inner.param_groups:
        plain = {}
        for k, v in group.items():
            if k == "params":
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            try:
                json.dumps(v)
            except TypeError:
                continue
            plain[k] = v
        out.append(plain)
    return out


# -- loading ----------------------------------------------------------------------------------
def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if (path / "manifest.json").exists():
        return path
    if (path / "latest").exists():
        name = (path / "latest").read_text().strip()
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{path / 'latest'} names {name!r}, not a checkpoint here")
        return _resolve(path / name)
    raise CheckpointError(
        f"{path} holds no manifest.json and no 'latest': not a complete checkpoint (a save "
        "that died before it committed leaves only a .partial- directory, never loaded)"
    )


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, Any]]:
    """(manifest, {key: full logical tensor or scalar}) of a checkpoint, validated: every
    file's size and SHA-256 match the manifest and every element of every tensor is present."""
    root = _resolve(Path(path))
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root / 'manifest.json'} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{root} is not a {FORMAT} checkpoint")
    pieces: dict[str, list] = {}
    buffers: dict[str, torch.Tensor] = {}
    for fname, meta in manifest["files"].items():
        file = root / fname
        if Path(fname).name != fname or not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file} is truncated or corrupt (size or SHA-256 differ)")
        try:
            content = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{file} does not load safely: {exc}") from exc
        buffers.update(content.pop("buffer", {}))
        for key, items in content.items():
            pieces.setdefault(key, []).extend(items)
    full: dict[str, Any] = {}
    for name, meta in manifest["params"].items():
        numel = 1
        for d in meta["shape"]:
            numel *= d
        for key in [k for k in pieces if k == f"param/{name}" or k.startswith(f"optim/{name}/")]:
            full[key] = _assemble(key, pieces[key], numel, meta["shape"])
        for key in [k for k in pieces if k.startswith(f"scalar/{name}/")]:
            full[key] = pieces[key][0]
        if f"param/{name}" not in full:
            raise CheckpointError(f"the checkpoint has no value for parameter {name}")
    for key, value in buffers.items():
        full[f"buffer/{key}"] = value
    return manifest, full


def _assemble(key: str, items: list, numel: int, shape) -> torch.Tensor:
    first = items[0][2]
    out = torch.empty(numel, dtype=first.dtype)
    seen = torch.zeros(numel, dtype=torch.bool)
    for start, end, piece in items:
        out[start:end] = piece
        seen[start:end] = True
    if not bool(seen.all()):
        raise CheckpointError(f"{key}: the checkpoint's pieces do not cover the whole tensor")
    return out.view(shape)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scaler=None) -> dict:
    """Restore model and optimizer state from a checkpoint written by save_checkpoint, at any
    world size and with any strategy (call on every rank alike); and the GradScaler's state
    into `scaler`, if given. `path`: the directory given to save_checkpoint (its latest
    checkpoint) or one checkpoint's directory. Returns {"step", "world_size", "extra"} of
    the checkpoint. Nothing changes if it is refused."""
    _refuse_hybrid_sharding(model, optimizer)
    manifest, full = read_checkpoint(path)
    if scaler is not None and not manifest.get("scaler"):
        raise CheckpointError(
            "load_checkpoint(..., scaler=) but this checkpoint holds no loss-scaler state: "
            "save with dzl.save_checkpoint(..., scaler=scaler), or load without scaler="
        )
    module = getattr(model, "module", model)
    mine = {n for n, _ in _logical_params(module)}
    if set(mine) != set(manifest["params"]):
        missing = sorted(set(manifest["params"]) ^ set(mine))[:5]
        raise CheckpointError(
            f"the checkpoint is of another model: parameter names differ ({', '.join(missing)})"
        )
    groups = _groups(model, optimizer)
    for g in groups:  # check every shape before changing anything
        for name, shape in zip(g.names, g.layout.shapes, strict=True):
            if list(shape) != manifest["params"][name]["shape"]:
                raise CheckpointError(
                    f"the checkpoint is of another model: {name} has shape "
                    f"{manifest['params'][name]['shape']} there, {list(shape)} here"
                )
    inner = _inner(optimizer)
    saved_class = manifest.get("optimizer")
    if inner is not None and saved_class not in (None, type(inner).__name__):
        raise CheckpointError(
            f"the checkpoint's optimizer is {saved_class}, this one is {type(inner).__name__}"
        )
    with torch.no_grad():
        for g in groups:
            _load_group(g, full, inner)
        for name, buffer in module.named_buffers():
            saved = full.get(f"buffer/{name}")
            if saved is not None:
                buffer.copy_(saved)
        if inner is not None:
            for group, saved in zip(inner.param_groups, manifest["param_groups"], strict=False):
                group.update(saved)
    if scaler is not None:
        scaler.load_state_dict(manifest["scaler"])
    return {"step": manifest["step"], "world_size": manifest["world_size"], **manifest["extra"]}


def _scaler_state(scaler) -> dict | None:
    """A loss scaler's state as JSON numbers (torch's GradScaler keeps a tensor or two)."""
    if scaler is None:
        return None
    state = scaler.state_dict()
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _load_group(g: _Group, full: dict, inner) -> None:
    flat = torch.zeros(g.layout.padded_numel, dtype=g.values.dtype)
    for index, name in enumerate(g.names):
        begin, numel = g.layout.offsets[index], int(g.layout.shapes[index].numel())
        flat[begin : begin + numel] = full[f"param/{name}"].reshape(-1)
    if g.full_target is not None:
        g.full_target.copy_(flat)
    g.values.copy_(flat[g.lo : g.hi].view_as(g.values))
    for copy in g.copies:
        copy.copy_(g.values.view_as(copy))
    if inner is None:
        return
    for index, name in enumerate(g.names):
        key_tensor = g.state_keys[index]  # the optimizer's tensor: its state has its shape
        if key_tensor is None:
            continue
        span = g.layout.overlap(index, g.lo, g.hi)
        begin = g.layout.offsets[index]
        start, end = (span[0] - begin, span[1] - begin) if span is not None else (0, 0)
        entry: dict[str, Any] = {}
        for key, value in full.items():
            if key.startswith(f"optim/{name}/"):
                piece = value.reshape(-1)[start:end].to(key_tensor.device)
                entry[key.rsplit("/", 1)[1]] = piece.view_as(key_tensor).clone()
            elif key.startswith(f"scalar/{name}/"):
                state = key.rsplit("/", 1)[1]
                entry[state] = (
                    torch.tensor(value, dtype=torch.float32) if state == "step" else value
                )
        if entry:
            inner.state[key_tensor] = entry
        else:
            inner.state.pop(key_tensor, None)


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's parameters and buffers as one plain state_dict file (torch.save),
    keyed as the model's state_dict() (tied weights under each of their names)."""
    manifest, full = read_checkpoint(path)
    state = {name: full[f"param/{name}"].clone() for name in manifest["params"]}
    for alias, first in manifest.get("aliases", {}).items():
        state[alias] = state[first]
    for key, value in full.items():
        if key.startswith("buffer/"):
            state[key[len("buffer/") :]] = value
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out
