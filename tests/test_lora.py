"""LoRA adapters: every format loads to the same canonical weights; merged, unmerged and stacked agree."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from pusa_ray.checkpoints import lora
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import load_components

RANK = 4


@pytest.fixture
def tiny():
    return load_components("tiny", device="cpu")


def pusa_state(transformer, seed=0, rank=RANK):
    """A Pusa V1-style state dict (original keys with `.default.`) for the given model."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(len(transformer.blocks)):
        for original, diffusers_name in lora.ORIGINAL_TO_DIFFUSERS.items():
            weight = transformer.get_submodule(f"blocks.{i}.{diffusers_name}").weight
            out_features, in_features = weight.shape
            state[f"blocks.{i}.{original}.lora_A.default.weight"] = (
                torch.randn(rank, in_features, generator=generator) * 0.1
            )
            state[f"blocks.{i}.{original}.lora_B.default.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.1
            )
    return state


def sample_inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 8, 8, generator=generator)
    context = torch.randn(1, 512, 32, generator=generator)
    timesteps = torch.tensor([[0.0, 400.0, 900.0]])
    return latents, timesteps, context


def output(components):
    latents, timesteps, context = sample_inputs()
    with torch.no_grad():
        return components.model(latents, timesteps, context)


def test_pusa_pt_loads_and_merges_to_the_closed_form(tiny, tmp_path):
    state = pusa_state(tiny.model.transformer)
    torch.save(state, tmp_path / "pusa_v1.pt")
    adapter = lora.load_adapter(tmp_path / "pusa_v1.pt")
    assert adapter.metadata["format"] == "pusa" and adapter.rank == RANK
    assert len(adapter.modules) == 2 * len(lora.ORIGINAL_TO_DIFFUSERS)
    q = tiny.model.transformer.blocks[1].attn1.to_q.weight
    w0 = q.detach().clone()
    lora.merge_adapter(tiny.model.transformer, adapter, alpha=1.4)
    a, b = (
        state["blocks.1.self_attn.q.lora_A.default.weight"],
        state["blocks.1.self_attn.q.lora_B.default.weight"],
    )
    torch.testing.assert_close(q.detach(), w0 + 1.4 * b @ a)
    ffn = tiny.model.transformer.blocks[0].ffn.net[2].weight
    assert not torch.equal(
        ffn, load_components("tiny", device="cpu").model.transformer.blocks[0].ffn.net[2].weight
    )


def test_alpha_zero_is_the_base_model(tiny, tmp_path):
    torch.save(pusa_state(tiny.model.transformer), tmp_path / "a.pt")
    base = output(tiny)
    lora.merge_adapter(tiny.model.transformer, lora.load_adapter(tmp_path / "a.pt"), alpha=0.0)
    assert torch.equal(output(tiny), base)


def test_merged_equals_unmerged_and_stacks(tmp_path):
    merged, unmerged = load_components("tiny", device="cpu"), load_components("tiny", device="cpu")
    base = output(merged)
    torch.save(pusa_state(merged.model.transformer, seed=0), tmp_path / "a.pt")
    save_file(pusa_state(merged.model.transformer, seed=5, rank=2), str(tmp_path / "b.safetensors"))
    first, second = lora.load_adapter(tmp_path / "a.pt"), lora.load_adapter(tmp_path / "b.safetensors")
    lora.merge_adapter(merged.model.transformer, first, alpha=1.4)
    lora.merge_adapter(merged.model.transformer, second, alpha=0.7)
    lora.attach_adapters(unmerged.model.transformer, [("pusa", first, 1.4), ("distill", second, 0.7)])
    reference = output(merged)
    assert not torch.allclose(reference, base, atol=1e-3)
    torch.testing.assert_close(output(unmerged), reference, rtol=1e-4, atol=1e-5)
    # unmerged adapters leave the base weights untouched
    fresh = load_components("tiny", device="cpu").model.transformer
    assert torch.equal(
        unmerged.model.transformer.blocks[0].attn1.to_q.base_layer.weight, fresh.blocks[0].attn1.to_q.weight
    )


def test_comfyui_keys_with_alpha_fold_the_scale(tiny, tmp_path):
    state = pusa_state(tiny.model.transformer)
    comfy = {}
    for key, value in state.items():
        name = key.replace(".lora_A.default.weight", ".lora_down.weight").replace(
            ".lora_B.default.weight", ".lora_up.weight"
        )
        comfy[f"diffusion_model.{name}"] = value
        if key.endswith("lora_A.default.weight"):
            comfy[f"diffusion_model.{key.split('.lora_A')[0]}.alpha"] = torch.tensor(float(RANK) / 2)
    save_file(comfy, str(tmp_path / "distill.safetensors"))
    adapter = lora.load_adapter(tmp_path / "distill.safetensors")
    a, b = adapter.pair("blocks.0.attn2.to_k")
    expected = (
        0.5
        * state["blocks.0.cross_attn.k.lora_B.default.weight"]
        @ state["blocks.0.cross_attn.k.lora_A.default.weight"]
    )
    torch.testing.assert_close(b @ a, expected)


def test_our_format_records_and_folds_the_training_scale(tiny, tmp_path):
    state = pusa_state(tiny.model.transformer)
    torch.save(state, tmp_path / "a.pt")
    canonical = lora.load_adapter(tmp_path / "a.pt")
    raw = {
        k: (v / 4.0 if ".lora_B." in k else v) for k, v in canonical.weights.items()
    }  # peft scale 16/4 = 4
    lora.save_adapter(
        tmp_path / "ours.safetensors",
        raw,
        rank=RANK,
        lora_alpha=16.0,
        base_model="tiny",
        architecture=tiny.spec.architecture,
        target_modules=lora.PUSA_TARGET_MODULES,
        step=30,
    )
    ours = lora.load_adapter(tmp_path / "ours.safetensors")
    assert ours.metadata["format"] == "pusa-ray-lora" and ours.metadata["step"] == 30
    assert ours.metadata["scale"] == 4.0 and ours.metadata["base_model"] == "tiny"
    for key, value in canonical.weights.items():
        torch.testing.assert_close(ours.weights[key], value)
    lora.check_compatible(ours, tiny.model.transformer, tiny.spec.architecture)
    other = dict(tiny.spec.architecture, num_layers=40)
    with pytest.raises(UserInputError, match="trained for architecture"):
        lora.check_compatible(ours, tiny.model.transformer, other)


def test_exports_load_back_to_the_same_outputs(tmp_path):
    source = load_components("tiny", device="cpu")
    torch.save(pusa_state(source.model.transformer), tmp_path / "a.pt")
    adapter = lora.load_adapter(tmp_path / "a.pt")
    lora.export_pusa(adapter, tmp_path / "exported.pt")
    lora.export_diffusers(adapter, tmp_path / "exported_diffusers.safetensors")
    outputs = []
    for path in ("a.pt", "exported.pt", "exported_diffusers.safetensors"):
        components = load_components("tiny", device="cpu")
        lora.merge_adapter(components.model.transformer, lora.load_adapter(tmp_path / path), alpha=1.0)
        outputs.append(output(components))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], outputs[2])
    exported = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert set(exported) == set(torch.load(tmp_path / "a.pt", weights_only=True))


def test_bad_adapters_are_clear_errors(tiny, tmp_path):
    state = pusa_state(tiny.model.transformer)
    wrong = dict(state)
    wrong["blocks.1.ffn.0.lora_A.default.weight"] = torch.zeros(RANK, 7)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserInputError, match="'blocks.1.ffn.net.0.proj' has A"):
        lora.merge_adapter(tiny.model.transformer, lora.load_adapter(tmp_path / "wrong.pt"), 1.0)
    deeper = dict(state)
    deeper["blocks.7.self_attn.q.lora_A.default.weight"] = state["blocks.0.self_attn.q.lora_A.default.weight"]
    deeper["blocks.7.self_attn.q.lora_B.default.weight"] = state["blocks.0.self_attn.q.lora_B.default.weight"]
    torch.save(deeper, tmp_path / "deeper.pt")
    with pytest.raises(UserInputError, match="'blocks.7.attn1.to_q' names no module"):
        lora.check_compatible(lora.load_adapter(tmp_path / "deeper.pt"), tiny.model.transformer)
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "unknown.pt")
    with pytest.raises(UserInputError, match="'something.else'"):
        lora.load_adapter(tmp_path / "unknown.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        lora.load_adapter(tmp_path / "missing.pt")


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"blocks.0.self_attn.q.lora_A.default.weight": Payload()}, handle)
    with pytest.raises(UserInputError, match="cannot load LoRA"):
        lora.load_adapter(tmp_path / "evil.pt")
    assert "pickled code ran" not in capsys.readouterr().out


def test_cli_applies_adapters_and_alpha_zero_is_the_base(tmp_path):
    from safetensors.torch import load_file

    from pusa_ray.cli import main

    tiny = load_components("tiny", device="cpu")
    torch.save(pusa_state(tiny.model.transformer), tmp_path / "pusa_v1.pt")
    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "2", "--quiet", "--frames", "5"]
    runs = {"base": [], "zero": ["--lora", str(tmp_path / "pusa_v1.pt"), "--lora-alpha", "0"]}
    runs["default"] = ["--lora", str(tmp_path / "pusa_v1.pt")]
    latents = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.mp4"
        assert main([*common, *extra, "--out", str(out), "--save-latents", str(tmp_path / f"{name}.st")]) == 0
        latents[name] = load_file(tmp_path / f"{name}.st")["latents"]
    assert torch.equal(latents["zero"], latents["base"])
    assert not torch.allclose(latents["default"], latents["base"], atol=1e-3)
