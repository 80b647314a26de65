"""Streaming text generation from any checkpoint (converted or not)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import TextIteratorStreamer


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

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
