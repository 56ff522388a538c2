"""Wan2.1's original release layout: the tiny model written and read back, key tables against
diffusers' own converters, and clear errors for broken files."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pusa_ray.checkpoints import wan_original
from pusa_ray.checkpoints.wan_original import (
    DIT_FILE,
    DIT_INDEX_FILE,
    DIT_KEYS,
    T5_FILE,
    T5_KEYS,
    VAE_FILE,
    empty_module,
    is_original_release,
    load_original_release,
    vae_keys,
    write_original_release,
)
from pusa_ray.config import get_preset
from pusa_ray.models.loading import build_seeded, cast_parameters, load_components, save_model_dir
from pusa_ray.models.text import encode_prompts

PROMPTS = ["a red circle moves right", "a blue square"]


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


def parts(tiny):
    return tiny.model.transformer, tiny.codec.vae, tiny.text_encoder, tiny.tokenizer


def dit_bytes(transformer):
    return sum(tensor.numel() * tensor.element_size() for tensor in transformer.state_dict().values())


@pytest.fixture(scope="module", params=["sharded", "single"])
def release(request, tiny, tmp_path_factory):
    """(folder, loaded parts) for the tiny model written in the original layout."""
    path = tmp_path_factory.mktemp(request.param)
    shard_size = dit_bytes(tiny.model.transformer) // 4 if request.param == "sharded" else None
    write_original_release(*parts(tiny), path, shard_size_bytes=shard_size)
    shards = list(path.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3 if shard_size else not shards
    return path, load_original_release(path, torch.float32, "cpu")


@pytest.fixture
def single_release(tiny, tmp_path):
    write_original_release(*parts(tiny), tmp_path)
    return tmp_path


def dit_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 3, 8, 8, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    return latents, torch.tensor([700.0, 125.5]), context


def test_dit_outputs_equal_the_reference(tiny, release):
    _, (transformer, _, _, _) = release
    latents, timestep, context = dit_inputs()
    with torch.no_grad():
        expected = tiny.model.transformer(latents, timestep, context, return_dict=False)[0]
        loaded = transformer(latents, timestep, context, return_dict=False)[0]
    assert torch.equal(loaded, expected)  # same weights, same kernels: bit for bit


def test_vae_encode_and_decode_equal_the_reference(tiny, release):
    _, (_, vae, _, _) = release
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = tiny.codec.vae.encode(pixels).latent_dist.mode()
        latents = vae.encode(pixels).latent_dist.mode()
        assert torch.equal(latents, expected)
        decoded = vae.decode(latents, return_dict=False)[0]
        assert torch.equal(decoded, tiny.codec.vae.decode(expected, return_dict=False)[0])


def test_text_encoder_and_tokenizer_reproduce_the_prompt_embeddings(tiny, release):
    _, (_, _, text_encoder, tokenizer) = release
    expected = encode_prompts(tiny.tokenizer, tiny.text_encoder, PROMPTS)
    assert torch.equal(encode_prompts(tokenizer, text_encoder, PROMPTS), expected)
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(text_encoder(ids).last_hidden_state, tiny.text_encoder(ids).last_hidden_state)
    assert text_encoder.shared.weight is text_encoder.encoder.embed_tokens.weight  # tied, as built


def test_every_tensor_is_loaded_bit_for_bit_and_nothing_stays_on_meta(tiny, release):
    _, loaded = release
    for ours, reference in zip(loaded[:3], parts(tiny)[:3], strict=True):
        expected = reference.state_dict()
        assert ours.state_dict().keys() == expected.keys()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
        for name, tensor in [*ours.named_parameters(), *ours.named_buffers()]:
            assert not tensor.is_meta, name
    # the DiT's rope tables are in no checkpoint: rebuilt, and equal where the tiny table has rows
    reference_rope, rope = tiny.model.transformer.rope, loaded[0].rope
    rows = reference_rope.freqs_cos.shape[0]
    assert torch.equal(rope.freqs_cos[:rows], reference_rope.freqs_cos)
    assert torch.equal(rope.freqs_sin[:rows], reference_rope.freqs_sin)


def test_bfloat16_load_keeps_the_fp32_modules_as_cast_parameters_does(release):
    path, _ = release
    transformer, vae, text_encoder, _ = load_original_release(path, torch.bfloat16, "cpu")
    reference_transformer, _, reference_text_encoder = build_seeded(get_preset("tiny"))
    for ours, reference in ((transformer, reference_transformer), (text_encoder, reference_text_encoder)):
        expected = {
            name: p.dtype for name, p in cast_parameters(reference, torch.bfloat16).named_parameters()
        }
        assert {name: p.dtype for name, p in ours.named_parameters()} == expected
    assert transformer.scale_shift_table.dtype == torch.float32
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    assert not any(t.is_meta for t in [*transformer.parameters(), *transformer.buffers()])


def original_dit_names(num_layers):
    """The original Wan DiT key names, spelled out (independently of the key table)."""
    names = {
        "patch_embedding.weight",
        "patch_embedding.bias",
        "head.head.weight",
        "head.head.bias",
        "head.modulation",
    }
    for module in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2"):
        names |= {f"{module}.weight", f"{module}.bias"}
    names |= {"time_projection.1.weight", "time_projection.1.bias"}
    for i in range(num_layers):
        block = f"blocks.{i}"
        names.add(f"{block}.modulation")
        for attention in ("self_attn", "cross_attn"):
            for projection in "qkvo":
                names |= {
                    f"{block}.{attention}.{projection}.weight",
                    f"{block}.{attention}.{projection}.bias",
                }
            names |= {f"{block}.{attention}.norm_q.weight", f"{block}.{attention}.norm_k.weight"}
        for module in ("norm3", "ffn.0", "ffn.2"):
            names |= {f"{block}.{module}.weight", f"{block}.{module}.bias"}
    return names


def read_dit(path):
    tensors = {}
    for file in sorted(path.glob("diffusion_pytorch_model*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_written_dit_has_the_original_names_and_release_config(tiny, release):
    path, _ = release
    written = read_dit(path)
    assert set(written) == original_dit_names(2)
    reference = tiny.model.transformer.state_dict()
    assert torch.equal(written["blocks.0.norm3.weight"], reference["blocks.0.norm2.weight"])  # the swap
    assert torch.equal(written["blocks.1.ffn.0.weight"], reference["blocks.1.ffn.net.0.proj.weight"])
    assert torch.equal(written["head.modulation"], reference["scale_shift_table"])
    config = json.loads((path / "config.json").read_text())
    assert config == {
        "_class_name": "WanModel",
        "dim": 24,
        "eps": 1e-6,
        "ffn_dim": 32,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": 2,
        "num_layers": 2,
        "out_dim": 16,
        "text_len": 512,
    }


def test_diffusers_converter_maps_our_written_keys_back(tiny, release):
    path, _ = release
    converted = convert_wan_transformer_to_diffusers(read_dit(path))
    reference = tiny.model.transformer.state_dict()
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[name], reference[name]) for name in reference)


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_tables_agree_with_diffusers_converters_on_the_released_architectures(preset):
    spec = get_preset(preset)
    transformer = empty_module(lambda: WanTransformer3DModel(**spec.transformer))
    names = list(transformer.state_dict())
    originals = [DIT_KEYS.to_original(name) for name in names]
    assert set(originals) == original_dit_names(spec.transformer["num_layers"])
    converted = convert_wan_transformer_to_diffusers(dict(zip(originals, names, strict=True)))
    assert all(key == name for key, name in converted.items()) and len(converted) == len(names)
    assert [DIT_KEYS.to_diffusers(original) for original in originals] == names

    vae = empty_module(lambda: AutoencoderKLWan(**spec.vae))
    table = vae_keys(spec.vae["num_res_blocks"], len(spec.vae["dim_mult"]))
    names = list(vae.state_dict())
    originals = [table.to_original(name) for name in names]
    converted = convert_wan_vae_to_diffusers(dict(zip(originals, names, strict=True)))
    assert all(key == name for key, name in converted.items()) and len(converted) == len(names)
    shapes = {
        original: tuple(vae.state_dict()[name].shape) for original, name in zip(originals, names, strict=True)
    }
    inferred = wan_original.vae_config(shapes, "release")
    assert {key: inferred[key] for key in spec.vae} == spec.vae


def test_written_vae_and_t5_hold_wan_names(tiny, release):
    path, _ = release
    t5 = torch.load(path / T5_FILE, weights_only=True)
    expected = {"token_embedding.weight", "norm.weight"}
    for i in range(2):
        expected |= {f"blocks.{i}.{name}.weight" for name in ("norm1", "norm2", "pos_embedding.embedding")}
        expected |= {f"blocks.{i}.attn.{name}.weight" for name in "qkvo"}
        expected |= {f"blocks.{i}.ffn.{name}.weight" for name in ("gate.0", "fc1", "fc2")}
    assert set(t5) == expected
    assert torch.equal(t5["token_embedding.weight"], tiny.text_encoder.shared.weight)
    assert json.loads((path / wan_original.T5_SETTINGS_FILE).read_text()) == {
        "relative_attention_max_distance": 32
    }
    vae = torch.load(path / VAE_FILE, weights_only=True)
    assert {"encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.head.2.weight"} <= set(vae)
    # tiny: 1 residual block per stage, so the decoder's flat list is 2 residuals + 1 resample per stage
    assert "decoder.upsamples.2.resample.1.weight" in vae and "decoder.upsamples.3.shortcut.weight" in vae
    assert len(vae) == len(tiny.codec.vae.state_dict())
    assert all(T5_KEYS.to_diffusers(key) for key in t5)


def test_sharded_layout_has_an_index_over_at_least_three_shards(tiny, tmp_path):
    write_original_release(*parts(tiny), tmp_path, shard_size_bytes=dit_bytes(tiny.model.transformer) // 4)
    index = json.loads((tmp_path / DIT_INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / DIT_FILE).exists()
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == original_dit_names(2)
    assert index["metadata"]["total_size"] == dit_bytes(tiny.model.transformer)
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            assert {key for key, name in index["weight_map"].items() if name == shard} == set(handle.keys())


def test_is_original_release(tiny, release, tmp_path):
    path, _ = release
    assert is_original_release(path)
    assert not is_original_release(save_model_dir(tiny, tmp_path / "diffusers"))
    assert not is_original_release(tmp_path / "missing")
    assert not is_original_release(path / DIT_FILE)


def test_rewriting_the_folder_it_was_loaded_from(tiny, tmp_path):
    """Loaded tensors may map the files: rewriting them in place must neither crash nor corrupt."""
    write_original_release(*parts(tiny), tmp_path, shard_size_bytes=dit_bytes(tiny.model.transformer) // 3)
    loaded = load_original_release(tmp_path)
    write_original_release(*loaded, tmp_path)  # sharded -> one file, over the same folder
    assert (tmp_path / DIT_FILE).is_file() and not list(tmp_path.glob("*-of-*.safetensors"))
    assert not (tmp_path / DIT_INDEX_FILE).exists()
    again = load_original_release(tmp_path)
    for first, second in zip(loaded[:3], again[:3], strict=True):
        reference = first.state_dict()
        assert all(torch.equal(tensor, reference[name]) for name, tensor in second.state_dict().items())


def rewrite_dit(path, change):
    tensors = load_file(path / DIT_FILE)
    change(tensors)
    save_file(tensors, path / DIT_FILE)


def rewrite_pth(file, change):
    state = torch.load(file, weights_only=True)
    change(state)
    torch.save(state, file)


BROKEN = {
    "dit missing": (
        DIT_FILE,
        lambda s: s.pop("blocks.1.self_attn.norm_k.weight"),
        "blocks.1.self_attn.norm_k.weight",
    ),
    "dit unexpected": (
        DIT_FILE,
        lambda s: s.update({"blocks.0.extra.weight": torch.zeros(2)}),
        "blocks.0.extra.weight",
    ),
    "dit block beyond num_layers": (
        DIT_FILE,
        lambda s: s.update({"blocks.2.norm3.weight": torch.zeros(24)}),
        "blocks.2.norm3.weight",
    ),
    "dit wrong shape": (
        DIT_FILE,
        lambda s: s.update({"blocks.0.ffn.0.weight": torch.zeros(33, 24)}),
        "blocks.0.ffn.0.weight",
    ),
    "vae missing": (
        VAE_FILE,
        lambda s: s.pop("decoder.upsamples.4.residual.6.bias"),
        "decoder.upsamples.4.residual.6.bias",
    ),
    "vae wrong shape": (
        VAE_FILE,
        lambda s: s.update({"conv1.weight": torch.zeros(32, 32, 1, 1, 2)}),
        "conv1.weight",
    ),
    "t5 missing": (T5_FILE, lambda s: s.pop("blocks.1.ffn.gate.0.weight"), "blocks.1.ffn.gate.0.weight"),
    "t5 unexpected": (
        T5_FILE,
        lambda s: s.update({"pos_embedding.embedding.weight": torch.zeros(8, 2)}),
        "pos_embedding",
    ),
    "t5 wrong shape": (
        T5_FILE,
        lambda s: s.update({"blocks.0.attn.o.weight": torch.zeros(32, 31)}),
        "blocks.0.attn.o.weight",
    ),
    "t5 non-tensor value": (T5_FILE, lambda s: s.update({"norm.weight": 3}), "norm.weight"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_name_the_key_and_file(single_release, case):
    file, change, key = BROKEN[case]
    if file == DIT_FILE:
        rewrite_dit(single_release, change)
    else:
        rewrite_pth(single_release / file, change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as error:
        load_original_release(single_release)
    assert file in str(error.value) or str(single_release) in str(error.value)


def test_an_index_that_disagrees_with_its_shards_is_refused(tiny, tmp_path):
    write_original_release(*parts(tiny), tmp_path, shard_size_bytes=dit_bytes(tiny.model.transformer) // 4)
    index = json.loads((tmp_path / DIT_INDEX_FILE).read_text())
    index["weight_map"].pop("head.modulation")
    (tmp_path / DIT_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"head\.modulation"):
        load_original_release(tmp_path)


class NotATensor:
    pass


def test_pickled_objects_are_refused_without_being_executed(single_release):
    torch.save({"token_embedding.weight": NotATensor()}, single_release / T5_FILE)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*models_t5_umt5-xxl-enc-bf16\.pth") as error:
        load_original_release(single_release)
    assert "objects other than tensors" in str(error.value) and "NotATensor" in str(error.value)
    (single_release / T5_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a weights-only torch checkpoint"):
        load_original_release(single_release)


def test_legacy_pth_format_is_read_without_mmap(tiny, single_release):
    state = torch.load(single_release / VAE_FILE, weights_only=True)
    torch.save(state, single_release / VAE_FILE, _use_new_zipfile_serialization=False)
    vae = load_original_release(single_release)[1]
    expected = tiny.codec.vae.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in vae.state_dict().items())


def test_missing_parts_are_named(single_release):
    shutil.rmtree(single_release / "google")
    with pytest.raises(ValueError, match="umt5-xxl"):
        load_original_release(single_release)
    (single_release / VAE_FILE).unlink()
    with pytest.raises(ValueError, match=r"Wan2\.1_VAE\.pth"):
        load_original_release(single_release)
    config = json.loads((single_release / "config.json").read_text())
    config["model_type"] = "i2v"
    (single_release / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="i2v"):
        load_original_release(single_release)


def test_load_components_and_convert_read_the_original_layout(tmp_path):
    """`--model DIR` takes an original release directly, and `pusa-ray convert` turns it into ours."""
    from pusa_ray.cli import main
    from pusa_ray.models.loading import load_components
    from pusa_ray.pipeline import default_settings, generate

    tiny = load_components("tiny", device="cpu")
    parts = (tiny.model.transformer, tiny.codec.vae, tiny.text_encoder, tiny.tokenizer)
    write_original_release(*parts, tmp_path / "release", shard_size_bytes=20_000)
    released = load_components(str(tmp_path / "release"), device="cpu")
    settings = default_settings(tiny, frames=9, height=32, width=32, steps=2, seed=1)
    expected = generate(tiny, "a fox", [], settings).latents
    assert torch.equal(generate(released, "a fox", [], settings).latents, expected)
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "transformer" / "config.json").is_file()
    converted = load_components(str(tmp_path / "ours"), device="cpu")
    assert torch.equal(generate(converted, "a fox", [], settings).latents, expected)
