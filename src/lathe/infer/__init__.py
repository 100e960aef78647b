"""The inference engine: every reply Lathe generates goes through `lathe.infer.engine`.

`engine` decodes many prompts in one batched `generate`, each with its own sampling
settings, stop strings and streaming callback; `messages` turns an OpenAI-style message
list (tools included) into the prompt the model was trained on and parses tool calls back;
`batch` holds predict's batch helper and the padding / stop-token helpers.
"""

from lathe.infer.batch import (
    answer,
    cut_at_stop,
    generate_replies,
    generation_kwargs,
    generation_one_at_a_time,
    left_pad,
    set_stop_tokens,
)

__all__ = ["answer", "cut_at_stop", "generate_replies", "generation_kwargs", "generation_one_at_a_time",
           "left_pad", "set_stop_tokens"]
