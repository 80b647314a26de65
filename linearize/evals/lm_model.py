"""``--model linearize`` for lm-eval's command line, registered when this module is imported.

lm-eval 0.4.13 finds models only in its own registry (``lm_eval.models.MODEL_MAPPING`` plus
``@register_model`` calls made in the running process); it reads no entry points, so an installed
package cannot add ``lm_eval --model linearize`` without patching lm-eval. ``python -m linearize.evals``
imports this module and then runs lm-eval's own command line, which gives the same effect:

    python -m linearize.evals run --model linearize --model_args pretrained=DIR --tasks piqa

Plain lm-eval works on converted folders without this: ``lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True`` (the folder carries its modeling code). ``linearize``
differs in that it loads any source ``linearize.sources`` resolves (folders, hub ids, ``.gguf``
files, ``smollm2-135m``) through the installed package, with no remote code.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: the registry is filled lazily)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from linearize.config import DTYPE_NAMES, torch_dtype
from linearize.environment import check_device, default_device
from linearize.evals.scoring import SlicedScoring


@register_model("linearize")
class LinearizeLM(SlicedScoring, HFLM):
    """lm-eval's ``HFLM`` around a model loaded by ``linearize.sources.load_model``; loglikelihood
    requests apply the LM head to the scored positions only (:class:`SlicedScoring`).

    ``device``: lm-eval's ``--device`` (default: cuda when torch sees one, else cpu); a CUDA device
    on a machine without one is a one-line :class:`linearize.environment.DeviceError`.
    """

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str | None = None,
                 tokenizer=None, **kwargs) -> None:
        from linearize.sources import load_model, load_tokenizer

        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        device = check_device(device or default_device())
        model = load_model(pretrained, dtype=torch_dtype(dtype), device=device)
        tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(
            tokenizer or pretrained)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
