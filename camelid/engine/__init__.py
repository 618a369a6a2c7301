"""The inference engine: paged KV cache, continuous batching, prefix caching, multi-LoRA batches.

    from camelid.engine import LLM, SamplingParams
    llm = LLM("path/to/model")
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Layers, each in its own file: sequence (one completion's state) <- block_manager (KV blocks, refcounts, prefix cache)
<- scheduler (what runs this step) <- runner (one packed forward over paged_attention, then sampler) <- llm (requests,
text, outputs).
"""

from camelid.engine.llm import LLM, CompletionOutput, RequestOutput
from camelid.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
