"""The preprocessing flow's Ray-free logic: the job's typed config, listing and planning the
clips, decoding one clip, and committing the dataset. The model is described and loaded part by
part by `pusa_ray.models.description` and `pusa_ray.models.loading`; the Ray Data layer (actors,
pipeline, the job's entry point) is `pusa_ray.distributed.preprocess`.

    config.py  PreprocessConfig and its parts (unknown keys are errors)
    plan.py    listing (manifests, metadata.csv, sidecars), stat, keys, what is left to encode
    decode.py  one clip: fetch, sample frames at the target rate, crop and resize
    commit.py  the index, the errors report and the manifest, written last
"""
