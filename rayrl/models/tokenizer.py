"""A character-level tokenizer built locally, saved as an ordinary tokenizer.json.

No hub: the vocabulary is printable ASCII plus newline and three special tokens,
which covers the synthetic task. Characters outside it map to <|unk|>.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SPECIALS = [PAD, EOS, UNK]
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids are stable across builds."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE with no merges and no pre-tokenizer splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.add_special_tokens(SPECIALS)
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
