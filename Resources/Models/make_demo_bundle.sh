#!/usr/bin/env bash
# How Resources/Models/orthoknee-demo (backbones 0.1.0, heads 0.11.0) was made: only the steps
# on its lineage, in order, each with the wall time it took on 2 CPU cores.
#
#   bash Resources/Models/make_demo_bundle.sh --dry-run   # list the steps and their wall times
#   bash Resources/Models/make_demo_bundle.sh             # run them (about 12 hours on 2 cores)
#
# Needs the raw label maps and series in ../shared/data ($SHARED) and room for the renders and the
# feature cache in $DATA (about 30 GB). Every step resumes: complete renders, cached features and
# finished bundles are kept on a rerun. Each heads step continues the previous one (the shipped heads
# are 0.3.0's trained further, release after release), so they run in this order. Superseded
# experiments and their commands are in docs/experiments.md and in git history (this script before
# commit "make_demo_bundle.sh: the current recipe").
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/work/data}
SHARED=${SHARED:-../shared/data}
export ORTHOKNEE_CACHE=$DATA/cache
B=Resources/Models/orthoknee-demo
V2=$DATA/v2 V4=$DATA/v4 V5=$DATA/v5 V6=$DATA/v6 V7=$DATA/v7
HEADS="--validation $V2/test --validation-cases 4 --views sagittal --steps 3000 --device cpu"

# link_cases DIR SPLIT FIRST SYNTH_OUT: symlink into DIR/cases the first FIRST cases (0: all) of
# split SPLIT (train, validation or all) of an `orthoknee synth` output; existing links are kept.
link_cases() {
  python3 - "$@" <<'PY'
import os, sys
from OrthoKneeLib.cachedcase import find_cases
folder, split, first, synth = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
os.makedirs(f"{folder}/cases", exist_ok=True)
for c in find_cases([synth], split)[: first or None]:
    if not os.path.islink(f"{folder}/cases/{c.name}"):
        os.symlink(c, f"{folder}/cases/{c.name}")
PY
}

# Each step: "NAME|WALL TIME (s, measured; - where it was not recorded)|COMMAND". The pretrain commands and
# the last heads command are the ones metadata.json records (Testing/test_demo_bundle.py checks that).
STEPS=(
  "renders for pretraining (100 OAI)|525|orthoknee synth --labels $SHARED/labels-oai --source oai --out $DATA/synth_oai_bench --n 100 --seed 123"
  "pretrain sagittal backbone 0.1.0|765.7|orthoknee pretrain --view sagittal --data ../shared/data/dess-pykneer ../shared/data/mese-pymskt /work/data/synth_oai_bench --out /work/data/bundles/orthoknee-demo --steps 400 --batch 2 --lr 5e-4 --checkpoint-every 50 --name orthoknee-demo --version 0.1.0"
  "pretrain coronal backbone|506.3|orthoknee pretrain --view coronal --data ../shared/data/dess-pykneer ../shared/data/mese-pymskt /work/data/synth_oai_bench --out /work/data/bundles/orthoknee-demo --steps 400 --batch 2 --lr 5e-4 --checkpoint-every 50 --name orthoknee-demo --version 0.1.0"
  "pretrain axial backbone|481.2|orthoknee pretrain --view axial --data ../shared/data/dess-pykneer ../shared/data/mese-pymskt /work/data/synth_oai_bench --out /work/data/bundles/orthoknee-demo --steps 400 --batch 2 --lr 5e-4 --checkpoint-every 50 --name orthoknee-demo --version 0.1.0"
  "renders v2: 52 training cases (40 OAI, 12 SPL), 20 held out (12 OAI, 8 pymskt)|-|orthoknee synth --labels $SHARED/labels-oai --source oai --out $V2/synth_oai --n 64 --seed 123 --workers 2 --no-sheets && orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V2/synth_spl --n 12 --seed 12 --workers 2 --no-sheets && orthoknee synth --labels $SHARED/labels-pymskt --source pymskt --out $V2/synth_pymskt --n 8 --seed 11 --workers 2 --no-sheets && link_cases $V2/train train 40 $V2/synth_oai && link_cases $V2/train all 0 $V2/synth_spl && link_cases $V2/test validation 12 $V2/synth_oai && link_cases $V2/test all 0 $V2/synth_pymskt"
  "heads 0.3.0: 3000 steps from scratch on v2|3550|orthoknee finetune --bundle $B --cases $V2/train --out $DATA/bundles/v7-heads-100-3000 --from-scratch --validate-every 500 $HEADS"
  "heads 0.4.0: +3000 steps on v2|5844|orthoknee finetune --bundle $DATA/bundles/v7-heads-100-3000 --cases $V2/train --out $DATA/bundles/v12-heads-100-6000 --validate-every 500 $HEADS"
  "heads 0.5.0: +3000 steps on v2|3291|orthoknee finetune --bundle $DATA/bundles/v12-heads-100-6000 --cases $V2/train --out $DATA/bundles/v16-heads-100-9000 --validate-every 500 $HEADS"
  "heads 0.6.0: +3000 steps on v2 for the segmentation head (the 9000-step finding head kept)|3584|orthoknee finetune --bundle $DATA/bundles/v16-heads-100-9000 --cases $V2/train --out $DATA/bundles/v16-heads-100-12000 --validate-every 500 $HEADS && combine_heads $DATA/bundles/v16-heads-100-12000 $DATA/bundles/v16-heads-100-9000 $DATA/bundles/v16-heads-0.6.0"
  "renders v4: 163 training cases (127 OAI, 36 SPL)|-|orthoknee synth --labels $SHARED/labels-oai --source oai --out $V4/synth_oai --n 160 --seed 123 --workers 2 --no-sheets && orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V4/synth_spl --n 36 --seed 12 --workers 2 --no-sheets && link_cases $V4/train train 127 $V4/synth_oai && link_cases $V4/train all 36 $V4/synth_spl"
  "heads 0.7.0: +3000 steps on v4, seed 2|2250|orthoknee finetune --bundle $DATA/bundles/v16-heads-0.6.0 --cases $V4/train --out $DATA/bundles/v20-heads-v4-seed2-3000 --seed 2 --version 0.7.0 --validate-every 500 $HEADS"
  "heads (0.8.0, first half): +3000 steps on v4, seed 3|-|orthoknee finetune --bundle $DATA/bundles/v20-heads-v4-seed2-3000 --cases $V4/train --out $DATA/bundles/v20-heads-v4-seed3-6000 --seed 3 --version 0.8.0 --validate-every 500 $HEADS"
  "renders v5: 244 training cases (190 OAI, 54 SPL)|-|orthoknee synth --labels $SHARED/labels-oai --source oai --out $V4/synth_oai --n 240 --seed 123 --workers 2 --no-sheets && orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V4/synth_spl --n 54 --seed 12 --workers 2 --no-sheets && link_cases $V5/train train 0 $V4/synth_oai && link_cases $V5/train all 0 $V4/synth_spl"
  "heads 0.8.0: +3000 steps on v5, seed 4|2315|orthoknee finetune --bundle $DATA/bundles/v20-heads-v4-seed3-6000 --cases $V5/train --out $DATA/bundles/v21-heads-v5-seed4-9000 --seed 4 --version 0.8.0 --validate-every 500 $HEADS"
  "renders v6: v5 and 24 renders of the SPL atlas mirrored into a right knee (268)|-|orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V6/synth_spl_mirror --n 24 --seed 13 --mirror-fraction 1 --workers 2 --no-sheets && link_cases $V6/train train 0 $V4/synth_oai && link_cases $V6/train all 0 $V4/synth_spl && link_cases $V6/train all 0 $V6/synth_spl_mirror"
  "heads 0.9.0: +3000 steps on v6, seed 6|2540|orthoknee finetune --bundle $DATA/bundles/v21-heads-v5-seed4-9000 --cases $V6/train --out $DATA/bundles/v22-heads-v6-mirror-seed6-12000 --seed 6 --version 0.9.0 --validate-every 500 $HEADS"
  "renders v7: twice v6's renders of the same subjects (473)|-|orthoknee synth --labels $SHARED/labels-oai --source oai --out $V4/synth_oai --n 420 --seed 123 --workers 2 --no-sheets && orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V4/synth_spl --n 90 --seed 12 --workers 2 --no-sheets && orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V6/synth_spl_mirror --n 48 --seed 13 --mirror-fraction 1 --workers 2 --no-sheets && link_cases $V7/train train 0 $V4/synth_oai && link_cases $V7/train all 0 $V4/synth_spl && link_cases $V7/train all 0 $V6/synth_spl_mirror"
  "heads 0.10.0: +3000 steps on v7, seed 7|2304.6|orthoknee finetune --bundle /work/data/bundles/v22-heads-v6-mirror-seed6-12000 --cases /work/data/v7/train --validation /work/data/v2/test --validation-cases 4 --validate-every 500 --out /work/data/bundles/v25-heads-v7-seed7-15000 --views sagittal --steps 3000 --seed 7 --version 0.10.0 --device cpu"
  "ship 0.10.0: heads and held-out scores into the demo bundle|-|orthoknee evaluate --bundle $DATA/bundles/v25-heads-v7-seed7-15000 --cases $V2/test --json --per-case --device cpu > $DATA/bundles/v25.eval.json && ship_heads $DATA/bundles/v25-heads-v7-seed7-15000 $DATA/bundles/v25.eval.json"
  "three-view cases: v2's 40 OAI training renders; held out: its 13 OAI validation renders and 8 pymskt renders (21)|-|link_cases $DATA/v2fusion/train train 40 $V2/synth_oai && link_cases $DATA/v2fusion/test validation 0 $V2/synth_oai && link_cases $DATA/v2fusion/test all 0 $V2/synth_pymskt"
  "heads 0.11.0: the coronal and axial views added to 0.10.0's heads, per voxel; only the fusion trains (includes caching 44 cases' three views)|1767.6|orthoknee finetune --bundle Resources/Models/orthoknee-demo --cases /work/data/v2fusion/train --validation /work/data/v2fusion/test --validation-cases 4 --validate-every 250 --views sagittal coronal axial --train-heads fusion --steps 1000 --seed 12 --version 0.11.0 --device cpu --out /work/data/bundles/v27-three-views-fit"
  "ship 0.11.0|-|orthoknee evaluate --bundle $DATA/bundles/v27-three-views-fit --cases $DATA/v2fusion/test --json --per-case --no-hd95 --device cpu > $DATA/bundles/v27.eval.json && ship_heads $DATA/bundles/v27-three-views-fit $DATA/bundles/v27.eval.json"
)

# combine_heads SEG_RUN FINDINGS_RUN OUT: SEG_RUN's bundle with FINDINGS_RUN's finding head (the two heads
# share no parameter), written to OUT with the new weights' sha256.
combine_heads() {
  rm -rf "$3" && cp -r "$1" "$3" && rm -rf "$3/checkpoints"
  python3 - "$@" <<'PY'
import sys
from OrthoKneeLib.bundle import Bundle
seg, findings, out = (Bundle.open(p) for p in sys.argv[1:4])
weights = out.load_state(out.metadata["heads"]["weights"], "heads")
donor = findings.load_state(findings.metadata["heads"]["weights"], "heads")
weights.update({k: v for k, v in donor.items() if k.startswith("findings.")})
out.metadata["heads"]["sha256"] = out.save_weights(out.metadata["heads"]["weights"], weights)
out.save_metadata()
Bundle.open(out.path, verify=True)
PY
}

# ship_heads RUN EVAL: RUN's weights and metadata into the demo bundle, held-out scores of EVAL as its metrics.
ship_heads() {
  cp "$1"/weights/*.pt $B/weights/
  python3 - "$1/metadata.json" "$2" "$B/metadata.json" <<'PY'
import json, sys
metadata, scores = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
keys = ("dice", "hd95", "auc", "auc_interval", "calibration", "finding_counts", "mean_dice", "mean_auc", "cases")
metadata["metrics"] = {"held_out": {k: scores[k] for k in keys if k in scores}}
json.dump(metadata, open(sys.argv[3], "w"), indent=2)
PY
  python3 -c "from OrthoKneeLib.bundle import Bundle; Bundle.open('$B', verify=True)"
}

total=0
for n in "${!STEPS[@]}"; do
  IFS='|' read -r name seconds command <<<"${STEPS[$n]}"
  if [ "${1:-}" = "--dry-run" ]; then
    printf '%2d. %-90s %8s s\n    %s\n' $((n + 1)) "$name" "$seconds" "$command"
    [ "$seconds" = "-" ] || total=$(python3 -c "print($total + $seconds)")
  else
    echo "== step $((n + 1)): $name"
    eval "$command"
  fi
done
[ "${1:-}" != "--dry-run" ] || echo "recorded wall time of the timed steps: $total s"
