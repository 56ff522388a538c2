"""Prompt encoding with Wan's conventions, as diffusers' Wan pipelines implement them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pusa_ray.config import TEXT_LENGTH

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def byte_tokenizer(max_length: int = TEXT_LENGTH) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer over UTF-8 bytes, built offline: pad 0, eos 1, unk 2, then 256 bytes."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + index for index, symbol in enumerate(alphabet)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _t5_style(tokenizer, max_length)


def _t5_style(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """T5's conventions around a tokenizer: `</s>` appended, pad 0, eos 1, unk 2."""
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def word_tokenizer(words: Sequence[str], max_length: int) -> PreTrainedTokenizerFast:
    """A T5-style word-level tokenizer, built offline: pad 0, eos 1, unk 2, then `words` in order.

    Text is lower-cased, punctuation dropped, split on whitespace; words outside the list become unk.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    return _t5_style(tokenizer, max_length)


@torch.no_grad()
def encode_hidden(
    tokenizer: PreTrainedTokenizerFast,
    text_encoder: torch.nn.Module,
    prompts: list[str],
    max_length: int = TEXT_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's tokenization and encoder pass: hidden states `[B, max_length, D]` and mask `[B, max_length]`."""
    cleaned = [prompt_clean(prompt) for prompt in prompts]
    tokens = tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)  # [B, L]
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state  # [B, L, D]
    return hidden, mask


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast,
    text_encoder: torch.nn.Module,
    prompts: list[str],
    max_length: int = TEXT_LENGTH,
) -> torch.Tensor:
    """Prompts -> embeddings `[B, max_length, D]`, padded to `max_length` with zeros past each mask."""
    hidden, mask = encode_hidden(tokenizer, text_encoder, prompts, max_length)
    return hidden * mask[..., None].to(hidden.dtype)
