"""Keep the libraries' own noise out of the user's terminal.

Users should see Lathe's progress (the training bar, tokenizing, generating) and the
warnings that matter; not deprecation chatter, a bar for loading 39 tensors from a
local disk, or one for writing the tokenized cache. `--debug` (LATHE_DEBUG=1) keeps
everything. Only the libraries' public switches are used.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

LIBRARIES = ("transformers", "peft", "torch", "accelerate", "datasets", "trl", "huggingface_hub")

# Bars transformers draws for work that takes a blink (download bars are kept).
_SHORT_BARS = ("Loading weights", "Loading checkpoint shards", "Writing model shards")


def debugging() -> bool:
    return os.environ.get("LATHE_DEBUG", "0") not in ("0", "")


def quiet_warnings() -> None:
    """Deprecation warnings raised inside the libraries are for their developers."""
    if debugging():
        return
    for module in LIBRARIES:
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    # 8-bit matmuls say this on every call: the cast is what 8-bit training means
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
    # torch's quantized engine (lathe quantize's int8 layers): "quantized dtypes are deprecated"
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
    # torchao, when installed, reports at import the CUDA kernels a CPU machine cannot load, and torch
    # the enum registrations torchao makes: neither concerns the user's run
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # bitsandbytes, at import on a CPU with AVX512-BF16: an optional faster 4-bit kernel package is
    # missing (the built-in kernel is used); DeepSpeed, at its first use without a GPU: "Setting
    # accelerator to CPU", which the run summary says already
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_NotWorthSaying(("Setting accelerator to CPU",)))
    # P-tuning / prompt tuning: said on every forward; Lathe refuses packing (which needs them)
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient",
                            category=UserWarning)


def quiet_weight_loading() -> None:
    """transformers' per-tensor loading bar off (its public tqdm hook); downloads keep theirs."""
    if debugging():
        return
    from transformers.utils import logging as hf_logging

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("desc") in _SHORT_BARS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


@contextlib.contextmanager
def datasets_bars_off() -> Iterator[None]:
    """No `datasets` bars inside (cache writes and reads, filters): Lathe draws its own."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    if was_on and not debugging():
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


class _NotWorthSaying:
    """A logging filter dropping the records that start with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        self.starts = starts

    def filter(self, record: Any) -> bool:
        return not record.getMessage().startswith(self.starts)
