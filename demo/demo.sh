#!/usr/bin/env bash
# The whole pipeline on the bundled sample world, on CPU: `make demo` runs this.
#   bash demo/demo.sh PYTHON DATA_DIR RUN_DIR
set -euo pipefail
PY=${1:-python}; DATA=${2:-data/sample}; RUN=${3:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1. sample world (English + Estonian) -> $DATA"
$PY demo/sample_world.py --out "$DATA" --seed 0 | tail -1
echo "== 2. tokenizer (BPE, byte fallback, 2000 pieces)"
$PY -m minillm.tokenizer train --input "$DATA"/pretrain/et/train.jsonl "$DATA"/pretrain/en/train.jsonl \
    --vocab-size 2000 --out "$RUN/tokenizer"
echo "== 3. token shards"
for lang in et en; do for split in train valid; do
  $PY -m minillm.prepare --tokenizer "$RUN/tokenizer" --input "$DATA/pretrain/$lang/$split.jsonl" \
      --out "$RUN/tokens/${lang}_$split" --name "${lang}_$split"
done; done
echo "== 4. continual pretraining, 75% Estonian / 25% English"
$PY train_pretrain.py --overwrite --out-dir "$RUN/pretrain" --tokenizer "$RUN/tokenizer" \
    --data "et=$RUN/tokens/et_train,en=$RUN/tokens/en_train" \
    --valid-data "et=$RUN/tokens/et_valid,en=$RUN/tokens/en_valid"
echo "== 5. translation-task instructions from the bitext (25% Estonian -> English, as LLAMMAS)"
$PY -m minillm.instructions translate --tsv "$DATA/bitext/en-et.tsv" --src-lang en --tgt-lang et \
    --reverse-share 0.25 --format chat --out "$RUN/sft_data/trtask.jsonl" --seed 0
echo "== 5b. decontamination: translation instructions sharing a 13-gram or a whole sentence with the evaluation tasks"
$PY -m minillm.instructions decontaminate --input "$RUN/sft_data/trtask.jsonl" --eval "$DATA/eval" --report-only
echo "== 6. instruction tuning: translation tasks + Estonian/English instructions, loss on responses only"
$PY train_sft.py --overwrite --init-from "$RUN/pretrain/model" --out-dir "$RUN/sft" \
    --train-data "$RUN/sft_data/trtask.jsonl,$DATA/sft/alpaca_et.jsonl,$DATA/sft/alpaca_en.jsonl,$DATA/sft/chat_en.jsonl" \
    --valid-data "$DATA/sft/valid.jsonl" --epochs 2 --seq-len 256 --micro-batch-size 16 --lr 1e-3 --min-lr 1e-4 \
    --log-interval 20
echo "== 7. ORPO preference alignment"
$PY train_orpo.py --overwrite --init-from "$RUN/sft/model" --out-dir "$RUN/orpo" --train-data "$DATA/preferences/train.jsonl" \
    --valid-data "$DATA/preferences/valid.jsonl" --epochs 1 --seq-len 256 --micro-batch-size 8 --lr 2e-4 \
    --min-lr 2e-5 --eval-interval 25 --log-interval 25
echo "== 8. held-out instructions (never seen in training)"
$PY demo/heldout_check.py --model "$RUN/orpo/model" --data "$DATA/sft/heldout.jsonl" --limit 10
echo "== 9. every stage on the sample tasks: A pretrained (raw prompts), B SFT, C ORPO (chat); value ± standard error"
EVAL=(--tasks "$DATA/eval" --max-new-tokens 32 --batch-size 16 --limit 40 --progress false)
$PY evaluate.py --model "$RUN/pretrain/model" --prompt-format raw --out "$RUN/eval_pretrain" "${EVAL[@]}" > /dev/null
$PY evaluate.py --model "$RUN/sft/model" --prompt-format chat --out "$RUN/eval_sft" "${EVAL[@]}" > /dev/null
$PY evaluate.py --model "$RUN/orpo/model" --prompt-format chat --out "$RUN/eval_orpo" "${EVAL[@]}" > /dev/null
$PY evaluate.py --compare "$RUN/eval_pretrain/results.json" "$RUN/eval_sft/results.json" "$RUN/eval_orpo/results.json"
echo "== talk to the final model: in the browser at http://127.0.0.1:8000/, or with any OpenAI client (Ctrl-C stops it)"
echo "$PY -m minillm.serve --model $RUN/orpo/model"
