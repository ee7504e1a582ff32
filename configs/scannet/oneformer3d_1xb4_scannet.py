# Baseline: OneFormer3D's own ScanNet config, unchanged (Hungarian InstanceCriterion with SparseMatcher).
# Published (OneFormer3D README): ScanNet val mAP 59.3, AP50 78.8, AP25 86.7 -- reproduce this first.
#
# OneFormer3D's configs are read from the environment variable ONEFORMER3D_ROOT (an absolute path to a checkout of
# https://github.com/filaPro/oneformer3d); when it is unset, from a checkout named "oneformer3d" beside this
# repository. scripts/train_oneformer3d.sh sets it. Run from ONEFORMER3D_ROOT: data_root and load_from are relative.
_base_ = ["{{$ONEFORMER3D_ROOT:../../../oneformer3d}}/configs/oneformer3d_1xb4_scannet.py"]
