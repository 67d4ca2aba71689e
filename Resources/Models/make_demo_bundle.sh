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

# 4. Heads on frozen features and the supervised baseline, on the same 32 cases. Runs checkpoint
#    every 100 steps: the same command started again resumes. Validation Dice/AUC on 4 held-out
#    cases is printed every 200/250 steps (monitoring only: nothing is selected on it).
#    The heads fuse the sagittal features only (see README.md, "Why one view").
#    The 10 % runs (--label-fraction 0.1, same steps for both models) have not been run yet.
B=Resources/Models/orthoknee-demo
[ -f $DATA/bundles/heads-100/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $DATA/demo_train --validation $DATA/demo_test --validation-cases 4 \
    --validate-every 200 --out $DATA/bundles/heads-100 --views sagittal --steps 800 --from-scratch \
    --version 0.2.0 --device cpu
[ -f $DATA/bundles/baseline-100/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $DATA/demo_train --validation $DATA/demo_test --validation-cases 4 \
    --validate-every 250 --out $DATA/bundles/baseline-100 --model baseline --steps 1000 \
    --version 0.2.0 --device cpu

# 5. Held-out evaluation (the model card's tables: python bench/compare_models.py $DATA/bundles).
for name in heads-100 heads-10 baseline-100 baseline-10; do
  [ -f $DATA/bundles/$name/weights/heads.pt ] || continue
  orthoknee evaluate --bundle $DATA/bundles/$name --cases $DATA/demo_test --json --per-case --device cpu \
    > $DATA/bundles/$name.eval.json
done

# 6. Ship the 100 % heads in the demo bundle (backbones stay byte-identical to 0.1.0's), with
#    the held-out scores in metadata["metrics"].
cp $DATA/bundles/heads-100/weights/heads.pt $B/weights/heads.pt
python3 - "$DATA/bundles/heads-100/metadata.json" "$DATA/bundles/heads-100.eval.json" "$B/metadata.json" <<'PY'
import json, sys
metadata, scores = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
metadata["metrics"] = {"held_out": {k: scores[k] for k in ("dice", "hd95", "auc", "finding_counts", "mean_dice",
                                                            "mean_auc", "cases")},
                       "note": "synthetic cases of subjects not used in training; see README.md"}
json.dump(metadata, open(sys.argv[3], "w"), indent=2)
PY
python3 -c "from OrthoKneeLib.bundle import Bundle; Bundle.open('$B', verify=True)"  # verifies every sha256
