"""Benchmark: peak memory of reading a checkpoint zip bomb (issue 23, item 4).

A ~1 MB ``.pt`` whose one float32 tensor is a DEFLATED zip entry of 1 GiB of zeros (``torch.save`` never
compresses; ``torch.load`` inflates whatever it finds). Each line is a fresh interpreter: the peak resident
memory after importing ``common.checkpoint`` alone, and after ``read_checkpoint(bomb)`` (refused by
``check_torch_file`` before ``torch.load`` on this branch; loaded on a tree without the check).

    PYTHONPATH=$PWD python benchmarks/checkpoint_zip_bomb.py [--inflated_mib 1024] [--folder /tmp/xray2ct_bomb]
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile


def write_bomb(path: str | os.PathLike, inflated: int) -> str:
    """A checkpoint ``{"model": {"w": float32[inflated / 4]}}`` whose storage entry is deflated.

    ``inflated``: bytes, a multiple of 64 MiB above it. Also the zip bomb of tests/test_checkpoint_security.py.
    """
    import torch

    numel, storage = inflated // 4, object()

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 0, (numel,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"model": {"w": Tensor()}})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as entry:
            block = bytes(min(inflated, 64 << 20))
            for _ in range(inflated // len(block)):
                entry.write(block)
    return os.fspath(path)


def peak_rss_mb(code: str) -> tuple[float, str]:
    """(peak resident MB, last stderr line) of a fresh interpreter running ``code``."""
    script = f"import resource, sys\n{code}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return float(done.stdout.split()[-1]), (done.stderr.strip().splitlines() or [""])[-1]


def main(inflated_mib: int = 1024, folder: str = "/tmp/xray2ct_bomb") -> None:
    os.makedirs(folder, exist_ok=True)
    path = write_bomb(os.path.join(folder, "bomb.pt"), inflated_mib << 20)
    print(f"bomb: {os.path.getsize(path)} bytes on disk, {inflated_mib} MiB inflated")
    read = (
        "from common.checkpoint import read_checkpoint\n"
        f"try:\n    c = read_checkpoint({path!r})\n    print('loaded', c['model']['w'].numel() * 4, 'bytes', file=sys.stderr)\n"
        "except Exception as e:\n    print('refused:', str(e)[:150], file=sys.stderr)"
    )
    for name, code in (("import common.checkpoint", "import common.checkpoint"), ("read_checkpoint(bomb)", read)):
        mb, said = peak_rss_mb(code)
        print(f"{name:>24}: peak RSS {mb:6.0f} MB  {said}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
