"""The preprocessing flow's Ray-free logic: the job's typed config, the model described and loaded
part by part, listing and planning the clips, decoding one clip, and committing the dataset.
The Ray Data layer (actors, pipeline, the job's entry point) is `pusa_ray.distributed.preprocess`.

    config.py  PreprocessConfig and its parts (unknown keys are errors)
    model.py   ModelDescription (configs only, never weights); the codec and text encoder alone
    plan.py    listing (manifests, metadata.csv, sidecars), stat, keys, what is left to encode
    decode.py  one clip: fetch, sample frames at the target rate, crop and resize
    commit.py  the index, the errors report and the manifest, written last
"""
