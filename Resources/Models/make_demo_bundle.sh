#!/usr/bin/env bash
# How Resources/Models/orthoknee-demo was made, step by step (CPU, 2 cores; not run in CI).
# Every step resumes: complete synthetic cases and cached features are kept on a rerun.
# On a fresh machine the data of steps 3, 6 and 9 (their synth commands) is rebuilt in about
# 10 minutes on 2 cores. The renders are the ones the figures came from: on 2026-11-26, on rebuilt
# data, 0.6.0 scored both held-out sets to the last digit of the scores it shipped with.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/work/data}
SHARED=${SHARED:-../shared/data}
export ORTHOKNEE_CACHE=$DATA/cache

# link_cases DIR SPLIT FIRST SYNTH_OUT: symlink into DIR/cases the first FIRST cases (0: all) of
# split SPLIT (train, validation or all) of an `orthoknee synth` output; existing links are kept.
link_cases() {
  python3 - "$@" <<'PY'
import os, sys
from OrthoKneeLib.train import find_cases
folder, split, first, synth = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cases = find_cases([synth], split)
os.makedirs(f"{folder}/cases", exist_ok=True)
for c in cases[:first] if first else cases:
    if not os.path.islink(f"{folder}/cases/{c.name}"):
        os.symlink(c, f"{folder}/cases/{c.name}")
PY
}

# link_comparison PREFIX HEADS_100 HEADS_10 UNET_100 UNET_10: name four runs' held-out scores as
# the roles bench/compare_models.py reads (PREFIX{heads,baseline}-{100,10}[.findings-test].eval.json).
# Each run is RUN or RUN:TAG, for scores written by `score_held_out RUN TAG` (such as .pp).
link_comparison() {
  local prefix=$1 role run tag suffix
  shift
  for role in heads-100 heads-10 baseline-100 baseline-10; do
    run=${1%%:*}; tag=${1#$run}; tag=${tag#:}; shift
    for suffix in "" .findings-test; do
      ln -sf $run$suffix.eval$tag.json $DATA/bundles/$prefix$role$suffix.eval.json
    done
  done
}

# ship_heads RUN EVAL: put the heads of bundle RUN (trained from this bundle's backbones) into the
# demo bundle, with RUN's metadata and the held-out scores of EVAL (`orthoknee evaluate --json`)
# in metadata["metrics"]; then verify every sha256.
ship_heads() {
  # Every weight file, not only heads.pt: a run on a continued backbone (step 23) ships its
  # backbone too; the metadata's sha256 of each file is verified below.
  cp "$1"/weights/*.pt $B/weights/
  python3 - "$1/metadata.json" "$2" "$B/metadata.json" <<'PY'
import json, sys
metadata, scores = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
metadata["metrics"] = {"held_out": {k: scores[k] for k in ("dice", "hd95", "auc", "finding_counts", "mean_dice",
                                                            "mean_auc", "cases", "postprocessing") if k in scores},
                       "note": "synthetic cases of subjects not used in training; see README.md"}
json.dump(metadata, open(sys.argv[3], "w"), indent=2)
PY
  python3 -c "from OrthoKneeLib.bundle import Bundle; Bundle.open('$B', verify=True)"
}

# combine_heads SEG_RUN FINDINGS_RUN OUT: bundle SEG_RUN with the finding head of FINDINGS_RUN
# (the two heads share no parameter, so each can stop at its own step count), written to OUT with
# the new weights' sha256 and where the finding head came from in metadata["heads"].
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
out.metadata["heads"]["finding_head_from"] = {"version": findings.metadata["version"],
                                              "sha256": findings.metadata["heads"]["sha256"],
                                              "command": findings.metadata["heads"]["training"]["command"]}
out.save_metadata()
Bundle.open(out.path, verify=True)
PY
}

# score_held_out RUN [SUFFIX]: `orthoknee evaluate --per-case` of bundle RUN on both held-out sets,
# written to $DATA/bundles/RUN.eval[SUFFIX].json and RUN.findings-test.eval[SUFFIX].json.
score_held_out() {
  local set
  for set in "eval $V2/test" "findings-test.eval $V3/test_findings"; do
    set -- $1 "${2:-}" $set
    orthoknee evaluate --bundle $DATA/bundles/$1 --cases $4 --json --per-case --device cpu > $DATA/bundles/$1.$3$2.json
  done
}

# continue_heads FROM CASES OUT SEED VERSION [FINETUNE OPTION...]: bundle FROM's heads continued 3000 steps on the cases of
# folder CASES with seed SEED and any further finetune options, written to $DATA/bundles/OUT (skipped when it has its heads), then
# scored on both held-out sets (score_held_out OUT).
continue_heads() {
  [ -f $DATA/bundles/$3/weights/heads.pt ] ||
    orthoknee finetune --bundle $DATA/bundles/$1 --cases $2 --validation $V2/test --validation-cases 4 \
      --validate-every 500 --out $DATA/bundles/$3 --views sagittal --steps 3000 --seed $4 --version $5 --device cpu "${@:6}"
  score_held_out $3
}

# 1. Synthetic cases from the real label maps for the backbones' pretraining (OAI: 35 subjects).
#    Rendered with the renderer of commit e15996b (DESS, PD fat-sat, T2 only); today's renderer
#    draws other contrasts, so rerunning this step makes other images than the backbones saw.
orthoknee synth --labels $SHARED/labels-oai --source oai --out $DATA/synth_oai_bench --n 100 --seed 123

# 2. Backbones (0.1.0): see the pretrain command in orthoknee-demo/README.md (recorded in metadata.json).
#    Bundles created since commit 0e93a4b have "span_slices": true in metadata.json "features"; this
#    one predates it (no key: tiled windows). Delete the key from a new bundle to reproduce it.

# 3. Cases for the heads (0.2.0), rendered with the contrast mix of OrthoKneeLib/synth/render.py
#    (DESS measured on the real sample, SynthSeg-like random contrasts, PD fat-sat, T2), and
#    which train and which test (subject-disjoint):
#    train = first 40 OAI cases of split 'train' + 12 SPL cases (the only subject with ACL/PCL labels);
#    test  = first 12 OAI cases of split 'validation' (subjects never trained on)
#            + 8 pymskt cases (a subject never trained on, with menisci).
V2=$DATA/v2
orthoknee synth --labels $SHARED/labels-oai --source oai --out $V2/synth_oai --n 64 --seed 123 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V2/synth_spl --n 12 --seed 12 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-pymskt --source pymskt --out $V2/synth_pymskt --n 8 --seed 11 --workers 2 --no-sheets
link_cases $V2/train train 40 $V2/synth_oai
link_cases $V2/train all 0 $V2/synth_spl
link_cases $V2/test validation 12 $V2/synth_oai
link_cases $V2/test all 0 $V2/synth_pymskt

# 4. Heads on frozen sagittal features (see README.md, "Why one view"); only that backbone is
#    run and cached. The run checkpoints every 100 steps: the same command started again
#    resumes. Validation Dice/AUC on 4 held-out cases every 200 steps (monitoring only).
B=Resources/Models/orthoknee-demo
[ -f $DATA/bundles/v2-heads-100/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 200 --out $DATA/bundles/v2-heads-100 --views sagittal --steps 1000 --from-scratch \
    --version 0.2.0 --device cpu
#    Shipped: the step-500 checkpoint of this run, not its final weights. It was copied from
#    $DATA/bundles/v2-heads-100.checkpoint.pt while the run went on (the checkpoint's "model"
#    state dict into a copy of the finished bundle, sha256 updated, training.checkpoint_step =
#    500): from step ~600 on, the heads kept improving on held-out synthetic cases but lost the
#    tibia on the real DESS sample. That choice was made by looking at the one real case.

# 5. The 10 %-label comparison at equal budget: heads and the supervised MONAI UNet baseline,
#    each 1000 steps from scratch on the same 52 cases (all labels, or the labels of 5 of them).
#    v3-heads-100 is step 4's command again (same seed, same cases; it reproduces v2-heads-100).
for run in "v3-heads-100 heads 1.0" "v3-heads-10 heads 0.1" "v3-baseline-100 baseline 1.0" "v3-baseline-10 baseline 0.1"; do
  set -- $run
  [ -f $DATA/bundles/$1/weights/heads.pt ] ||
    orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every 200 --out $DATA/bundles/$1 --views sagittal --steps 1000 --from-scratch \
      --model $2 --label-fraction $3 --device cpu
done
#    The baseline is cheaper per step (0.77 s against 1.3-1.5 s for the heads on an idle CPU), so it
#    also gets about the heads' wall time: 2000 steps (its own OneCycle schedule over 2000 steps).
for run in "v3w-baseline-100 1.0" "v3w-baseline-10 0.1"; do
  set -- $run
  [ -f $DATA/bundles/$1/weights/heads.pt ] ||
    orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every 400 --out $DATA/bundles/$1 --views sagittal --steps 2000 --from-scratch \
      --model baseline --label-fraction $2 --device cpu
done

# 6. A second held-out set where every simulated finding has positives and negatives (the first
#    has one collateral-ligament injury and no lateral meniscal tear): prevalence 0.5, the same
#    held-out OAI subjects (seed 123's validation split: 13 cases) + 16 pymskt cases = 29.
V3=$DATA/v3
orthoknee synth --labels $SHARED/labels-oai --source oai --out $V3/synth_oai_p50 --n 64 --seed 123 --prevalence 0.5 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-pymskt --source pymskt --out $V3/synth_pymskt_p50 --n 16 --seed 21 --prevalence 0.5 --workers 2 --no-sheets
link_cases $V3/test_findings validation 0 $V3/synth_oai_p50
link_cases $V3/test_findings all 0 $V3/synth_pymskt_p50

# 7. Held-out evaluation (the model card's tables: python bench/compare_models.py $DATA/bundles --prefix v3-,
#    and with --suffix .findings-test for the second set; the equal-wall-time table with --prefix v3w-,
#    after the links below put the heads' scores beside the 2000-step baselines).
for name in v2-heads-100-s500 v3-heads-100 v3-heads-10 v3-baseline-100 v3-baseline-10 v3w-baseline-100 v3w-baseline-10; do
  [ -f $DATA/bundles/$name/weights/heads.pt ] || continue
  orthoknee evaluate --bundle $DATA/bundles/$name --cases $V2/test --json --per-case --device cpu \
    > $DATA/bundles/$name.eval.json
  orthoknee evaluate --bundle $DATA/bundles/$name --cases $V3/test_findings --json --per-case --device cpu \
    > $DATA/bundles/$name.findings-test.eval.json
done
for run in heads-100 heads-10; do
  ln -sf v3-$run.eval.json $DATA/bundles/v3w-$run.eval.json
  ln -sf v3-$run.findings-test.eval.json $DATA/bundles/v3w-$run.findings-test.eval.json
done

# 8. Ship the 100 % heads (step-500 checkpoint) in the demo bundle (backbones stay byte-identical to 0.1.0's), with
#    the held-out scores in metadata["metrics"].
ship_heads $DATA/bundles/v2-heads-100-s500 $DATA/bundles/v2-heads-100-s500.eval.json

# 9. Three times as many renders of the same training subjects (OAI 160 cases with seed 123, whose
#    first 64 are step 3's and whose subject split is the same; SPL 36): all 163 training cases,
#    step 4's command otherwise (the model card's "More renders" table). Trained with the code of
#    commit 6e6c99e, before step 10's change to the finding head; the segmentation head is the same.
V4=$DATA/v4
orthoknee synth --labels $SHARED/labels-oai --source oai --out $V4/synth_oai --n 160 --seed 123 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V4/synth_spl --n 36 --seed 12 --workers 2 --no-sheets
link_cases $V4/train train 127 $V4/synth_oai  # all 127 of the 160; 127 also after step 33 adds renders
link_cases $V4/train all 36 $V4/synth_spl
[ -f $DATA/bundles/v4-heads-100/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $V4/train --validation $V2/test --validation-cases 4 \
    --validate-every 200 --out $DATA/bundles/v4-heads-100 --views sagittal --steps 1000 --from-scratch --device cpu

# 10. The finding head as commit 88f4d4c trains it (case loss into the attention only; balanced
#     lesion-cell loss; each head clipped on its own; attention reading the cells' logits): step 4's
#     command and data again (the model card's "Finding head" table). v5-heads-100 was the same
#     command run while attention did not yet read the logits (its heads config lacks
#     attention_reads_logits, so it loads without it); today the command trains v6-heads-100.
for name in v5-heads-100 v6-heads-100; do
  [ -f $DATA/bundles/$name/weights/heads.pt ] ||
    orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every 200 --out $DATA/bundles/$name --views sagittal --steps 1000 --from-scratch --device cpu
done
for name in v3-heads-100 v4-heads-100 v5-heads-100 v6-heads-100; do
  orthoknee evaluate --bundle $DATA/bundles/$name --cases $V2/test --json --per-case --device cpu \
    > $DATA/bundles/$name.s9.eval.json
  orthoknee evaluate --bundle $DATA/bundles/$name --cases $V3/test_findings --json --per-case --device cpu \
    > $DATA/bundles/$name.findings-test.s9.eval.json
done
#     Why the maps do not yet make a case score (the card's "Reading"):
python bench/finding_maps.py --bundle $DATA/bundles/v6-heads-100 --cases $V3/test_findings

# 11. Dice by render contrast (the model card's "Dice by contrast"): the same heads scored per contrast,
#     on held-out cases and on 16 of their own training cases (the first 6 T2-like, 6 random and 4 DESS
#     renders of $V2/train in name order), and v6's command with 3x the steps (v7): is the head underfit?
python3 - "$V2" <<'PY'
import json, sys
from pathlib import Path
v2 = Path(sys.argv[1])
out = v2 / "trainsub" / "cases"
out.mkdir(parents=True, exist_ok=True)
by_contrast = {}
for case in sorted((v2 / "train" / "cases").iterdir()):
    by_contrast.setdefault(json.loads((case / "case.json").read_text())["contrast"]["contrast"], []).append(case)
for contrast, count in (("t2", 6), ("random", 6), ("dess", 4)):
    for case in by_contrast[contrast][:count]:
        if not (out / case.name).is_symlink():
            (out / case.name).symlink_to(case.resolve())
PY
name=v7-heads-100-3000
[ -f $DATA/bundles/$name/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 500 --out $DATA/bundles/$name --views sagittal --steps 3000 --from-scratch --device cpu
orthoknee evaluate --bundle $DATA/bundles/v6-heads-100 --cases $V2/trainsub --json --per-case --device cpu \
  > $DATA/bundles/v6-heads-100.trainsub.eval.json
orthoknee evaluate --bundle $DATA/bundles/$name --cases $V2/test --json --per-case --device cpu > $DATA/bundles/$name.s10.eval.json
orthoknee evaluate --bundle $DATA/bundles/$name --cases $V3/test_findings --json --per-case --device cpu \
  > $DATA/bundles/$name.findings-test.s10.eval.json
orthoknee evaluate --bundle $DATA/bundles/$name --cases $V2/trainsub --json --per-case --device cpu \
  > $DATA/bundles/$name.trainsub.eval.json
python bench/dice_by_contrast.py $DATA/bundles/v6-heads-100.s9.eval.json $DATA/bundles/$name.s10.eval.json \
  $DATA/bundles/v6-heads-100.trainsub.eval.json $DATA/bundles/$name.trainsub.eval.json \
  $DATA/bundles/v3w-baseline-100.eval.json --cases $V2/test $V2/trainsub

# 12. Ship v7 (step 11's 3000-step run, final weights) as heads 0.3.0: held-out mean Dice 0.385 -> 0.622
#     against v6, and on the real sample femur, tibia, patella and cartilages outlined on each of four
#     sagittal slices looked at (the model card's "Heads 0.3.0").
ship_heads $DATA/bundles/v7-heads-100-3000 $DATA/bundles/v7-heads-100-3000.s10.eval.json

# 13. The 10 %-label comparison at the new budget (the model card's "10 % of the labels at 3000 steps"):
#     heads 3000 steps (100 %: step 11's v7), the baseline 6000 steps (about the heads' wall time).
#     Tables: python bench/compare_models.py $DATA/bundles --prefix v10- [--suffix .findings-test]
ln -sf v7-heads-100-3000.s10.eval.json $DATA/bundles/v10-heads-100.eval.json
ln -sf v7-heads-100-3000.findings-test.s10.eval.json $DATA/bundles/v10-heads-100.findings-test.eval.json
for run in "v10-heads-10 heads 0.1 3000" "v10-baseline-100 baseline 1.0 6000" "v10-baseline-10 baseline 0.1 6000"; do
  set -- $run
  [ -f $DATA/bundles/$1/weights/heads.pt ] ||
    orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every $(( $4 / 6 )) --out $DATA/bundles/$1 --views sagittal --steps $4 --from-scratch \
      --model $2 --label-fraction $3 --device cpu
  orthoknee evaluate --bundle $DATA/bundles/$1 --cases $V2/test --json --per-case --device cpu > $DATA/bundles/$1.eval.json
  orthoknee evaluate --bundle $DATA/bundles/$1 --cases $V3/test_findings --json --per-case --device cpu \
    > $DATA/bundles/$1.findings-test.eval.json
done

# 14. Where the shipped heads' (0.3.0) case scores are lost (the model card's "Finding head: where the
#     case score is lost"): how many cells outrank each lesion's best cell, and the highest cell inside
#     the finding's true site.
python bench/finding_maps.py --bundle $B --cases $V3/test_findings

# 15. What the test renders allow (the model card's "Dice ceiling of the test cases"): the partial-volume
#     oracle's Dice beside the models' on both held-out sets, and where the heads' and the UNet's
#     cartilage voxels go wrong.
python bench/dice_ceiling.py --cases $V2/test --eval $DATA/bundles/v7-heads-100-3000.s10.eval.json \
  $DATA/bundles/v10-baseline-100.eval.json $DATA/bundles/v10-heads-10.eval.json $DATA/bundles/v10-baseline-10.eval.json
python bench/dice_ceiling.py --cases $V3/test_findings --eval $DATA/bundles/v7-heads-100-3000.findings-test.s10.eval.json \
  $DATA/bundles/v10-baseline-100.findings-test.eval.json $DATA/bundles/v10-heads-10.findings-test.eval.json \
  $DATA/bundles/v10-baseline-10.findings-test.eval.json
python bench/error_distance.py --bundle $B $DATA/bundles/v10-baseline-100 --cases $V2/test

# 16. Heads 0.4.0: 0.3.0's heads trained for 3000 more steps (a warm restart of the one-cycle schedule;
#     6000 steps in all), same cases, seed and views; evaluated like 0.3.0, then shipped (the model
#     card's "Heads 0.4.0"). The ceiling shares of its Dice: step 15's commands with its eval outputs.
[ -f $DATA/bundles/v12-heads-100-6000/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 500 --out $DATA/bundles/v12-heads-100-6000 --views sagittal --steps 3000 --device cpu
for set in "eval $V2/test" "findings-test.eval $V3/test_findings" "trainsub.eval $V2/trainsub"; do
  set -- $set
  orthoknee evaluate --bundle $DATA/bundles/v12-heads-100-6000 --cases $2 --json --per-case --device cpu \
    > $DATA/bundles/v12-heads-100-6000.$1.json
done
python bench/dice_ceiling.py --cases $V2/test --eval $DATA/bundles/v12-heads-100-6000.eval.json
python bench/dice_ceiling.py --cases $V3/test_findings --eval $DATA/bundles/v12-heads-100-6000.findings-test.eval.json
python bench/error_distance.py --bundle $DATA/bundles/v12-heads-100-6000 --cases $V2/test
ship_heads $DATA/bundles/v12-heads-100-6000 $DATA/bundles/v12-heads-100-6000.eval.json

# 17. Bone post-processing (OrthoKneeLib/postprocess.py: femur, tibia and patella each kept as their
#     largest connected component, as `orthoknee predict` now writes the labelmap): 0.4.0 scored again,
#     and its metadata["metrics"] replaced by these scores (the model card's "Heads 0.4.0").
score_held_out v12-heads-100-6000 .pp
ship_heads $DATA/bundles/v12-heads-100-6000 $DATA/bundles/v12-heads-100-6000.eval.pp.json
# Which cases hold the means down (the model card's "Against the targets"):
python bench/dice_by_contrast.py $DATA/bundles/v12-heads-100-6000.eval.pp.json \
  $DATA/bundles/v12-heads-100-6000.findings-test.eval.pp.json $DATA/bundles/v10-baseline-100.findings-test.eval.json --worst 1

# 18. Window seams in the backbone features (the model card's "What was found on the way", item 3):
#     tiled 16-slice windows against windows spanning the slices (`span_slices`, new bundles).
python bench/feature_seams.py $V2/test/cases/oai-123-0002 --threads 1

# 19. The UNet on 16 of its own training cases (the model card's "Heads 0.4.0": neither model fits
#     the training cartilages to 0.80).
orthoknee evaluate --bundle $DATA/bundles/v10-baseline-100 --cases $V2/trainsub --json --per-case --device cpu \
  > $DATA/bundles/v10-baseline-100.trainsub.eval.json

# 20. The 10 %-label comparison at 0.4.0's budget (the model card's "10 % of the labels at 0.4.0's
#     budget"): step 13's 10 % heads continued 3000 steps (6000 in all, as 0.4.0), and each UNet
#     continued 6000 steps (12000 in all, about the heads' wall time); heads 100 % = 0.4.0 (step 17's
#     scores). All scored with the bone post-processing.
#     Tables: python bench/compare_models.py $DATA/bundles --prefix v14- [--suffix .findings-test]
for run in "v14-heads-10-6000 v10-heads-10 heads 0.1 3000" "v14-baseline-10-12000 v10-baseline-10 baseline 0.1 6000" \
           "v14-baseline-100-12000 v10-baseline-100 baseline 1.0 6000"; do
  set -- $run
  [ -f $DATA/bundles/$1/weights/heads.pt ] ||
    orthoknee finetune --bundle $DATA/bundles/$2 --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every 1000 --out $DATA/bundles/$1 --views sagittal --steps $5 --model $3 --label-fraction $4 --device cpu
  score_held_out $1
done
link_comparison v14- v12-heads-100-6000:.pp v14-heads-10-6000 v14-baseline-100-12000 v14-baseline-10-12000

# 21. Three-view heads on seam-free features: the demo backbones with windows spanning the slices
#     (features.span_slices = true; bundle v15-base, version 0.4.0+span), 0.4.0's architecture and
#     budget: 3000 steps from scratch (as 0.3.0), scored with the bone post-processing, then 3000 more
#     (a warm restart, 6000 in all, as 0.4.0). Compared case by case with 0.3.0 (step 11's v7, scored
#     again with the post-processing) and 0.4.0 (step 17):
#     python bench/compare_two.py $DATA/bundles/v7-heads-100-3000.eval.pp.json $DATA/bundles/v15-heads3v-3000.eval.json
#     (and the .findings-test pairs; at 6000 steps v12-heads-100-6000[.findings-test].eval.pp.json against
#     v15-heads3v-6000[.findings-test].eval.json, the card's "At 0.4.0's budget: 6000 steps").
[ -f $DATA/bundles/v15-base/metadata.json ] || { cp -r $B $DATA/bundles/v15-base && python3 - $DATA/bundles/v15-base <<'PY'
import sys
from OrthoKneeLib.bundle import Bundle
bundle = Bundle.open(sys.argv[1])
bundle.metadata["version"] += "+span"
bundle.metadata["features"]["span_slices"] = True
bundle.save_metadata()
PY
}
score_held_out v7-heads-100-3000 .pp
for run in "v15-heads3v-3000 $DATA/bundles/v15-base --from-scratch" "v15-heads3v-6000 $DATA/bundles/v15-heads3v-3000"; do
  set -- $run
  [ -f $DATA/bundles/$1/weights/heads.pt ] ||
    orthoknee finetune --bundle $2 ${3:-} --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every 500 --out $DATA/bundles/$1 --views sagittal coronal axial --steps 3000 --device cpu
  score_held_out $1
done

# 22. A longer budget for the sagittal heads (their training cartilages were underfit at 6000 steps):
#     0.4.0 (step 16's v12) continued 3000 steps twice more (warm restarts: 9000 and 12000 steps in
#     all), each stage scored with the bone post-processing and compared with 0.4.0:
#     python bench/compare_two.py $DATA/bundles/v12-heads-100-6000.eval.pp.json $DATA/bundles/v16-heads-100-9000.eval.json
#     (and the .findings-test pairs, and v16-heads-100-12000). The 9000-step heads were shipped as
#     0.5.0. 0.6.0 is the 12000-step segmentation head with the 9000-step finding head: from 9000
#     to 12000 steps every Dice but the medial meniscus's held or rose, while the finding AUCs fell
#     (their intervals include zero).
prev=v12-heads-100-6000
for steps in 9000 12000; do
  out=v16-heads-100-$steps
  [ -f $DATA/bundles/$out/weights/heads.pt ] ||
    orthoknee finetune --bundle $DATA/bundles/$prev --cases $V2/train --validation $V2/test --validation-cases 4 \
      --validate-every 500 --out $DATA/bundles/$out --views sagittal --steps 3000 --device cpu
  score_held_out $out
  prev=$out
done
combine_heads $DATA/bundles/v16-heads-100-12000 $DATA/bundles/v16-heads-100-9000 $DATA/bundles/v16-heads-0.6.0
score_held_out v16-heads-0.6.0
ship_heads $DATA/bundles/v16-heads-0.6.0 $DATA/bundles/v16-heads-0.6.0.eval.json

# 23. A longer-pretrained sagittal backbone (the heads' features come from a denoiser trained for
#     only 400 steps): the demo bundle's sagittal backbone continued 3000 steps on the real series
#     and step 9's training split ($V4/train: no subject of either held-out set), written as a new
#     bundle with the other two backbones copied and the same feature settings. Its denoising of
#     the held-out renders, against the 400-step backbone's:
#     python bench/denoise_loss.py --bundles $B $DATA/bundles/v17-backbone --data $V2/test $V3/test_findings
orthoknee pretrain --view sagittal --init-from $B --data $SHARED/dess-pykneer $SHARED/mese-pymskt $V4/train \
  --out $DATA/bundles/v17-backbone --steps 3000 --batch 2 --lr 5e-4 --checkpoint-every 100 --device cpu
#     Then heads from scratch on its features at 0.3.0's budget (step 11's command on this bundle),
#     paired with 0.3.0: python bench/compare_two.py $DATA/bundles/v7-heads-100-3000[.findings-test].eval.pp.json \
#       $DATA/bundles/v17-heads-100-3000[.findings-test].eval.json
[ -f $DATA/bundles/v17-heads-100-3000/weights/heads.pt ] ||
  orthoknee finetune --bundle $DATA/bundles/v17-backbone --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 500 --out $DATA/bundles/v17-heads-100-3000 --views sagittal --steps 3000 --from-scratch --device cpu
score_held_out v17-heads-100-3000
#     Continued 3000 steps (as 0.4.0 continued 0.3.0), paired with 0.4.0 and 0.6.0:
#     python bench/compare_two.py $DATA/bundles/v12-heads-100-6000[.findings-test].eval.pp.json \
#       $DATA/bundles/v17-heads-100-6000[.findings-test].eval.json
[ -f $DATA/bundles/v17-heads-100-6000/weights/heads.pt ] ||
  orthoknee finetune --bundle $DATA/bundles/v17-heads-100-3000 --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 500 --out $DATA/bundles/v17-heads-100-6000 --views sagittal --steps 3000 --device cpu
score_held_out v17-heads-100-6000

# 24. The 10 %-label comparison on the longer-pretrained backbone (the model card's "10 % of the
#     labels on the longer-pretrained backbone"): step 13's 10 % heads command on step 23's bundle
#     (3000 steps from scratch, the labels of the same 5 cases). Against the MONAI UNet at 6000
#     steps (step 13's, scored again here with the bone post-processing, as the heads are), paired
#     case by case: python bench/compare_models.py $DATA/bundles --prefix v17- [--suffix .findings-test]
[ -f $DATA/bundles/v17-heads-10-3000/weights/heads.pt ] ||
  orthoknee finetune --bundle $DATA/bundles/v17-backbone --cases $V2/train --validation $V2/test --validation-cases 4 \
    --label-fraction 0.1 --validate-every 500 --out $DATA/bundles/v17-heads-10-3000 --views sagittal --steps 3000 \
    --from-scratch --device cpu
score_held_out v17-heads-10-3000
for run in v10-baseline-100 v10-baseline-10 v10-heads-10; do score_held_out $run .pp; done
link_comparison v17- v17-heads-100-3000 v17-heads-10-3000 v10-baseline-100:.pp v10-baseline-10:.pp
# The same four roles on the 400-step backbone, all with the post-processing: --prefix v10pp-
link_comparison v10pp- v7-heads-100-3000:.pp v10-heads-10:.pp v10-baseline-100:.pp v10-baseline-10:.pp

# 25. 0.6.0's heads on the longer-pretrained backbone (a candidate, version 0.7.0, not shipped; the
#     model card's "A longer-pretrained sagittal backbone"): step 23's pretrain command rerun on a
#     fresh machine (its loss and denoising figures came out as before, to the last printed digit),
#     and both heads of 0.6.0 ($B) continued 3000 steps on its features (a warm start: heads of
#     12000 steps on the 400-step backbone's features, the features changed under them; a warm
#     restart of the one-cycle schedule, same cases, seed and views). Paired with 0.6.0 (step 22's
#     scores) on both held-out sets:
#     python bench/compare_two.py $DATA/bundles/v16-heads-0.6.0[.findings-test].eval.json \
#       $DATA/bundles/v18-heads-warm-3000[.findings-test].eval.json
[ -f $DATA/bundles/v18-start/metadata.json ] || python3 - $B $DATA/bundles/v17-backbone $DATA/bundles/v18-start <<'PY'
import shutil, sys
from OrthoKneeLib.bundle import Bundle
heads_from, backbone, out = sys.argv[1:4]
shutil.copytree(backbone, out, ignore=shutil.ignore_patterns("checkpoints"))
donor, bundle = Bundle.open(heads_from), Bundle.open(out)
shutil.copyfile(donor.path / donor.metadata["heads"]["weights"], bundle.path / donor.metadata["heads"]["weights"])
bundle.metadata["heads"] = donor.metadata["heads"]
bundle.save_metadata()
Bundle.open(out, verify=True)
PY
[ -f $DATA/bundles/v18-heads-warm-3000/weights/heads.pt ] ||
  orthoknee finetune --bundle $DATA/bundles/v18-start --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 500 --out $DATA/bundles/v18-heads-warm-3000 --views sagittal --steps 3000 --version 0.7.0 --device cpu
score_held_out v18-heads-warm-3000
#     The same heads continued 3000 steps more (6000 in all on these features), paired with 0.6.0 the same way:
[ -f $DATA/bundles/v18-heads-warm-6000/weights/heads.pt ] ||
  orthoknee finetune --bundle $DATA/bundles/v18-heads-warm-3000 --cases $V2/train --validation $V2/test --validation-cases 4 \
    --validate-every 500 --out $DATA/bundles/v18-heads-warm-6000 --views sagittal --steps 3000 --version 0.7.0 --device cpu
score_held_out v18-heads-warm-6000

# 26. Menisci split by the fibula's side (OrthoKneeLib/postprocess.py: assign_meniscus_sides; the
#     model card's "Medial and lateral menisci"). No training: the shipped heads 0.6.0 scored again
#     with today's post-processing, paired with step 22's scores (the same heads before it):
#     python bench/compare_two.py $DATA/bundles/v16-heads-0.6.0[.findings-test].eval.json \
#       $DATA/bundles/v19-heads-0.6.0-sides[.findings-test].eval.json
#     and the held-out metrics in metadata.json replaced by these (ship_heads with the same weights).
[ -d $DATA/bundles/v19-heads-0.6.0-sides ] || cp -r $B $DATA/bundles/v19-heads-0.6.0-sides
score_held_out v19-heads-0.6.0-sides
ship_heads $DATA/bundles/v19-heads-0.6.0-sides $DATA/bundles/v19-heads-0.6.0-sides.eval.json

# 27. How well the shipped heads fit their own 52 training cases (the model card's "Dice on the
#     heads' own training cases"): the same scoring as the held-out sets, without HD95.
orthoknee evaluate --bundle $DATA/bundles/v19-heads-0.6.0-sides --cases $V2/train --json --per-case --no-hd95 \
  --device cpu > $DATA/bundles/v19-heads-0.6.0-sides.train.eval.json
#     Beside the partial-volume ceiling of the same cases:
#     python bench/dice_ceiling.py --cases $V2/train --eval $DATA/bundles/v19-heads-0.6.0-sides.train.eval.json

# 28. Can the heads fit one case? 0.6.0's heads continued 1000 steps on a single training case
#     (oai-123-0036, DESS, whose cartilage 0.6.0 fits worst among its DESS cases), scored on that
#     case before and after, beside its ceiling:
#     python bench/dice_ceiling.py --cases $DATA/one --eval $DATA/bundles/shipped-0.6.0-sides.one.eval.json \
#       $DATA/bundles/v19-overfit-one.one.eval.json
mkdir -p $DATA/one/cases && ln -sfn $V2/train/cases/oai-123-0036 $DATA/one/cases/oai-123-0036
[ -f $DATA/bundles/v19-overfit-one/weights/heads.pt ] ||
  orthoknee finetune --bundle $B --cases $DATA/one --validation $DATA/one --validation-cases 1 --validate-every 250 \
    --out $DATA/bundles/v19-overfit-one --views sagittal --steps 1000 --device cpu
orthoknee evaluate --bundle $DATA/bundles/v19-overfit-one --cases $DATA/one --json --per-case --no-hd95 --device cpu \
  > $DATA/bundles/v19-overfit-one.one.eval.json
orthoknee evaluate --bundle $B --cases $DATA/one --json --per-case --no-hd95 --device cpu \
  > $DATA/bundles/shipped-0.6.0-sides.one.eval.json

# 29. New patches instead of replayed ones: 0.4.0, 0.5.0 and 0.6.0 each continued the last run
#     with seed 0, and every step's case and patch come from (seed, step), so each 3000-step
#     continuation drew the same 3000 patches in the same order (`orthoknee finetune` now says
#     so). 0.6.0's heads continued 3000 steps with seed 1 (a candidate, version 0.7.0, not
#     shipped), paired with step 26's scores:
#     python bench/compare_two.py $DATA/bundles/v19-heads-0.6.0-sides[.findings-test].eval.json \
#       $DATA/bundles/v19-heads-seed1-3000[.findings-test].eval.json
continue_heads v19-heads-0.6.0-sides $V2/train v19-heads-seed1-3000 1 0.7.0

# 30. Is the argmax the Dice-best labelmap? Dice per structure against a bias on its log-probability
#     (bench/class_bias.py; the model card's "A bias on thin structures"), chosen on new renders of
#     training subjects (step 9's OAI cases of split 'train' past the 40 trained on, and SPL cases
#     12-17: images the heads never saw, of subjects they did), then read on the first held-out set.
mkdir -p $DATA/calib/cases
for c in oai-123-00{50,52,53,54,55,57,59,60,61,62,63,66}; do ln -sfn $V4/synth_oai/cases/$c $DATA/calib/cases/$c; done
for c in spl-12-00{12,13,14,15,16,17}; do ln -sfn $V4/synth_spl/cases/$c $DATA/calib/cases/$c; done
python bench/class_bias.py --bundle $DATA/bundles/v19-heads-0.6.0-sides --cases $DATA/calib \
  --out $DATA/bundles/v19-heads-0.6.0-sides.calib.bias.json
python bench/class_bias.py --bundle $DATA/bundles/v19-heads-0.6.0-sides --cases $V2/test \
  --out $DATA/bundles/v19-heads-0.6.0-sides.bias.json

# 31. More renders for a continuation: 0.6.0's heads continued 3000 steps (seed 2) on step 9's 163
#     training cases (3x the renders of the same subjects) instead of step 3's 52, paired with
#     step 26's scores:
#     python bench/compare_two.py $DATA/bundles/v19-heads-0.6.0-sides[.findings-test].eval.json \
#       $DATA/bundles/v20-heads-v4-seed2-3000[.findings-test].eval.json
continue_heads v19-heads-0.6.0-sides $V4/train v20-heads-v4-seed2-3000 2 0.7.0

# 32. 0.7.0's heads continued 3000 more steps on the same 163 cases with new patches (seed 3; a
#     candidate, version 0.8.0), paired with step 31's scores:
#     python bench/compare_two.py $DATA/bundles/v20-heads-v4-seed2-3000[.findings-test].eval.json \
#       $DATA/bundles/v20-heads-v4-seed3-6000[.findings-test].eval.json
continue_heads v20-heads-v4-seed2-3000 $V4/train v20-heads-v4-seed3-6000 3 0.8.0

# 33. Half as many renders again: step 9's synth commands with --n 240 (OAI) and --n 54 (SPL) render
#     cases 160-239 and 36-53 into the same folders (cases 0-159 and 0-35 are kept, and the subject
#     split does not depend on --n); $V5/train links every training case of both: 190 OAI + 54 SPL =
#     244 (step 9's 163 among them; $V4/train keeps its 163 links). Step 32's candidate continued
#     3000 steps on them (seed 4; a candidate, version 0.8.0), paired with step 32's scores:
#     python bench/compare_two.py $DATA/bundles/v20-heads-v4-seed3-6000[.findings-test].eval.json \
#       $DATA/bundles/v21-heads-v5-seed4-9000[.findings-test].eval.json
V5=$DATA/v5
orthoknee synth --labels $SHARED/labels-oai --source oai --out $V4/synth_oai --n 240 --seed 123 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V4/synth_spl --n 54 --seed 12 --workers 2 --no-sheets
link_cases $V5/train train 0 $V4/synth_oai
link_cases $V5/train all 0 $V4/synth_spl
continue_heads v20-heads-v4-seed3-6000 $V5/train v21-heads-v5-seed4-9000 4 0.8.0

# 34. Cartilage off its bone (OrthoKneeLib/postprocess.py: drop_detached_cartilage; the model card's
#     "Heads 0.8.0"). Step 33's heads scored again with it (no training), paired with step 33's scores:
#     python bench/compare_two.py $DATA/bundles/v21-heads-v5-seed4-9000[.findings-test].eval.json \
#       $DATA/bundles/v21-heads-v5-seed4-9000[.findings-test].eval.cc.json
#     Step 33's scores without it came from the code of commit 1bf72f4; with today's code step 33's
#     score_held_out already applies the rule, and its .eval.json equals the .eval.cc.json below.
#     then shipped as heads 0.8.0, paired with 0.7.0:
#     python bench/compare_two.py $DATA/bundles/v20-heads-v4-seed2-3000[.findings-test].eval.json \
#       $DATA/bundles/v21-heads-v5-seed4-9000[.findings-test].eval.cc.json
score_held_out v21-heads-v5-seed4-9000 .cc
ship_heads $DATA/bundles/v21-heads-v5-seed4-9000 $DATA/bundles/v21-heads-v5-seed4-9000.eval.cc.json

# 35. Step 33's heads continued 3000 more steps on the same 244 cases (seed 5; a candidate, not shipped;
#     its metadata says 0.8.0 because the command was run with that --version), scored with the cartilage
#     rule and paired with 0.8.0:
#     python bench/compare_two.py $DATA/bundles/v21-heads-v5-seed4-9000[.findings-test].eval.cc.json \
#       $DATA/bundles/v21-heads-v5-seed5-12000[.findings-test].eval.json
continue_heads v21-heads-v5-seed4-9000 $V5/train v21-heads-v5-seed5-12000 5 0.8.0

# 36. The other knee (OrthoKneeLib/synth: --mirror-fraction). The fibula and the menisci are learnt
#     from one subject, the SPL atlas, a left knee; the held-out subject with them (pymskt) is a right
#     knee. 24 renders of the atlas mirrored into a right knee (seed 13; every case mirrored) join
#     step 33's 244 in $V6/train (268), and 0.8.0's heads are continued 3000 steps on them (seed 6),
#     paired with step 35 (the same start and number of steps on the 244 without the mirrored ones):
#     python bench/compare_two.py $DATA/bundles/v21-heads-v5-seed5-12000[.findings-test].eval.json \
#       $DATA/bundles/v22-heads-v6-mirror-seed6-12000[.findings-test].eval.json
#     and shipped as heads 0.9.0 (the model card's "Heads 0.9.0"), paired with 0.8.0:
#     python bench/compare_two.py $DATA/bundles/v21-heads-v5-seed4-9000[.findings-test].eval.cc.json \
#       $DATA/bundles/v22-heads-v6-mirror-seed6-12000[.findings-test].eval.json
V6=$DATA/v6
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V6/synth_spl_mirror --n 24 --seed 13 \
  --mirror-fraction 1 --workers 2 --no-sheets
link_cases $V6/train train 0 $V4/synth_oai
link_cases $V6/train all 0 $V4/synth_spl
link_cases $V6/train all 0 $V6/synth_spl_mirror
continue_heads v21-heads-v5-seed4-9000 $V6/train v22-heads-v6-mirror-seed6-12000 6 0.9.0
ship_heads $DATA/bundles/v22-heads-v6-mirror-seed6-12000 $DATA/bundles/v22-heads-v6-mirror-seed6-12000.eval.json

# 37. 0.9.0 continued 3000 more steps on the same 268 cases (seed 7; a candidate, not shipped; its
#     metadata says 0.10.0), paired with 0.9.0:
#     python bench/compare_two.py $DATA/bundles/v22-heads-v6-mirror-seed6-12000[.findings-test].eval.json \
#       $DATA/bundles/v22-heads-v6-mirror-seed7-15000[.findings-test].eval.json
continue_heads v22-heads-v6-mirror-seed6-12000 $V6/train v22-heads-v6-mirror-seed7-15000 7 0.10.0

# 38. The mirrored atlas drawn more often (orthoknee finetune --oversample GLOB=FACTOR). In step 36 the 24
#     mirrored renders were 9 % of the steps. 0.9.0 continued 3000 steps on the same 268 cases with them
#     drawn 4 times as often as the others (28 % of the steps), seed 7: step 37 is the control (same
#     start, cases, steps and seed, uniform draws):
#     python bench/compare_two.py $DATA/bundles/v22-heads-v6-mirror-seed7-15000[.findings-test].eval.json \
#       $DATA/bundles/v23-heads-v6-oversample4-seed7-15000[.findings-test].eval.json
continue_heads v22-heads-v6-mirror-seed6-12000 $V6/train v23-heads-v6-oversample4-seed7-15000 7 0.10.0 \
  --oversample 'spl-13-*=4'

# 39. Step 37's heads continued 3000 more steps on the same 268 cases (seed 8, uniform draws; 0.9.0 plus
#     6000 steps; a candidate, not shipped; its metadata says 0.10.0), paired with 0.9.0 and with step 37:
#     python bench/compare_two.py $DATA/bundles/v22-heads-v6-mirror-seed6-12000[.findings-test].eval.json \
#       $DATA/bundles/v23-heads-v6-mirror-seed8-18000[.findings-test].eval.json
continue_heads v22-heads-v6-mirror-seed7-15000 $V6/train v23-heads-v6-mirror-seed8-18000 8 0.10.0

# 40. The finding head alone (orthoknee finetune --train-heads findings: the segmentation head keeps
#     0.9.0's weights exactly, so the Dice is 0.9.0's), 1500 steps from 0.9.0 on the 268 cases of step 36,
#     seed 9, with and without --hard-negative-cells 32 (the cell loss also pays for the 32 highest cells
#     away from any lesion, per finding); candidates, not shipped (the model card's "The finding head
#     alone"), paired with each other and with 0.9.0:
#     python bench/compare_two.py $DATA/bundles/v24-findings-plain-seed9[.findings-test].eval.json \
#       $DATA/bundles/v24-findings-hard32-seed9[.findings-test].eval.json
continue_heads v22-heads-v6-mirror-seed6-12000 $V6/train v24-findings-hard32-seed9 9 0.10.0 \
  --steps 1500 --train-heads findings --hard-negative-cells 32
continue_heads v22-heads-v6-mirror-seed6-12000 $V6/train v24-findings-plain-seed9 9 0.10.0 \
  --steps 1500 --train-heads findings
#     And with --other-lesion-negatives too (each map also pays for its cells on the case's other lesions),
#     paired with v24-findings-hard32-seed9:
continue_heads v22-heads-v6-mirror-seed6-12000 $V6/train v24-findings-hard32-other-seed9 9 0.10.0 \
  --steps 1500 --train-heads findings --hard-negative-cells 32 --other-lesion-negatives

# 41. Can the finding head separate its own training cases? Every 7th case of $V6/train (39: 28 OAI,
#     11 SPL) scored like the held-out sets, and the maps read by bench/finding_maps.py (its third table:
#     where a map peaks in the cases without its finding):
mkdir -p $V6/train_sample/cases
ls $V6/train/cases | awk 'NR % 7 == 1' | while read -r c; do
  ln -sfn "$(readlink -f $V6/train/cases/$c)" $V6/train_sample/cases/$c
done
for run in v22-heads-v6-mirror-seed6-12000 v24-findings-hard32-seed9 v24-findings-plain-seed9 v24-findings-hard32-other-seed9; do
  orthoknee evaluate --bundle $DATA/bundles/$run --cases $V6/train_sample --json --per-case --no-hd95 --device cpu \
    > $DATA/bundles/$run.train-sample.eval.json
  for set in $V3/test_findings $V2/test $V6/train_sample; do
    python bench/finding_maps.py --bundle $DATA/bundles/$run --cases $set
  done
done

# 42. Where the held-out fibula is missed: how far below the tibia's top each fibula-labelling source map
#     shows it, and the recall by depth of 0.9.0, of 0.8.0 (without the mirrored atlas) and of step 39
#     (0.9.0 plus 6000 steps) on the second set's 16 pymskt cases, then 0.9.0 on the first set's 8
#     (the model card's "What blocks the remaining targets"):
python bench/depth_recall.py --bundle $B $DATA/bundles/v21-heads-v5-seed4-9000 \
  $DATA/bundles/v23-heads-v6-mirror-seed8-18000 --cases $V3/test_findings
python bench/depth_recall.py --bundle $B --cases $V2/test
#     and how much disk the feature cache of all the cases above holds:
orthoknee cache

# 43. 8-bit features in the cache (OrthoKneeLib/featurecache.py: quantize_channels). What they change,
#     against the float32 features the Predictor computes and the float16 ones the cache held before,
#     on the first held-out set (features computed afresh; about 20 s a case):
python bench/feature_bits.py --bundle $B --cases $V2/test
#     then every entry cached above rewritten in place (55.35 GB of features -> 27.68 GB):
orthoknee cache --compact
#     Twice the renders of step 36's subjects: the same synth commands with --n 420 (OAI), 90 (SPL) and
#     48 (mirrored SPL) render cases 240-419, 54-89 and 24-47 into the same folders; $V7/train links every
#     training case of the three, and 0.9.0's heads are continued 3000 steps on them with seed 7: step 37
#     (the same start, steps and seed on step 36's 268 cases) is the control.
V7=$DATA/v7
orthoknee synth --labels $SHARED/labels-oai --source oai --out $V4/synth_oai --n 420 --seed 123 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V4/synth_spl --n 90 --seed 12 --workers 2 --no-sheets
orthoknee synth --labels $SHARED/labels-spl-atlas --source spl --out $V6/synth_spl_mirror --n 48 --seed 13 \
  --mirror-fraction 1 --workers 2 --no-sheets
link_cases $V7/train train 0 $V4/synth_oai
link_cases $V7/train all 0 $V4/synth_spl
link_cases $V7/train all 0 $V6/synth_spl_mirror
continue_heads v22-heads-v6-mirror-seed6-12000 $V7/train v25-heads-v7-seed7-15000 7 0.10.0
#     Step 37 scored again on the compacted (8-bit) cache for the pairing, and the run shipped as heads
#     0.10.0 (the model card's "Heads 0.10.0"), paired with 0.9.0 and with step 37:
#     python bench/compare_two.py $DATA/bundles/v22-heads-v6-mirror-seed6-12000[.findings-test].eval.json \
#       $DATA/bundles/v25-heads-v7-seed7-15000[.findings-test].eval.json
#     python bench/compare_two.py $DATA/bundles/v22-heads-v6-mirror-seed7-15000[.findings-test].eval.8bit.json \
#       $DATA/bundles/v25-heads-v7-seed7-15000[.findings-test].eval.json
score_held_out v22-heads-v6-mirror-seed7-15000 .8bit
ship_heads $DATA/bundles/v25-heads-v7-seed7-15000 $DATA/bundles/v25-heads-v7-seed7-15000.eval.json
