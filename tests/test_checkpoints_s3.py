"""Models and adapters from s3:// (a real moto server on loopback), through the CLI."""

import pytest
import torch
from safetensors.torch import load_file

from pusa_ray import storage
from pusa_ray.cli import main
from pusa_ray.models.loading import load_components, save_model_dir
from pusa_ray.pipeline import default_settings, generate

pytestmark = pytest.mark.s3


def test_model_round_trip_through_s3_gives_identical_outputs(s3_bucket, cache_dir, capsys):
    uri = f"{s3_bucket}/models/tiny"
    assert main(["convert", "tiny", uri]) == 0
    listed = {entry.path for entry in storage.read_manifest(uri).files}  # committed, manifest last
    assert "transformer/diffusion_pytorch_model.safetensors" in listed
    assert set(storage.list_files(uri)) == listed | {"_MANIFEST.json"}
    local, remote = load_components("tiny", device="cpu"), load_components(uri, device="cpu")
    settings = default_settings(local, steps=2, seed=4)
    assert torch.equal(
        generate(local, "a fox", [], settings).latents, generate(remote, "a fox", [], settings).latents
    )
    assert any(cache_dir.rglob("diffusion_pytorch_model.safetensors"))  # fetched once into the cache


def test_uncommitted_model_directory_is_refused(s3_bucket, cache_dir, tmp_path, capsys):
    save_model_dir(load_components("tiny", device="cpu"), tmp_path / "model")
    capsys.readouterr()
    uri = f"{s3_bucket}/models/half-written"
    storage.upload_dir(tmp_path / "model", uri)  # no manifest: not committed
    code = main(["generate", "--prompt", "x", "--model", uri, "--out", str(tmp_path / "x.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and uri in err and len(err.strip().splitlines()) == 1


def test_adapter_from_s3_in_our_format(s3_bucket, cache_dir, tmp_path):
    from tests.test_lora import pusa_state

    tiny = load_components("tiny", device="cpu")
    torch.save(pusa_state(tiny.model.transformer), tmp_path / "pusa_v1.pt")
    uri = f"{s3_bucket}/adapters/pusa/adapter.safetensors"
    assert main(["convert", str(tmp_path / "pusa_v1.pt"), uri, "--base-model", "tiny"]) == 0
    common = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--quiet",
        "--frames",
        "5",
        "--lora-alpha",
        "1.4",
    ]
    for name, source in (("local", str(tmp_path / "pusa_v1.pt")), ("s3", uri)):
        out = tmp_path / f"{name}.mp4"
        assert (
            main(
                [*common, "--lora", source, "--out", str(out), "--save-latents", str(tmp_path / f"{name}.st")]
            )
            == 0
        )
    assert torch.equal(load_file(tmp_path / "local.st")["latents"], load_file(tmp_path / "s3.st")["latents"])
