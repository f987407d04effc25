"""S2T fused decoding as a transformers `custom_generate` recipe.

    model.generate(**inputs, custom_generate=s2t_hf.generation.CUSTOM_GENERATE_PATH, trust_remote_code=True,
                   s2t=processor, max_new_tokens=...)

The same folder layout works from a Hub repository. The loop itself lives in the `s2t-hf` package.
"""

from s2t_hf.generation import generate as _s2t_generate


def generate(model, *args, s2t=None, **kwargs):
    if s2t is None:
        raise ValueError(
            "The s2t_hf `custom_generate` recipe needs `s2t=S2TLogitsProcessor(model, ...)` among the arguments."
        )
    if args:
        kwargs["inputs"] = args[0]
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    return _s2t_generate(model, s2t, **kwargs)
