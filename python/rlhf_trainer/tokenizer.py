"""The built-in task's tokenizer: a `tokenizers` word-level model over the task's
vocabulary, built in code (no files, no hub), wrapped as a transformers fast tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .task import EOS, PAD, VOCAB


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(VOCAB)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD, eos_token=EOS, unk_token=PAD)
