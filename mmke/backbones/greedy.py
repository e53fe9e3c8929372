"""Settings for plain greedy decoding through Hugging Face ``generate``, whatever the checkpoint says.

``generate`` fills every setting the caller leaves unset from the checkpoint's
``generation_config.json``, and a released config can change greedy decoding even with
``do_sample=False``: a ``repetition_penalty`` (instruct releases often ship one), ``min_length``
(no end token before it), ``no_repeat_ngram_size`` or suppressed tokens. Generated-answer scoring must
compare families on the same rule (argmax at each step, stop at the end token, at most
``max_new_tokens``), so every logits processor a checkpoint could switch on is switched off here.
"""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig

#: values that turn each logits processor and sampling warper of ``generate`` off
_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": None, "no_repeat_ngram_size": None,
    "encoder_no_repeat_ngram_size": None, "bad_words_ids": None, "sequence_bias": None,
    "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "watermarking_config": None,
    "temperature": None, "top_k": None, "top_p": None, "min_p": None, "typical_p": None,
    "epsilon_cutoff": None, "eta_cutoff": None, "top_h": None, "stop_strings": None,
    "max_time": None, "length_penalty": None, "num_return_sequences": 1,
}


def greedy_settings(max_new_tokens: int, eos_token_id: int | list[int] | None,
                    pad_token_id: int) -> dict[str, Any]:
    """Keyword arguments for ``model.generate``: greedy, one sequence per prompt, stopping at
    ``eos_token_id`` (one id or several) or after ``max_new_tokens`` new tokens."""
    known = GenerationConfig().to_dict()
    # a key this transformers version does not know would reach the model's forward as an input
    neutral = {k: v for k, v in _NEUTRAL.items() if k in known}
    return {**neutral, "max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
