// Every kernel binding, once for both modules: per op, the builder of its
// argument struct from the module's arrays (checked by core.h), then its entry
// in bind_ops: name, docstring, keyword names (the same in lmxent._cpu and
// lmxent._cuda, listed in each module's `ops`, which the tests' CuPy stand-in
// forwards). A new op's binding is a builder and an entry here: each module
// calls any op's kernel through one generic call (cpu::run, cuda::launch). The public
// API in python/lmxent reshapes, validates values and allocates outputs; these
// take 2-D rows and 1-D per-row arrays.
#pragma once
#include "core.h"

namespace lmxent {
namespace bindings {

template <class M>
SoftmaxArgs softmax_args(Arrays<M>& c, typename M::Array x, typename M::Maybe out, typename M::Maybe lse,
                         double scale, bool log) {
  SoftmaxArgs a;
  a.x = c.view(x, "x", false);
  a.out = c.like(out, "out", true, a.x, a.x.dtype, "must have the shape and dtype of x");
  a.lse = c.vec(lse, compute_of(a.x.dtype), a.x.rows, "lse", true);
  a.tr.scale = scale;
  a.log = log;
  return a;
}

template <class M>
CEArgs cross_entropy_args(Arrays<M>& c, typename M::Array logits, typename M::Maybe targets,
                          typename M::Maybe probs, typename M::Maybe class_weight, int64_t ignore_index,
                          double scale, double softcap, double smoothing, double z_loss, typename M::Maybe loss,
                          typename M::Maybe lse, bool lse_given, typename M::Maybe grad, double grad_scale,
                          typename M::Maybe grad_rows, bool vocab_slice, typename M::Maybe grad_coef) {
  CEArgs a;
  a.logits = c.view(logits, "logits", false);
  const DType ct = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows, V = a.logits.cols;
  if (targets.is_none() == probs.is_none()) fail("targets", "give exactly one of class ids or probabilities");
  if (!targets.is_none()) a.targets = c.ids(targets, n, "targets");
  a.probs = c.like(probs, "targets", false, a.logits, ct,
                   "probabilities must match the logits' shape in the compute dtype");
  a.class_weight = c.vec(class_weight, ct, V, "weight", false);
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.tr.softcap = softcap;
  a.smoothing = smoothing;
  a.z_loss = z_loss;
  a.loss = c.vec(loss, ct, n, "loss", true);
  a.lse = c.vec(lse, ct, n, "lse", !lse_given);
  a.lse_given = lse_given;
  if (lse_given && !a.lse) fail("lse", "required");
  a.grad = c.like(grad, "grad", true, a.logits, a.logits.dtype, "must have the shape and dtype of the logits");
  a.grad_scale = grad_scale;
  a.grad_rows = c.vec(grad_rows, ct, n, "grad_output", false);
  a.vocab_slice = vocab_slice;
  a.grad_coef = c.vec(grad_coef, ct, n, "grad_coef", false);
  return a;
}

template <class M>
TokenStatsArgs token_stats_args(Arrays<M>& c, typename M::Array logits, typename M::Maybe targets,
                                int64_t ignore_index, double scale, typename M::Maybe logprob,
                                typename M::Maybe lse, typename M::Maybe entropy, typename M::Maybe top_prob,
                                typename M::Maybe rank) {
  TokenStatsArgs a;
  a.logits = c.view(logits, "logits", false);
  const DType ct = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows;
  a.targets = c.ids(targets, n, "targets");
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.logprob = c.vec(logprob, ct, n, "logprob", true);
  a.lse = c.vec(lse, ct, n, "lse", true);
  a.entropy = c.vec(entropy, ct, n, "entropy", true);
  a.top_prob = c.vec(top_prob, ct, n, "top_prob", true);
  if (!rank.is_none()) a.rank = (int64_t*)c.int_vec(rank, 'i', 8, n, "rank", true);
  return a;
}

template <class M>
KLArgs kl_divergence_args(Arrays<M>& c, typename M::Array student, typename M::Array teacher,
                          typename M::Maybe row_mask, double scale, int direction, typename M::Maybe loss,
                          typename M::Maybe grad, double grad_scale, typename M::Maybe grad_rows) {
  KLArgs a;
  a.student = c.view(student, "student_logits", false);
  a.teacher = c.like(teacher, "teacher_logits", false, a.student, a.student.dtype,
                     "must have the student's shape and dtype");
  const DType ct = compute_of(a.student.dtype);
  const int64_t n = a.student.rows;
  if (!row_mask.is_none()) a.row_mask = (const uint8_t*)c.int_vec(row_mask, 'u', 1, n, "mask", false);
  if (direction < 0 || direction > 2) fail("direction", "must be 0 (forward), 1 (reverse) or 2 (js)");
  a.dir = (KLDirection)direction;
  a.tr.scale = scale;
  a.loss = c.vec(loss, ct, n, "loss", true);
  a.grad = c.like(grad, "grad", true, a.student, a.student.dtype,
                  "must have the shape and dtype of the student logits");
  a.grad_scale = grad_scale;
  a.grad_rows = c.vec(grad_rows, ct, n, "grad_output", false);
  return a;
}

template <class M>
DecodeArgs decode_args(Arrays<M>& c, typename M::Array logits, typename M::Maybe bias, typename M::Maybe prev,
                       int64_t prev_len, typename M::Array temperature, typename M::Array top_k,
                       typename M::Array top_p, typename M::Array min_p, typename M::Array repetition,
                       typename M::Array presence, typename M::Array frequency, typename M::Maybe out,
                       typename M::Maybe seed, typename M::Maybe offset, typename M::Maybe tokens,
                       typename M::Maybe logprob, typename M::Maybe rank, int64_t num_logprobs,
                       typename M::Maybe top_ids, typename M::Maybe top_logprobs, bool logprobs_raw) {
  DecodeArgs a;
  a.logits = c.view(logits, "logits", false);
  const int64_t n = a.logits.rows, V = a.logits.cols;
  if (!bias.is_none()) {
    a.bias = c.view(bias, "logit_bias", false);
    if (a.bias.dtype != DType::F64 || a.bias.cols != V || (a.bias.rows != 1 && a.bias.rows != n))
      fail("logit_bias", "expected float64 of shape (1 or rows, V)");
  }
  if (!prev.is_none()) {
    if (prev_len < 1) fail("prev_tokens", "prev_len must be positive");
    a.prev = (const int64_t*)c.int_vec(prev, 'i', 8, n * prev_len, "prev_tokens", false);
    a.prev_len = prev_len;
  }
  a.temperature = (const double*)c.vec(temperature, DType::F64, n, "temperature", false);
  a.top_k = (const int64_t*)c.int_vec(top_k, 'i', 8, n, "top_k", false);
  a.top_p = (const double*)c.vec(top_p, DType::F64, n, "top_p", false);
  a.min_p = (const double*)c.vec(min_p, DType::F64, n, "min_p", false);
  a.repetition = (const double*)c.vec(repetition, DType::F64, n, "repetition_penalty", false);
  a.presence = (const double*)c.vec(presence, DType::F64, n, "presence_penalty", false);
  a.frequency = (const double*)c.vec(frequency, DType::F64, n, "frequency_penalty", false);
  a.out = c.like(out, "out", true, a.logits, a.logits.dtype, "must have the shape and dtype of the logits");
  if (!tokens.is_none()) {
    if (num_logprobs < 0) fail("num_logprobs", "must be >= 0");
    a.seed = (const uint64_t*)c.int_vec(seed, 'u', 8, n, "seed", false);
    a.offset = (const uint64_t*)c.int_vec(offset, 'u', 8, n, "offset", false);
    a.tokens = (int64_t*)c.int_vec(tokens, 'i', 8, n, "tokens", true);
    a.logprob = (float*)c.vec(logprob, DType::F32, n, "logprob", true);
    a.rank = (int64_t*)c.int_vec(rank, 'i', 8, n, "rank", true);
    a.num_logprobs = num_logprobs;
    a.top_ids = (int64_t*)c.int_vec(top_ids, 'i', 8, n * num_logprobs, "top_ids", true);
    a.top_logprobs = (float*)c.vec(top_logprobs, DType::F32, n * num_logprobs, "top_logprobs", true);
    a.logprobs_raw = logprobs_raw;
  }
  return a;
}

template <class M>
TopKArgs top_k_args(Arrays<M>& c, typename M::Array x, int64_t k, typename M::Array values,
                    typename M::Array indices) {
  TopKArgs a;
  a.x = c.view(x, "x", false);
  if (k < 0 || k > a.x.cols) fail("k", "must be in [0, V]");
  a.k = k;
  a.values = c.view(values, "values", true);
  if (a.values.dtype != a.x.dtype || a.values.rows != a.x.rows || a.values.cols != k)
    fail("values", "must have the dtype of x and shape (rows, k)");
  a.indices = (int64_t*)c.int_vec(indices, 'i', 8, a.x.rows * k, "indices", true);
  return a;
}

// The op table of both modules; sets the module's `ops` ({name: parameter names}).
template <class M>
void bind_ops(py::module_& m) {
  py::dict ops;
  def_op(m, ops, "softmax",
         "Softmax (log=True: log-softmax) of scale * x over each row into out, and/or each row's "
         "log-sum-exp into lse; out and lse may be None.",
         &softmax_args<M>, "x", "out", "lse", "scale", "log");
  def_op(m, ops, "cross_entropy",
         "Per-row cross-entropy of logits against class ids (targets) or probabilities (probs, "
         "exactly one given): loss, lse (read instead when lse_given), and/or the gradient into "
         "grad times grad_scale * grad_rows[r]; outputs may be None. vocab_slice: the logits are a "
         "vocabulary slice, class id -1 a counted row whose target is in another slice; grad_coef: "
         "each row's gradient coefficient A given (else computed).",
         &cross_entropy_args<M>, "logits", "targets", "probs", "class_weight", "ignore_index", "scale",
         "softcap", "smoothing", "z_loss", "loss", "lse", "lse_given", "grad", "grad_scale", "grad_rows",
         "vocab_slice", "grad_coef");
  def_op(m, ops, "token_stats",
         "Per-row statistics of the target class: logprob, lse, entropy, top_prob and rank (any may "
         "be None), in one read of the logits.",
         &token_stats_args<M>, "logits", "targets", "ignore_index", "scale", "logprob", "lse", "entropy",
         "top_prob", "rank");
  def_op(m, ops, "kl_divergence",
         "Per-row KL divergence between softmax(scale * student) and softmax(scale * teacher) "
         "(direction 0 forward, 1 reverse, 2 Jensen-Shannon; rows with row_mask 0 skipped) into "
         "loss, and the student gradient into grad times grad_scale * grad_rows[r] (may be None).",
         &kl_divergence_args<M>, "student", "teacher", "row_mask", "scale", "direction", "loss", "grad",
         "grad_scale", "grad_rows");
  def_op(m, ops, "decode",
         "Decoding of each row (lmxent/decoding.h): the processed logits into out (may be None) and, "
         "when tokens is given, one sampled token per row with its logprob, rank and the "
         "num_logprobs most likely ids and log-probabilities. Per-row parameters are 1-D arrays "
         "(float64; top_k int64; seed, offset uint64); prev_tokens flat (rows * prev_len,).",
         &decode_args<M>, "logits", "logit_bias", "prev_tokens", "prev_len", "temperature", "top_k", "top_p",
         "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "out", "seed", "offset",
         "tokens", "logprob", "rank", "num_logprobs", "top_ids", "top_logprobs", "logprobs_raw");
  def_op(m, ops, "top_k",
         "The k largest entries of each row of x, descending (NaN first, ties lower index first), "
         "into values (rows, k) and indices (rows * k,).",
         &top_k_args<M>, "x", "k", "values", "indices");
  m.attr("ops") = ops;
}

}  // namespace bindings
}  // namespace lmxent
