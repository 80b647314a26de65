"""Streaming text generation from any checkpoint (converted or not)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import torch
from transformers import TextIteratorStreamer


def check_generation_settings(prompt: str, *, max_new_tokens: int, temperature: float, top_p: float,
                              num_beams: int) -> None:
    """Refuse, before any model is loaded, settings ``generate_stream`` cannot use: a ``ValueError``
    "name=value: what is allowed"."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r}: must be non-empty text to continue")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 decodes greedily)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: must be a number in (0, 1]")


def generate_stream(
    source,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    chat: bool = False,
    seed: int = 0,
) -> Iterator[str]:
    """Yield decoded text pieces as they are generated. ``temperature == 0`` decodes greedily."""
    from .sources import load_teacher

    check_generation_settings(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              num_beams=num_beams)
    model, tokenizer = load_teacher(source)
    model.eval()
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = dict(
        **inputs, max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=num_beams,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    if num_beams > 1:  # beams finish together: no token stream, yield the whole answer
        out = model.generate(**kwargs)
        yield tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            model.generate(**kwargs, streamer=streamer)
        except BaseException as err:  # re-raised in the caller's thread below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
