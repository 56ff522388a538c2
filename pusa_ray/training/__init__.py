"""Training pieces that know nothing of Ray or DeepSpeed: config, data order, model set-up, objective.

- `config`: the job's typed YAML (`TrainConfig`), validated on the driver and again on each worker.
- `data`: which records, noise and per-frame timesteps a step sees, as pure functions of the step.
- `model`: the base DiT, LoRA injected with peft, adapter export in our format.
- `objective`: the flow-matching loss on a batch (through `pusa_ray.flow`), probe loss, warm-up.

`pusa_ray.distributed.train` runs them under Ray Train and DeepSpeed ZeRO-2.
"""
