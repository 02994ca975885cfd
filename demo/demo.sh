#!/usr/bin/env bash
# The whole pipeline on the bundled sample world, on CPU: `make demo` runs this.
#   bash demo/demo.sh PYTHON DATA_DIR RUN_DIR [SEED]
# SEED (default 1337, the trainers' default) seeds pretraining, SFT and ORPO; the sample world is always seed 0.
set -euo pipefail
PY=${1:-python}; DATA=${2:-data/sample}; RUN=${3:-runs/demo}; SEED=${4:-1337}
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
$PY train_pretrain.py --overwrite --seed "$SEED" --out-dir "$RUN/pretrain" --tokenizer "$RUN/tokenizer" \
    --data "et=$RUN/tokens/et_train,en=$RUN/tokens/en_train" \
    --valid-data "et=$RUN/tokens/et_valid,en=$RUN/tokens/en_valid"
echo "== 5. translation-task instructions from the bitext (25% Estonian -> English, as LLAMMAS)"
$PY -m minillm.instructions translate --tsv "$DATA/bitext/en-et.tsv" --src-lang en --tgt-lang et \
    --reverse-share 0.25 --format chat --out "$RUN/sft_data/trtask.jsonl" --seed 0
echo "== 5b. decontamination: translation instructions sharing a 13-gram or a whole sentence with the evaluation tasks"
$PY -m minillm.instructions decontaminate --input "$RUN/sft_data/trtask.jsonl" --eval "$DATA/eval" --report-only
echo "== 6. replay: 1500 Estonian and 500 English pretraining documents as 'continue the text' records"
# The sample world's instructions state facts about its people in their input, with other values than the
# pretraining text tells, and the replies repeat them: without some pretraining text beside them, SFT
# overwrites what pretraining taught (README, "What the demo shows").
$PY demo/pretrain_as_sft.py --input "$DATA/pretrain/et/train.jsonl" --lang et --limit 1500 --out "$RUN/sft_data/replay_et.jsonl"
$PY demo/pretrain_as_sft.py --input "$DATA/pretrain/en/train.jsonl" --lang en --limit 500 --out "$RUN/sft_data/replay_en.jsonl"
echo "== 7. instruction tuning: translation tasks + Estonian/English instructions + replay, loss on responses only"
$PY train_sft.py --overwrite --seed "$SEED" --init-from "$RUN/pretrain/model" --out-dir "$RUN/sft" \
    --train-data "$RUN/sft_data/trtask.jsonl,$DATA/sft/alpaca_et.jsonl,$DATA/sft/alpaca_en.jsonl,$DATA/sft/chat_en.jsonl,$RUN/sft_data/replay_et.jsonl,$RUN/sft_data/replay_en.jsonl" \
    --valid-data "$DATA/sft/valid.jsonl" --epochs 2 --seq-len 256 --micro-batch-size 16 --lr 1e-3 --min-lr 1e-4 \
    --log-interval 20
echo "== 8. ORPO preference alignment (lr 1e-4: at 2e-4 the tiny model refuses most benign questions too)"
$PY train_orpo.py --overwrite --seed "$SEED" --init-from "$RUN/sft/model" --out-dir "$RUN/orpo" --train-data "$DATA/preferences/train.jsonl" \
    --valid-data "$DATA/preferences/valid.jsonl" --epochs 1 --seq-len 256 --micro-batch-size 8 --lr 1e-4 \
    --min-lr 1e-5 --eval-interval 25 --log-interval 25
echo "== 9. held-out instructions (never seen in training)"
$PY demo/heldout_check.py --model "$RUN/orpo/model" --data "$DATA/sft/heldout.jsonl" --limit 10
echo "== 10. every stage on the sample tasks, value ± standard error. Knowledge across stages: compare the raw"
echo "   rows (A, B, C: the same prompts for every model); D, E are how the tuned models are used (chat layout)"
EVAL=(--tasks "$DATA/eval" --max-new-tokens 32 --batch-size 16 --limit 40 --progress false)
$PY evaluate.py --model "$RUN/pretrain/model" --prompt-format raw --out "$RUN/eval_pretrain_raw" "${EVAL[@]}" > /dev/null
for stage in sft orpo; do for format in raw chat; do
  $PY evaluate.py --model "$RUN/$stage/model" --prompt-format $format --out "$RUN/eval_${stage}_$format" "${EVAL[@]}" > /dev/null
done; done
$PY evaluate.py --compare "$RUN"/eval_{pretrain_raw,sft_raw,orpo_raw,sft_chat,orpo_chat}/results.json
echo "== talk to the final model: in the browser at http://127.0.0.1:8000/, or with any OpenAI client (Ctrl-C stops it)"
echo "$PY -m minillm.serve --model $RUN/orpo/model"
