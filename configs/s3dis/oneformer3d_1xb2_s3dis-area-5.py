# Baseline: OneFormer3D's own S3DIS Area-5 config, unchanged (Hungarian InstanceCriterion).
# Published (OneFormer3D README / paper): S3DIS Area-5 mAP 58.0, AP50 72.7, AP25 80.6 -- reproduce this first.
#
# OneFormer3D's configs are read from the environment variable ONEFORMER3D_ROOT (an absolute path to a checkout of
# https://github.com/filaPro/oneformer3d); when it is unset, from a checkout named "oneformer3d" beside this
# repository. scripts/train_oneformer3d.sh sets it. Run from ONEFORMER3D_ROOT: data_root and load_from are relative.
_base_ = ["{{$ONEFORMER3D_ROOT:../../../oneformer3d}}/configs/oneformer3d_1xb2_s3dis-area-5.py"]
