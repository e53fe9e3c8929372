"""A byte-level BPE tokenizer trained offline on a corpus, wrapped as a transformers tokenizer.

Byte-level so that any text (the real MMEdit strings too) tokenizes without unknown tokens;
trained on the mini world so its words are single tokens and sequences stay short.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]  # ids 0..4 in this order


def train_tokenizer(corpus: Iterable[str], vocab_size: int,
                    extra_special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """``extra_special``: a family's template markers (e.g. Qwen's ``<|im_start|>``), kept whole
    and given the ids after the common special tokens."""
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK,
                                   extra_special_tokens={"image_token": IMAGE},
                                   additional_special_tokens=list(extra_special) or None)
