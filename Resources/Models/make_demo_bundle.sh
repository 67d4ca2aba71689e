#!/usr/bin/env bash
# How Resources/Models/orthoknee-demo was made, step by step (CPU, 2 cores; not run in CI).
# Every step resumes: complete synthetic cases and cached features are kept on a rerun.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/work/data}
SHARED=${SHARED:-../shared/data}
export ORTHOKNEE_CACHE=$DATA/cache

# 1. Synthetic training cases from the real label maps (OAI: 35 subjects; SPL atlas; pymskt).
orthoknee synth --labels $SHARED/labels-oai --source oai --out $DATA/synth_oai_bench --n 100 --seed 123
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $DATA/synth_spl --n 30 --seed 12 --no-sheets
orthoknee synth --labels $SHARED/labels-pymskt --source pymskt --out $DATA/synth_pymskt --n 24 --seed 11 --no-sheets

# 2. Backbones (0.1.0): see the pretrain command in orthoknee-demo/README.md (recorded in metadata.json).

# 3. Which cases train and which test (subject-disjoint):
#    train = first 20 OAI cases of split 'train' + first 12 SPL cases (the only subject with ACL/PCL labels);
#    test  = first 12 OAI cases of split 'validation' (subjects never trained on)
#            + first 8 pymskt cases (a subject never trained on, with menisci).
python3 - "$DATA" <<'PY'
import os, sys
from OrthoKneeLib.train import find_cases
data = sys.argv[1]
train = find_cases([f"{data}/synth_oai_bench"], "train")[:20] + find_cases([f"{data}/synth_spl"])[:12]
test = find_cases([f"{data}/synth_oai_bench"], "validation")[:12] + find_cases([f"{data}/synth_pymskt"])[:8]
for folder, cases in (("demo_train", train), ("demo_test", test)):
    os.makedirs(f"{data}/{folder}/cases", exist_ok=True)
    for c in cases:
        link = f"{data}/{folder}/cases/{c.name}"
        if not os.path.islink(link):
            os.symlink(c, link)
PY

# 4. Heads on frozen features (100 % and 10 % of the labelled cases) and the supervised baseline,
#    each pair on the same cases and number of steps. Runs checkpoint every 100 steps: the same
#    command started again resumes. Validation Dice/AUC on 4 held-out cases is printed every 200 steps
#    (monitoring only: nothing is selected on it).
B=Resources/Models/orthoknee-demo
for run in "heads 1.0 heads-100 1000" "baseline 1.0 baseline-100 1000" "heads 0.1 heads-10 300" "baseline 0.1 baseline-10 300"; do
  set -- $run
  [ -f $DATA/bundles/$3/weights/heads.pt ] && continue
  orthoknee finetune --bundle $B --cases $DATA/demo_train --validation $DATA/demo_test --validation-cases 4 \
    --validate-every 200 --out $DATA/bundles/$3 --model $1 --label-fraction $2 --steps $4 --from-scratch \
    --version 0.2.0 --device cpu
done

# 5. Held-out evaluation (the model card's tables: python bench/compare_models.py $DATA/bundles).
for name in heads-100 heads-10 baseline-100 baseline-10; do
  [ -f $DATA/bundles/$name/weights/heads.pt ] || continue
  orthoknee evaluate --bundle $DATA/bundles/$name --cases $DATA/demo_test --json --per-case --device cpu \
    > $DATA/bundles/$name.eval.json
done

# 6. Ship the 100 % heads in the demo bundle (backbones stay byte-identical to 0.1.0's).
cp $DATA/bundles/heads-100/weights/heads.pt $B/weights/heads.pt
cp $DATA/bundles/heads-100/metadata.json $B/metadata.json
