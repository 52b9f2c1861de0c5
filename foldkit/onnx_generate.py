"""Greedy generation with an exported decoder graph in ONNX Runtime, step by step with its key/value cache.

It follows transformers' generate with do_sample=False: the prompt in one step with an empty past, then
one token per step; position ids count the real tokens of each row; a row that has produced an end token
gets the pad id from then on, and generation stops when every row has ended.
"""

from __future__ import annotations

import numpy as np

from foldkit.onnx_graphs import CacheShape, past_names

ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def cache_shape_of(session) -> CacheShape:
    """Read the layer count, key/value heads and head size from a cache graph's past inputs."""
    past = [node for node in session.get_inputs() if node.name.startswith("past_key_values.")]
    if not past:
        raise ValueError("this graph has no past_key_values inputs: greedy generation needs a decoder graph "
                         "exported with its cache (foldkit export without --no-cache)")
    _, heads, _, head_dim = past[0].shape
    return CacheShape(layers=len(past) // 2, heads=heads, head_dim=head_dim)


def greedy_generate(session, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                    eos_token_ids: list[int] | None = None, pad_token_id: int = 0,
                    cache: CacheShape | None = None) -> np.ndarray:
    """Return batch x max_new_tokens generated ids (pad after a row's end token).

    `session` is an onnxruntime.InferenceSession of a decoder graph with a cache. `cache` defaults to the
    shape that the graph's past_key_values inputs declare.
    """
    cache = cache or cache_shape_of(session)
    batch = input_ids.shape[0]
    inputs = {node.name: node for node in session.get_inputs()}
    dtype = ONNX_FLOAT_TYPES[inputs["past_key_values.0.key"].type]
    names = past_names(cache.layers, "past_key_values")
    past = {name: np.zeros((batch, cache.heads, 0, cache.head_dim), dtype=dtype) for name in names}
    output_names = [node.name for node in session.get_outputs()]
    tokens = np.full((batch, max_new_tokens), pad_token_id, dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    step_ids = input_ids.astype(np.int64)
    mask = attention_mask.astype(np.int64)
    for step in range(max_new_tokens):
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)[:, -step_ids.shape[1]:]
        results = session.run(output_names, {"input_ids": step_ids, "attention_mask": mask,
                                             "position_ids": positions, **past})
        next_tokens = results[0][:, -1, :].argmax(axis=-1).astype(np.int64)
        next_tokens = np.where(finished, pad_token_id, next_tokens)
        tokens[:, step] = next_tokens
        if eos_token_ids:
            finished |= np.isin(next_tokens, eos_token_ids)
            if finished.all():
                break
        past = dict(zip(names, results[1:]))
        step_ids = next_tokens[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return tokens
