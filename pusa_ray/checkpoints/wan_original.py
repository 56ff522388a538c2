"""Wan2.1's original release layout (Wan-AI/Wan2.1-T2V-1.3B and -14B), read into diffusers/transformers
modules and written back.

A release folder holds:

    config.json                             WanModel config, original keys (dim, num_heads, ...)
    diffusion_pytorch_model.safetensors     the DiT with original key names (1.3B), or shards
      diffusion_pytorch_model-0000N-of-0000M.safetensors + diffusion_pytorch_model.safetensors.index.json
    Wan2.1_VAE.pth                          torch-pickled VAE state dict, original key names
    models_t5_umt5-xxl-enc-bf16.pth         torch-pickled state dict of Wan's own T5 encoder module
    google/umt5-xxl/                        the Hugging Face tokenizer

Names move through key tables (data): `DIT_KEYS` and `T5_KEYS` are template rows, the VAE's rows are
generated from its structure by `vae_keys`. Each table is used in both directions; tests hold the
DiT and VAE tables against diffusers' own converters (`convert_wan_transformer_to_diffusers`,
`convert_wan_vae_to_diffusers`) on the released architectures. Those converters are one-way, and
the VAE's is hard-wired to the released structure (two residual blocks per stage), so it cannot
read the tiny preset's VAE; transformers has no converter for Wan's T5.

Loading builds each module with its parameters on the meta device and streams the weights in, one
safetensors shard or one mmapped `.pth` at a time, so host memory never holds two copies of a
model: a tensor that needs no cast stays the file's mmapped copy-on-write pages (zero copy).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from pusa_ray.config import TEXT_LENGTH
from pusa_ray.errors import UserInputError

CONFIG_FILE = "config.json"
DIT_FILE = "diffusion_pytorch_model.safetensors"
DIT_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
DIT_SHARD_FILE = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
# Wan's T5 code fixes these; a text encoder that differs (the tiny preset's) records them here so that
# the layout round-trips. Wan's own loaders never read this file.
T5_SETTINGS_FILE = "pusa_ray_text_encoder.json"
WAN_T5_SETTINGS: dict[str, Any] = {
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
}
WAN_ROPE_MAX_SEQ_LEN = 1024  # Wan's rope table covers 1024 positions per axis

_DIT_SHARD_PATTERN = re.compile(r"^diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors$")
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class KeyTable:
    """Two-way renaming from (original, diffusers) template rows.

    A row names a module or parameter path on each side; `{i}` stands for a block index. A key
    matches a row when it is the path itself or the path followed by `.leaf` (`.weight`, `.bias`,
    `.gamma`), and the leaf carries over. The first matching row wins.
    """

    def __init__(self, rows: Iterable[tuple[str, str]]) -> None:
        self.rows = tuple(rows)
        self._to_diffusers = [(self._pattern(original), diffusers) for original, diffusers in self.rows]
        self._to_original = [(self._pattern(diffusers), original) for original, diffusers in self.rows]

    @staticmethod
    def _pattern(template: str) -> re.Pattern[str]:
        body = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
        return re.compile(rf"^{body}(?P<leaf>\..+)?$")

    @staticmethod
    def _rename(key: str, rows: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in rows:
            match = pattern.match(key)
            if match:
                index = match.groupdict().get("i")
                return target.replace("{i}", index or "") + (match["leaf"] or "")
        return None

    def to_diffusers(self, key: str) -> str | None:
        """The diffusers/transformers name of an original key, or None when no row matches."""
        return self._rename(key, self._to_diffusers)

    def to_original(self, key: str) -> str | None:
        """The original name of a diffusers/transformers key, or None when no row matches."""
        return self._rename(key, self._to_original)


# The DiT: original Wan names (wan/modules/model.py) <-> diffusers' WanTransformer3DModel. Original
# `norm3` (the affine cross-attention norm) is diffusers' `norm2`; the other two norms have no weights.
DIT_KEYS = KeyTable(
    [
        ("patch_embedding", "patch_embedding"),
        ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        ("time_projection.1", "condition_embedder.time_proj"),
        ("head.head", "proj_out"),
        ("head.modulation", "scale_shift_table"),
        ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
        ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
        ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
        ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
        ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
        ("blocks.{i}.self_attn.norm_q", "blocks.{i}.attn1.norm_q"),
        ("blocks.{i}.self_attn.norm_k", "blocks.{i}.attn1.norm_k"),
        ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
        ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
        ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
        ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
        ("blocks.{i}.cross_attn.norm_q", "blocks.{i}.attn2.norm_q"),
        ("blocks.{i}.cross_attn.norm_k", "blocks.{i}.attn2.norm_k"),
        ("blocks.{i}.norm3", "blocks.{i}.norm2"),
        ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
        ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ]
)

# The text encoder: Wan's T5Encoder (wan/modules/t5.py, umt5-xxl: one relative position embedding
# per block) <-> transformers' UMT5EncoderModel. `encoder.embed_tokens` is tied to `shared`.
T5_KEYS = KeyTable(
    [
        ("token_embedding", "shared"),
        ("blocks.{i}.norm1", "encoder.block.{i}.layer.0.layer_norm"),
        ("blocks.{i}.attn.q", "encoder.block.{i}.layer.0.SelfAttention.q"),
        ("blocks.{i}.attn.k", "encoder.block.{i}.layer.0.SelfAttention.k"),
        ("blocks.{i}.attn.v", "encoder.block.{i}.layer.0.SelfAttention.v"),
        ("blocks.{i}.attn.o", "encoder.block.{i}.layer.0.SelfAttention.o"),
        (
            "blocks.{i}.pos_embedding.embedding",
            "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias",
        ),
        ("blocks.{i}.norm2", "encoder.block.{i}.layer.1.layer_norm"),
        ("blocks.{i}.ffn.gate.0", "encoder.block.{i}.layer.1.DenseReluDense.wi_0"),
        ("blocks.{i}.ffn.fc1", "encoder.block.{i}.layer.1.DenseReluDense.wi_1"),
        ("blocks.{i}.ffn.fc2", "encoder.block.{i}.layer.1.DenseReluDense.wo"),
        ("norm", "encoder.final_layer_norm"),
    ]
)

# The VAE's leaves: Wan's residual block is one nn.Sequential (norm, SiLU, conv, norm, SiLU,
# dropout, conv) plus a shortcut; diffusers names its parts. Attention and resample leaves keep names.
_VAE_RESIDUAL_LEAVES = (
    ("residual.0", "norm1"),
    ("residual.2", "conv1"),
    ("residual.3", "norm2"),
    ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
)
_VAE_ATTENTION_LEAVES = (("norm", "norm"), ("to_qkv", "to_qkv"), ("proj", "proj"))
_VAE_RESAMPLE_LEAVES = (("resample.1", "resample.1"), ("time_conv", "time_conv"))


def _vae_block(leaves: tuple[tuple[str, str], ...], original: str, diffusers: str) -> list[tuple[str, str]]:
    return [(f"{original}.{a}", f"{diffusers}.{b}") for a, b in leaves]


def vae_keys(num_res_blocks: int, num_stages: int) -> KeyTable:
    """The VAE's rows for a structure: Wan keeps flat lists where diffusers nests blocks.

    The encoder's `downsamples.{n}` is diffusers' `down_blocks.{n}` (both flat: per stage
    `num_res_blocks` residual blocks, then a resample except after the last stage). The decoder's
    flat `upsamples.{n}` holds per stage `num_res_blocks + 1` residual blocks and a resample, which
    diffusers nests as `up_blocks.{stage}.resnets.{r}` and `up_blocks.{stage}.upsamplers.0`.
    """
    rows = [("conv1", "quant_conv"), ("conv2", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        rows += [
            (f"{side}.conv1", f"{side}.conv_in"),
            (f"{side}.head.0", f"{side}.norm_out"),
            (f"{side}.head.2", f"{side}.conv_out"),
        ]
        rows += _vae_block(_VAE_RESIDUAL_LEAVES, f"{side}.middle.0", f"{side}.mid_block.resnets.0")
        rows += _vae_block(_VAE_ATTENTION_LEAVES, f"{side}.middle.1", f"{side}.mid_block.attentions.0")
        rows += _vae_block(_VAE_RESIDUAL_LEAVES, f"{side}.middle.2", f"{side}.mid_block.resnets.1")
    flat = 0
    for stage in range(num_stages):
        for _ in range(num_res_blocks):
            name = f"downsamples.{flat}"
            rows += _vae_block(_VAE_RESIDUAL_LEAVES, f"encoder.{name}", f"encoder.down_blocks.{flat}")
            flat += 1
        if stage < num_stages - 1:
            rows += _vae_block(
                _VAE_RESAMPLE_LEAVES, f"encoder.downsamples.{flat}", f"encoder.down_blocks.{flat}"
            )
            flat += 1
    flat = 0
    for stage in range(num_stages):
        for resnet in range(num_res_blocks + 1):
            target = f"decoder.up_blocks.{stage}.resnets.{resnet}"
            rows += _vae_block(_VAE_RESIDUAL_LEAVES, f"decoder.upsamples.{flat}", target)
            flat += 1
        if stage < num_stages - 1:
            target = f"decoder.up_blocks.{stage}.upsamplers.0"
            rows += _vae_block(_VAE_RESAMPLE_LEAVES, f"decoder.upsamples.{flat}", target)
            flat += 1
    return KeyTable(rows)


# ----------------------------------------------------------------------------------------------
# configs from the files


def transformer_config(release: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """WanTransformer3DModel kwargs from config.json and the checkpoint's tensor shapes.

    config.json gives the sizes; the shapes give what the release config leaves at Wan's defaults
    (patch size, text_dim) and whether the optional norms exist.
    """
    required = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "eps")
    for key in required:
        if key not in release:
            raise UserInputError(
                f"{source} has no {key!r} (a Wan2.1 config.json needs {', '.join(required)})"
            )
    model_type = release.get("model_type", "t2v")
    if model_type != "t2v":
        raise UserInputError(
            f"config.json in {source}: model_type {model_type!r} is not supported (only 't2v')"
        )
    dim, heads = int(release["dim"]), int(release["num_heads"])
    if dim % heads:
        raise UserInputError(f"config.json in {source}: dim {dim} is not a multiple of num_heads {heads}")
    for key in ("patch_embedding.weight", "text_embedding.0.weight"):
        if key not in shapes:
            raise UserInputError(f"missing key {key!r} in the DiT weights of {source}")
    return {
        "patch_size": list(shapes["patch_embedding.weight"][2:]),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(release["in_dim"]),
        "out_channels": int(release["out_dim"]),
        "text_dim": shapes["text_embedding.0.weight"][1],
        "freq_dim": int(release["freq_dim"]),
        "ffn_dim": int(release["ffn_dim"]),
        "num_layers": int(release["num_layers"]),
        "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        "eps": float(release["eps"]),
        "rope_max_seq_len": WAN_ROPE_MAX_SEQ_LEN,
    }


def release_config(transformer: WanTransformer3DModel) -> dict[str, Any]:
    """config.json of a release (original keys) for a diffusers DiT; refuses what Wan T2V cannot hold."""
    config = transformer.config
    unsupported = {
        "added_kv_proj_dim": config.added_kv_proj_dim,
        "image_dim": config.image_dim,
        "pos_embed_seq_len": config.pos_embed_seq_len,
    }
    for key, value in unsupported.items():
        if value is not None:
            raise ValueError(f"transformer config {key}={value!r}: the Wan2.1 T2V layout has no place for it")
    if config.qk_norm not in ("rms_norm_across_heads", None):
        raise ValueError(f"transformer config qk_norm={config.qk_norm!r}: Wan normalises across heads")
    return {
        "_class_name": "WanModel",
        "dim": config.num_attention_heads * config.attention_head_dim,
        "eps": config.eps,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "in_dim": config.in_channels,
        "model_type": "t2v",
        "num_heads": config.num_attention_heads,
        "num_layers": config.num_layers,
        "out_dim": config.out_channels,
        "text_len": TEXT_LENGTH,
    }


def _shape(shapes: dict[str, tuple[int, ...]], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UserInputError(f"missing key {key!r} in {source}")
    return shapes[key]


def _flat_indices(shapes: dict[str, tuple[int, ...]], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(match[1]) for key in shapes if (match := pattern.match(key))})


def vae_config(shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """AutoencoderKLWan kwargs read off a Wan VAE state dict's shapes (released or tiny alike)."""
    base_dim, in_channels = _shape(shapes, "encoder.conv1.weight", source)[:2]
    z_dim = _shape(shapes, "conv2.weight", source)[0]
    stages: list[list[int]] = [[]]  # residual entries of encoder.downsamples, per stage
    temporal: list[bool] = []
    for index in _flat_indices(shapes, "encoder.downsamples"):
        name = f"encoder.downsamples.{index}"
        if f"{name}.resample.1.weight" in shapes:
            temporal.append(f"{name}.time_conv.weight" in shapes)
            stages.append([])
        elif f"{name}.residual.2.weight" in shapes:
            stages[-1].append(index)
        else:
            raise UserInputError(f"{source}: {name} is neither a residual block nor a resample")
    num_res_blocks = len(stages[0])
    if num_res_blocks == 0 or any(len(stage) != num_res_blocks for stage in stages):
        counts = [len(stage) for stage in stages]
        raise UserInputError(f"{source}: residual blocks per encoder stage {counts} are not uniform")
    dim_mult = [
        _shape(shapes, f"encoder.downsamples.{stage[0]}.residual.2.weight", source)[0] // base_dim
        for stage in stages
    ]
    decoder_out = _shape(shapes, "decoder.head.2.weight", source)
    if z_dim != 16:
        raise UserInputError(f"{source}: z_dim {z_dim} (Wan2.1's VAE has 16 latent channels)")
    decoder_base_dim = decoder_out[1] // dim_mult[0]
    return {
        "base_dim": base_dim,
        "decoder_base_dim": None if decoder_base_dim == base_dim else decoder_base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "in_channels": in_channels,
        "out_channels": decoder_out[0],
    }


def text_encoder_config(
    shapes: dict[str, tuple[int, ...]], settings: dict[str, Any], source: str
) -> UMT5Config:
    """UMT5Config read off Wan's T5 state dict shapes, plus Wan's fixed settings (or recorded ones)."""
    vocab_size, d_model = _shape(shapes, "token_embedding.weight", source)
    num_buckets, num_heads = _shape(shapes, "blocks.0.pos_embedding.embedding.weight", source)
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=_shape(shapes, "blocks.0.attn.q.weight", source)[0] // num_heads,
        d_ff=_shape(shapes, "blocks.0.ffn.fc1.weight", source)[0],
        num_layers=len(_flat_indices(shapes, "blocks")),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        **{**WAN_T5_SETTINGS, **settings},
    )


# ----------------------------------------------------------------------------------------------
# streaming into modules built on the meta device


def empty_module(factory: Callable[[], ModuleT]) -> ModuleT:
    """Build a module whose parameters are on the meta device and whose buffers are real.

    Buffers are built on the CPU as the constructor computes them: non-persistent ones (the DiT's
    rope tables) are in no checkpoint, so building them for real is what keeps them correct.
    (`torch.device("meta")` would leave them on meta.) accelerate's context patches
    `nn.Module.register_parameter` for its duration: build from one thread at a time.
    """
    with init_empty_weights(include_buffers=False):
        return factory()


def _keeps_float32(model: torch.nn.Module, name: str) -> bool:
    # The rule of pusa_ray.models.loading.cast_parameters (and diffusers): any path component listed.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return bool(keep.intersection(name.split(".")))


def _tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """{alias: source} of tied parameters (transformers declares them; embed_tokens -> shared)."""
    return dict(getattr(model, "_tied_weights_keys", None) or {})


class _StreamingLoader:
    """Moves tensors named in the original layout into a meta-built module, one source at a time.

    Every tensor is renamed by the table, checked (known name, loaded once, shape), cast (floating
    tensors to `dtype`, the module's fp32-kept parts to float32) and assigned in place of the meta
    parameter. A tensor that needs no cast or move stays the file's mmapped, copy-on-write memory.
    """

    def __init__(
        self, model: torch.nn.Module, table: KeyTable, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model, self.table, self.dtype, self.device = model, table, dtype, device
        self.tied = _tied_keys(model)
        state = model.state_dict(keep_vars=True)
        self.expected = {name: tensor for name, tensor in state.items() if name not in self.tied}
        self.loaded: dict[str, str] = {}  # diffusers name -> the original key it came from

    def load(self, source: str, keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> None:
        batch = {}
        for key in keys:
            target = self.table.to_diffusers(key)
            if target is None or target not in self.expected:
                raise UserInputError(f"unexpected key {key!r} in {source}")
            if target in self.loaded:
                raise UserInputError(f"key {key!r} in {source} appears twice")
            tensor = get(key)
            if not isinstance(tensor, torch.Tensor):
                raise UserInputError(
                    f"key {key!r} in {source} holds a value of type {type(tensor).__name__}, not a tensor"
                )
            wanted = self.expected[target]
            if tuple(tensor.shape) != tuple(wanted.shape):
                raise UserInputError(
                    f"key {key!r} in {source} has shape {tuple(tensor.shape)}, "
                    f"the model needs {tuple(wanted.shape)}"
                )
            if wanted.is_floating_point() != tensor.is_floating_point():
                raise UserInputError(f"key {key!r} in {source} has dtype {tensor.dtype}, not {wanted.dtype}")
            dtype = tensor.dtype
            if tensor.is_floating_point():
                dtype = torch.float32 if _keeps_float32(self.model, target) else self.dtype
            batch[target] = tensor.to(device=self.device, dtype=dtype)
            self.loaded[target] = key
        self.model.load_state_dict(batch, strict=False, assign=True)

    def finish(self, source: str) -> None:
        missing = [name for name in self.expected if name not in self.loaded]
        if missing:
            names = [self.table.to_original(name) or name for name in missing]
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise UserInputError(f"missing key {names[0]!r} in {source}{more}")
        for alias, origin in self.tied.items():
            module_name, _, attribute = alias.rpartition(".")
            setattr(self.model.get_submodule(module_name), attribute, self.model.get_parameter(origin))
        self.model.to(self.device)  # the buffers built on the CPU
        left = [name for name, tensor in _named_tensors(self.model) if tensor.is_meta]
        if left:
            raise RuntimeError(f"{type(self.model).__name__}: {left[:5]} still on the meta device")


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _load_pth(file: Path) -> dict[str, torch.Tensor]:
    """A torch-pickled state dict, memory-mapped; nothing but tensors and containers is unpickled."""
    if not file.is_file():
        raise UserInputError(f"missing file {str(file)!r} (Wan2.1 release layout)")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap can only be used" not in str(error):
                raise UserInputError(f"{str(file)!r} is not a readable torch checkpoint: {error}") from None
            # the legacy (pre-zip) format cannot be mapped: read it whole, still weights only
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(f"refusing to unpickle {str(file)!r}: {_refusal_reason(error)}") from None
    if not isinstance(state, dict):
        raise UserInputError(f"{str(file)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what was refused (the rest is advice)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = detail.split(". Please use")[0]
    if "Unsupported global" in detail:
        return f"it holds objects other than tensors, which weights-only loading refuses ({detail})"
    return f"not a weights-only torch checkpoint ({detail})"


def _pth_shapes(state: dict[str, Any], source: str) -> dict[str, tuple[int, ...]]:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserInputError(
                f"key {key!r} in {source} holds a value of type {type(value).__name__}, not a tensor"
            )
    return {key: tuple(value.shape) for key, value in state.items()}


def _dit_files(path: Path) -> dict[Path, list[str] | None]:
    """The DiT's safetensors files, each with the keys the index assigns it (None: no index)."""
    index_file, single = path / DIT_INDEX_FILE, path / DIT_FILE
    if index_file.is_file() and single.is_file():
        raise UserInputError(
            f"{str(path)!r} holds both {DIT_FILE} and {DIT_INDEX_FILE}: which one is the DiT?"
        )
    if single.is_file():
        return {single: None}
    if not index_file.is_file():
        raise UserInputError(f"missing file {str(single)!r} (or {DIT_INDEX_FILE}) in {str(path)!r}")
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserInputError(f"{str(index_file)!r} is not a safetensors index: {error!r}") from None
    files: dict[Path, list[str] | None] = {}
    for key, shard in weight_map.items():
        file = path / shard
        if Path(shard).name != shard or not file.is_file():
            raise UserInputError(f"{str(index_file)!r} names shard {shard!r} for key {key!r}: no such file")
        files.setdefault(file, []).append(key)  # type: ignore[union-attr]
    return files


def _safetensors_shapes(files: dict[Path, list[str] | None]) -> dict[str, tuple[int, ...]]:
    """Every key's shape, read from the shard headers only; checks the index against the shards."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, listed in files.items():
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            raise UserInputError(f"{str(file)!r} is not a readable safetensors file: {error}") from None
        with handle:
            keys = list(handle.keys())
            if listed is not None and set(keys) != set(listed):
                extra = sorted(set(keys) ^ set(listed))[0]
                raise UserInputError(f"{DIT_INDEX_FILE} and shard {file.name} disagree about key {extra!r}")
            for key in keys:
                if key in shapes:
                    raise UserInputError(f"key {key!r} appears in more than one shard ({file.name})")
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _read_release_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise UserInputError(f"missing file {str(file)!r} (Wan2.1 release layout)")
    try:
        release = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"{str(file)!r} is not JSON: {error}") from None
    if not isinstance(release, dict):
        raise UserInputError(f"{str(file)!r} holds a {type(release).__name__}, not a config object")
    return release


def load_original_transformer(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> WanTransformer3DModel:
    """The DiT of a release folder (config.json + one safetensors file or indexed shards), streamed."""
    path, device = Path(path), torch.device(device)
    files = _dit_files(path)
    shapes = _safetensors_shapes(files)
    config = transformer_config(_read_release_config(path), shapes, str(path))
    model = empty_module(lambda: WanTransformer3DModel(**config))
    loader = _StreamingLoader(model, DIT_KEYS, dtype, device)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            loader.load(str(file), list(handle.keys()), handle.get_tensor)
    sharded = next(iter(files.values())) is not None
    loader.finish(f"{path / DIT_INDEX_FILE} and its shards" if sharded else str(path / DIT_FILE))
    return model.eval()


def load_original_vae(
    file: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AutoencoderKLWan:
    """Wan2.1_VAE.pth (original key names) as diffusers' AutoencoderKLWan, its config read off the shapes."""
    file, device = Path(file), torch.device(device)
    state = _load_pth(file)
    config = vae_config(_pth_shapes(state, str(file)), str(file))
    model = empty_module(lambda: AutoencoderKLWan(**config))
    loader = _StreamingLoader(
        model, vae_keys(config["num_res_blocks"], len(config["dim_mult"])), dtype, device
    )
    loader.load(str(file), list(state), state.pop)  # pop: each mmapped source tensor goes once used
    loader.finish(str(file))
    return model.eval()


def _t5_settings(path: Path) -> dict[str, Any]:
    file = path / T5_SETTINGS_FILE
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"{str(file)!r} is not JSON: {error}") from None
    unknown = sorted(set(settings) - set(WAN_T5_SETTINGS)) if isinstance(settings, dict) else [settings]
    if unknown:
        raise UserInputError(
            f"{str(file)!r}: unknown setting {unknown[0]!r} (known: {sorted(WAN_T5_SETTINGS)})"
        )
    return settings


def load_original_text_encoder(
    file: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    settings: dict[str, Any] | None = None,
) -> UMT5EncoderModel:
    """Wan's T5 encoder state dict (models_t5_umt5-xxl-enc-bf16.pth) as transformers' UMT5EncoderModel."""
    file, device = Path(file), torch.device(device)
    state = _load_pth(file)
    config = text_encoder_config(_pth_shapes(state, str(file)), settings or {}, str(file))
    model = empty_module(lambda: UMT5EncoderModel(config))
    loader = _StreamingLoader(model, T5_KEYS, dtype, device)
    loader.load(str(file), list(state), state.pop)
    loader.finish(str(file))
    return model.eval()


def is_original_release(path: str | Path) -> bool:
    """Whether `path` is a folder in Wan2.1's original layout (a WanModel config.json beside DiT weights)."""
    path = Path(path)
    try:
        release = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    has_weights = (path / DIT_FILE).is_file() or (path / DIT_INDEX_FILE).is_file()
    return isinstance(release, dict) and release.get("_class_name") == "WanModel" and has_weights


def load_original_release(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    vae_dtype: torch.dtype = torch.float32,
) -> tuple[WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, PreTrainedTokenizerBase]:
    """DiT, VAE, text encoder and tokenizer of a Wan2.1 release folder, in eval mode on `device`.

    The DiT and text encoder come in `dtype` (their fp32-kept parts in float32, as diffusers and
    transformers keep them), the VAE in `vae_dtype`. Any missing, unexpected or wrongly shaped
    tensor is a `UserInputError` (a ValueError) naming the key and the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{str(path)!r} is not a folder (Wan2.1 release layout)")
    transformer = load_original_transformer(path, dtype, device)
    vae = load_original_vae(path / VAE_FILE, vae_dtype, device)
    text_encoder = load_original_text_encoder(path / T5_FILE, dtype, device, _t5_settings(path))
    tokenizer_dir = path / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise UserInputError(f"missing tokenizer folder {str(tokenizer_dir)!r} (Wan2.1 release layout)")
    return transformer, vae, text_encoder, AutoTokenizer.from_pretrained(tokenizer_dir)


# ----------------------------------------------------------------------------------------------
# writing


def original_state_dict(model: torch.nn.Module, table: KeyTable) -> dict[str, torch.Tensor]:
    """A module's tensors under their original names (tied aliases dropped: the original has one)."""
    tied = _tied_keys(model)
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        original = table.to_original(name)
        if original is None:
            raise ValueError(f"{type(model).__name__} key {name!r} has no name in the Wan2.1 layout")
        if original in renamed:
            raise ValueError(f"two {type(model).__name__} keys map to the original key {original!r}")
        renamed[original] = tensor.detach()
    return renamed


def _replace_atomically(file: Path, write: Callable[[Path], None]) -> None:
    # A new inode, renamed over the old one: tensors still mapped from the old file stay valid
    # (truncating it in place would turn them into SIGBUS), and readers never see half a file.
    partial = file.with_name(f".{file.name}.partial")
    try:
        write(partial)
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    contiguous = {key: tensor.cpu().contiguous() for key, tensor in tensors.items()}
    _replace_atomically(file, lambda target: save_file(contiguous, str(target), metadata={"format": "pt"}))


def _save_pth(tensors: dict[str, torch.Tensor], file: Path) -> None:
    def owned(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.cpu()
        # torch.save writes a view's whole storage: keep only the bytes this tensor uses.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        return tensor

    state = {key: owned(tensor) for key, tensor in tensors.items()}
    _replace_atomically(file, lambda target: torch.save(state, target))


def _plan_shards(tensors: dict[str, torch.Tensor], shard_size_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_original_transformer(
    transformer: WanTransformer3DModel, path: str | Path, shard_size_bytes: int | None = None
) -> list[Path]:
    """config.json and the DiT under original names: one file, or shards of at most `shard_size_bytes`
    (a larger tensor gets a shard of its own) with an index. Returns the weight files written."""
    path = Path(path)
    if shard_size_bytes is not None and shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    config = release_config(transformer)
    tensors = original_state_dict(transformer, DIT_KEYS)
    path.mkdir(parents=True, exist_ok=True)
    if shard_size_bytes is None:
        written = [path / DIT_FILE]
        _save_safetensors(tensors, written[0])
    else:
        shards = _plan_shards(tensors, shard_size_bytes)
        written, weight_map = [], {}
        for number, keys in enumerate(shards, start=1):
            file = path / DIT_SHARD_FILE.format(index=number, count=len(shards))
            _save_safetensors({key: tensors[key] for key in keys}, file)
            weight_map.update(dict.fromkeys(keys, file.name))
            written.append(file)
        total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _replace_atomically(
            path / DIT_INDEX_FILE, lambda target: target.write_text(json.dumps(index, indent=2))
        )
    _remove_stale_dit_files(path, written)
    _replace_atomically(path / CONFIG_FILE, lambda target: target.write_text(json.dumps(config, indent=2)))
    return written


def _remove_stale_dit_files(path: Path, written: list[Path]) -> None:
    """Drop the DiT files of an earlier write in the other form, so the folder holds exactly one DiT."""
    keep = {file.name for file in written}
    if len(written) > 1 or written[0].name != DIT_FILE:
        keep.add(DIT_INDEX_FILE)
    for file in path.iterdir():
        stale = file.name in (DIT_FILE, DIT_INDEX_FILE) or _DIT_SHARD_PATTERN.match(file.name)
        if stale and file.name not in keep:
            file.unlink()


def _text_encoder_settings(text_encoder: UMT5EncoderModel) -> dict[str, Any]:
    """The settings where this encoder differs from Wan's T5 code (recorded beside the weights)."""
    config = text_encoder.config
    return {key: getattr(config, key) for key, wan in WAN_T5_SETTINGS.items() if getattr(config, key) != wan}


def write_original_release(
    transformer: WanTransformer3DModel,
    vae: AutoencoderKLWan,
    text_encoder: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    shard_size_bytes: int | None = None,
) -> Path:
    """Write the four parts in Wan2.1's original release layout (tensors keep their dtypes)."""
    path = Path(path)
    vae_structure = vae.config
    if vae_structure.is_residual or vae_structure.attn_scales:
        raise ValueError("only Wan2.1's VAE (is_residual=False, no attn_scales) has an original layout")
    # renamed first (no copies), so that a model without an original layout fails before any write
    vae_state = original_state_dict(vae, vae_keys(vae_structure.num_res_blocks, len(vae_structure.dim_mult)))
    text_encoder_state = original_state_dict(text_encoder, T5_KEYS)
    write_original_transformer(transformer, path, shard_size_bytes)
    _save_pth(vae_state, path / VAE_FILE)
    _save_pth(text_encoder_state, path / T5_FILE)
    settings = _text_encoder_settings(text_encoder)
    settings_file = path / T5_SETTINGS_FILE
    if settings:
        _replace_atomically(settings_file, lambda target: target.write_text(json.dumps(settings, indent=2)))
    else:
        settings_file.unlink(missing_ok=True)
    tokenizer.save_pretrained(path / TOKENIZER_DIR)
    return path
