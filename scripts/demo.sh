#!/usr/bin/env bash
# The whole pipeline on the bundled sample world, on CPU: `make demo` runs this.
#   bash scripts/demo.sh PYTHON DATA_DIR RUN_DIR
set -euo pipefail
PY=${1:-python}; DATA=${2:-data/sample}; RUN=${3:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1. sample world (English + Estonian) -> $DATA"
$PY -m minillm.sample_world --out "$DATA" --seed 0 | tail -1
echo "== 2. tokenizer (BPE, byte fallback, 2000 pieces)"
$PY -m minillm.tokenizer train --input "$DATA"/pretrain/et/train.jsonl "$DATA"/pretrain/en/train.jsonl \
    --vocab-size 2000 --out "$RUN/tokenizer"
echo "== 3. token shards"
for lang in et en; do for split in train valid; do
  $PY -m minillm.data prepare --tokenizer "$RUN/tokenizer" --input "$DATA/pretrain/$lang/$split.jsonl" \
      --out "$RUN/tokens/${lang}_$split" --name "${lang}_$split"
done; done
echo "== 4. continual pretraining, 75% Estonian / 25% English"
$PY train_pretrain.py --out-dir "$RUN/pretrain" --tokenizer "$RUN/tokenizer" \
    --data "et=$RUN/tokens/et_train,en=$RUN/tokens/en_train" \
    --valid-data "et=$RUN/tokens/et_valid,en=$RUN/tokens/en_valid"
