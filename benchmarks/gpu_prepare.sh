#!/usr/bin/env bash
# Run HERE, on the CPU machine, before a GPU session's device call: puts under .gpu/ (ignored
# by git, carried with `carry: [".gpu"]`) what the GPU machine's image lacks:
#   .gpu/whl    pyzmq and orjson wheels for its Python 3.12 (it has torch, transformers,
#               typer, rich, psutil, prometheus-client, nvidia-ml-py, matplotlib, pytest)
#   .gpu/model  the embedded MiniLM in fp16 (the fp32 wheel is over the 64 MiB a call carries)
# Then run benchmarks/gpu_check.sh there (see its header).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/whl
$PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  "pyzmq==$($PYTHON -c 'import zmq; print(zmq.__version__)')" \
  "orjson==$($PYTHON -c 'import orjson; print(orjson.__version__)')"
HF_HUB_OFFLINE=1 $PYTHON - <<'PY'
import shutil
from pathlib import Path

import torch
from transformers import AutoModel

from pool.builtin import embedded_model_path

source, target = embedded_model_path(), Path(".gpu/model")
shutil.rmtree(target, ignore_errors=True)
AutoModel.from_pretrained(source, dtype=torch.float16).save_pretrained(target)
for name in source.iterdir():  # tokenizer files, sentence-transformers' pooling config
    if name.is_file() and not (target / name.name).exists() and name.suffix != ".bin" \
            and not name.name.endswith(".safetensors"):
        shutil.copy(name, target / name.name)
PY
du -sh .gpu/whl .gpu/model
