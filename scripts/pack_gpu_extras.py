"""Pack what the GPU machine needs besides ../shared/gpu's wheels: the embedded model (bf16), pytest and py-spy.

    .venv/bin/python scripts/pack_gpu_extras.py [--part-mb 52]

Writes .gpuwheels/m01, m02, ... (ignored by git, like the wheel folders): the model's small files, its
bf16 safetensors split in parts, and the pytest and py-spy wheels. Carry each folder with one device `run`, then
on the machine: `bash /tmp/gw/m01/unpack.sh` (puts the model where pipeline.models looks for it under
INVERSE_INSTRUCT_HOME=/tmp/iihome, installs pytest and py-spy into /tmp/site-extras).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

UNPACK = r"""#!/bin/bash
# Reassemble the embedded model, install pytest and py-spy (run on the GPU machine after carrying every mNN).
set -euo pipefail
GW=${1:-/tmp/gw}
DEST=/tmp/iihome/models/SmolLM2-135M-Instruct
mkdir -p "$DEST"
cp "$GW"/m01/model/* "$DEST"/
cat "$GW"/m*/part.* > "$DEST/model.safetensors"
(cd "$DEST" && sha256sum -c "$GW/m01/model.sha256")
# a folder of their own: pip --target leaves an existing bin/ alone, so py-spy's binary would not land in
# /tmp/site/bin (the vllm wheels' folder) -- it did not, on the H100 on 2026-11-24
pip install --no-index --no-deps --target /tmp/site-extras "$GW"/m01/wheels/*.whl -q 2>&1 | tail -2 || true
test -x /tmp/site-extras/bin/py-spy || echo "py-spy binary missing from /tmp/site-extras/bin"
echo "model in $DEST; pytest and py-spy in /tmp/site-extras"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    # a device `run` carries at most 64 MiB with the working tree (~4 MiB); m01 also holds the tokenizer and wheels
    ap.add_argument("--part-mb", type=int, default=52)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.models import embedded_model_dir

    src = embedded_model_dir()
    root = Path(".gpuwheels")
    for old in root.glob("m[0-9][0-9]"):
        shutil.rmtree(old)
    first = root / "m01"
    (first / "model").mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, first / "model" / f.name)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / "model.safetensors").items()}
    blob = root / "model.bf16.safetensors"
    save_file(weights, blob, metadata={"format": "pt"})
    digest = subprocess.run(["sha256sum", str(blob)], capture_output=True, text=True, check=True).stdout.split()[0]
    (first / "model.sha256").write_text(f"{digest}  model.safetensors\n")
    data, size = blob.read_bytes(), args.part_mb * 2**20
    for i in range(0, len(data), size):
        folder = root / f"m{i // size + 1:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"part.{i // size:03d}").write_bytes(data[i:i + size])
    blob.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(first / "wheels"), "pytest", "pluggy", "iniconfig", "py-spy"], check=True)
    (first / "unpack.sh").write_text(UNPACK)
    for folder in sorted(root.glob("m[0-9][0-9]")):
        mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        print(f"{folder}  {mb:.1f} MiB" + ("  TOO BIG: carry at most 64 MiB with the working tree" if mb > 60 else ""))


if __name__ == "__main__":
    main()
