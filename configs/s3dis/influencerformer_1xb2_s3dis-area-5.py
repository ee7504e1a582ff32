# OneFormer3D on S3DIS Area-5 with the matching-free InfluencerCriterion: the baseline config with only
# model.criterion.inst_criterion replaced (semantic criterion, model, data, schedule unchanged).
# Keys and the forms they act on: influencerformer/integrations/oneformer3d.py; tuning: docs/integration_guide.md.
_base_ = ["./oneformer3d_1xb2_s3dis-area-5.py"]

# Keeps OneFormer3D's own import (a custom_imports list replaces the base's) and registers InfluencerCriterion.
custom_imports = dict(imports=["oneformer3d", "influencerformer.integrations.oneformer3d"],
                      allow_failed_imports=False)

model = dict(
    criterion=dict(
        inst_criterion=dict(
            _delete_=True,  # drop InstanceCriterion's matcher and fix_* keys
            type="InfluencerCriterion",
            num_classes={{_base_.num_instance_classes}},
            loss_weight=[0.5, 1.0],  # [classification, influencer mask terms]
            non_object_weight=0.05,  # as the baseline
            form="transport",  # the library's default form; form=seed is the original Influencer mask loss
            bg_weight=0.1,  # seed form only: background term weight on S3DIS (guide)
        )))
