"""Reference features of real data, cached as safetensors files.

The features of a data set under an extractor are computed once and kept in
``$FEWSTEP_CACHE/reference/`` (default ``~/.cache/fewstep/reference/``), keyed by the extractor's
name (which carries a hash of its weights) and the data spec (an image folder's key also hashes
its file names, sizes and modification times). FID statistics, KID and precision/recall all read
the cached features.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from torch import Tensor

from fewstep.eval.features import Features
from fewstep.io import cache_dir, load_tensors, save_tensors


def data_key(spec: str) -> str:
    path = Path(spec)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")[-60:]
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        tag += "-" + h.hexdigest()[:12]
    return tag


def reference_features(extractor: Features, data, cache: bool = True) -> Tensor:
    """``(N, D)`` features of the data set ``data`` (a :class:`~fewstep.data.DataSpec` or a text spec)."""
    from fewstep.data import load_dataset, parse_data

    spec = parse_data(data)
    tag = (
        data_key(spec.path) + f"_{spec.split}_r{spec.resolution}c{spec.channels}"
        if spec.kind == "folder"
        else str(spec)
    )
    tag += "_convert" if spec.convert else ""
    key = f"{extractor.name}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag).strip('_')}"
    path = cache_dir() / "reference" / f"{key}.safetensors"
    if cache and path.is_file():
        return load_tensors(path)["features"]
    x = load_dataset(spec).x
    f = extractor.features(x)
    if cache:
        save_tensors(path, {"features": f}, metadata={"data": str(spec), "extractor": extractor.name})
    return f
