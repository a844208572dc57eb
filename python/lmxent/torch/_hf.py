"""Hugging Face transformers integration.

causal_lm_loss has the signature and semantics of transformers' ForCausalLMLoss
(transformers/loss/loss_utils.py), so `model.loss_function = causal_lm_loss`
replaces a causal LM's loss: labels shifted by one (or precomputed shift_labels),
ignore_index, and num_items_in_batch (the token count of the whole accumulated
batch: the sum of the per-token losses divided by it). Unlike transformers it
makes no float32 copy of bfloat16 logits (lmxent computes in float32 anyway).

causal_lm_head_loss skips the logits altogether: it runs the model's decoder and
feeds the last hidden states and the output embedding's weight to
linear_cross_entropy."""
import torch

import lmxent.torch as lt


def _shifted(labels, shift_labels, ignore_index):
    """The next-token targets: shift_labels, or labels moved left by one with
    ignore_index in the last position (as transformers pads them)."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _items(num_items_in_batch):
    """(options, divisor) for num_items_in_batch: a number becomes lmxent's
    `normalizer` (the fused gradient is then final); a tensor on the CPU too, outside
    torch.compile. A device tensor (or any tensor under compile) divides a "sum"
    instead, so that nothing waits for the device or breaks the graph."""
    n = num_items_in_batch
    if n is None:
        return {}, None
    if torch.is_tensor(n):
        if n.device.type != "cpu" or torch.compiler.is_compiling():
            return {"reduction": "sum"}, n
        n = n.item()
    return {"normalizer": n}, None


def _divided(loss, divisor):
    return loss if divisor is None else loss / divisor.to(loss.device)


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss on lmxent: the mean next-token cross-entropy of
    logits (..., vocab_size), or the sum over num_items_in_batch. Other keyword
    arguments are ignored, as transformers' loss ignores them. A mean over zero
    counted tokens is 0 here (NaN in transformers)."""
    targets = _shifted(labels, shift_labels, ignore_index)
    targets = targets.reshape(-1).to(logits.device)
    options, divisor = _items(num_items_in_batch)
    loss = lt.cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index,
                            **options)
    return _divided(loss, divisor)


def causal_lm_head_loss(model, input_ids=None, labels=None, *, num_items_in_batch=None,
                        ignore_index=-100, shift_labels=None, chunk_size=None,
                        memory_budget=None, **inputs):
    """The causal-LM loss of a transformers model without its logits: the decoder
    (model.get_decoder(), or model.base_model) runs on input_ids and **inputs
    (attention_mask, ...), and its last hidden states go with the output
    embedding's weight (and bias) to linear_cross_entropy. The result equals
    model(input_ids, labels=labels, ...).loss, with memory for chunk rows x V logits
    instead of all of them. A final_logit_softcapping in the config (Gemma 2) is
    applied as lmxent's softcap."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    hidden = decoder(input_ids=input_ids, **inputs)[0]
    head = model.get_output_embeddings()
    targets = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
    options, divisor = _items(num_items_in_batch)
    loss = lt.linear_cross_entropy(
        hidden, head.weight, targets, bias=head.bias, ignore_index=ignore_index,
        softcap=getattr(model.config, "final_logit_softcapping", None), chunk_size=chunk_size,
        memory_budget=memory_budget, **options)
    return _divided(loss, divisor)
