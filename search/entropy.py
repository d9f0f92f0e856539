"""BLT's entropy model: train it, cache its entropies per data set, tune the patching threshold.

    python -m search.entropy train [--size tiny] [--budget 10m] [--data SPEC] --out DIR
    python -m search.entropy cache DIR [--data SPEC] [--split val] [--max-bytes N]
    python -m search.entropy tune DIR --target 4.5 [--rule global] [--data SPEC]

`train` fits `graphs/blt_entropy.yaml` with the ordinary trainer and writes DIR/graph.yaml (the
resolved graph) and DIR/model.safetensors: the folder `patch_entropy`'s `model:` names. `cache`
scores every byte of a split once, each shard in windows of the model's context from the shard's
start, and stores the entropies (float16) as DIR/entropies/<data hash>-<split>-shards.npy. A
training run whose `patch_entropy` names DIR reads the train split's cache through its loader
(search/setup.py) and runs no entropy model per step; when the training window is a multiple of
the model's context, the cached entropies are those the model would compute on the batch.
`tune` bisects the threshold until the mean patch length on the cached entropies hits
the target (issue #141 of the reference: always check the resulting patch length).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from blocks.blt_patch import entropies, entropy_starts, load_entropy_model

GRAPH = Path(__file__).resolve().parent.parent / "graphs" / "blt_entropy.yaml"


def train(out: str, size: str | None = "tiny", budget_s: float = 60.0, data: str | None = None,
          sets: tuple = (), seed: int = 0, **kw) -> Path:
    """Train the entropy LM and export it to `out` (graph.yaml + model.safetensors)."""
    import graphs
    from search import checkpoint
    from search.setup import RunConfig
    from search.train import run_training
    cfg = RunConfig(str(GRAPH), size=size, sets=tuple(sets), budget_s=budget_s, data=data, seed=seed,
                    checkpoint_every_s=0.0, experiment="blt_entropy", **kw)
    result = run_training(cfg)
    if result.status != "completed":
        raise RuntimeError(f"entropy model training {result.status}: {result.message}")
    ckpt = checkpoint.latest(Path(result.run_dir))
    if ckpt is None:
        raise RuntimeError(f"no checkpoint in {result.run_dir}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    g = graphs.load(GRAPH, size, sets).resolve()
    (folder / "graph.yaml").write_text(yaml.safe_dump(g.data, sort_keys=False))
    shutil.copyfile(ckpt / "model.safetensors", folder / "model.safetensors")
    (folder / "val.txt").write_text(f"val_bpb {result.val_bpb}\nval_loss {result.val_loss}\n")
    return folder


def cache_path(folder: str | Path, dataset, split: str) -> Path:
    return Path(folder) / "entropies" / f"{dataset.content_hash[:16]}-{split}-shards.npy"


def cached_shards(folder: str | Path, dataset, split: str = "train") -> list[np.ndarray] | None:
    """The cached entropies of `dataset`'s split, one float16 array per shard aligned with it
    (memory-mapped), or None when `cache` has not been run for it."""
    path = cache_path(folder, dataset, split)
    if not path.exists():
        return None
    from search.shards import DataError
    ent = np.load(path, mmap_mode="r")
    bounds = np.cumsum([0] + [len(a) for a in getattr(dataset, split)])
    if ent.ndim != 1 or len(ent) != bounds[-1]:
        raise DataError(f"{path}: {ent.shape} entropies for {bounds[-1]:,} {split} bytes of "
                        f"{dataset.name}; delete it and run `python -m search.entropy cache "
                        f"{folder} --split {split}` again")
    return [ent[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def score(model: torch.nn.Module, ids: np.ndarray, window: int, batch: int = 16) -> np.ndarray:
    """Entropy (nats) of the model's prediction at every byte of `ids`; each window of `window`
    bytes is scored from a fresh context (the paper resets context to avoid entropy drift)."""
    device = next(model.parameters()).device
    n = len(ids)
    pad = (-n) % window
    x = torch.from_numpy(np.concatenate([ids.astype(np.int64), np.zeros(pad, np.int64)]))
    rows = x.view(-1, window)
    out = [entropies(model(rows[i:i + batch].to(device))[0]).cpu()
           for i in range(0, len(rows), batch)]
    return torch.cat(out).flatten()[:n].numpy()


def cache(folder: str, data: str | None = None, split: str = "val", max_bytes: int | None = None,
          device: str = "cpu") -> Path:
    """Score a split once, shard by shard, and store its entropies; returns the .npy path (reused
    when present). `max_bytes` caps the bytes scored (for tuning; a capped cache is named apart
    and never fed to training)."""
    from search.data import open_dataset
    ds = open_dataset(data, "bytes")
    path = cache_path(folder, ds, split)
    if max_bytes is not None:
        path = path.with_name(path.stem + f"-first{max_bytes}.npy")
    if path.exists():
        return path
    model = load_entropy_model(folder, device)
    window = int(yaml.safe_load((Path(folder) / "graph.yaml").read_text())["vars"]["seq_len"])
    parts, left = [], max_bytes if max_bytes is not None else float("inf")
    for shard in getattr(ds, split):
        if left <= 0:
            break
        ids = np.asarray(shard[:int(min(len(shard), left))])
        parts.append(score(model, ids, window).astype(np.float16))
        left -= len(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate(parts) if parts else np.empty(0, np.float16))
    tmp.replace(path)   # a killed `cache` leaves no file training would read as whole
    return path


def mean_patch_len(ent: torch.Tensor, threshold: float, rule: str = "global",
                   threshold_r: float = 0.0) -> float:
    """Bytes per patch when the rows of `ent` [B, N] are patched with this threshold."""
    starts = entropy_starts(ent, threshold, rule, threshold_r)[:, :-1]
    return ent.numel() / float(starts.sum())


def tune(ent: torch.Tensor, target: float, rule: str = "global", steps: int = 50) -> float:
    """Threshold giving a mean patch length closest to `target` (bisection: the length grows
    with the threshold). For `monotonic` the threshold tuned is theta_r."""
    def length(th):
        return mean_patch_len(ent, th, rule, th) if rule == "monotonic" else \
            mean_patch_len(ent, th, rule)
    lo, hi = (-20.0, 20.0) if rule == "monotonic" else (0.0, 20.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if length(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda th: abs(length(th) - target))


def _rows(ent: np.ndarray, window: int) -> torch.Tensor:
    n = len(ent) // window * window
    return torch.from_numpy(ent[:n].astype(np.float32)).view(-1, window)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m search.entropy", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train graphs/blt_entropy.yaml and export it")
    t.add_argument("--size", default="tiny")
    t.add_argument("--budget", type=float, default=60.0, help="seconds of training")
    t.add_argument("--data")
    t.add_argument("--set", action="append", default=[], dest="sets", metavar="K=V")
    t.add_argument("--out", required=True)
    for name in ("cache", "tune"):
        c = sub.add_parser(name)
        c.add_argument("folder")
        c.add_argument("--data")
        c.add_argument("--split", default="val", choices=("train", "val"))
        c.add_argument("--max-bytes", type=int)
        c.add_argument("--device", default="cpu")
    sub.choices["tune"].add_argument("--target", type=float, required=True)
    sub.choices["tune"].add_argument("--rule", default="global", choices=("global", "monotonic"))
    sub.choices["tune"].add_argument("--window", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        print(train(args.out, args.size, args.budget, args.data, tuple(args.sets), progress=False))
        return 0
    path = cache(args.folder, args.data, args.split, args.max_bytes, args.device)
    if args.cmd == "cache":
        print(path)
        return 0
    rows = _rows(np.load(path), args.window)
    th = tune(rows, args.target, args.rule)
    key = "threshold_r" if args.rule == "monotonic" else "threshold"
    got = mean_patch_len(rows, th, args.rule, th)
    print(f"{key}: {th:.4f}   mean patch length {got:.3f} bytes (target {args.target}) "
          f"over {rows.numel():,} cached bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
